"""`circuits serve atlas --processes N`: N processes serve one port (SO_REUSEPORT), read-only.

Checked from outside: the kernel lists N listening sockets on the port, every query through fresh
connections gets the same answer as the atlas file in-process, the atlas file is unchanged, and
SIGTERM to the first process ends all of them. Without --processes a second server on a taken
port still fails (reuse is opt-in).
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

from circuits_sdk.atlas import AtlasClient


def _listeners(port: int) -> int:
    """Listening TCP sockets on ``port`` (state 0A in /proc/net/tcp and tcp6)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                count += 1
    return count


def _start(atlas: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "circuits_atlas", "--duckdb", str(atlas), "--host", "127.0.0.1", "--insecure", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    said = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        said.append(line)
        if "atlas serving on" in line:
            return proc, line.split("serving on ")[1].split()[0]
        if not line and proc.poll() is not None:
            break
    raise AssertionError("".join(said)[-3000:])


def test_two_processes_serve_one_port_read_only(planted_atlas: Path) -> None:
    before = hashlib.sha256(planted_atlas.read_bytes()).hexdigest()
    proc, address = _start(planted_atlas, "--port", "0", "--processes", "2")
    port = int(address.rsplit(":", 1)[1])
    try:
        assert _listeners(port) == 2
        with AtlasClient(address) as client:
            reference = (client.stats(), tuple(client.get_edges_for_unit(0, 0)))
        for _ in range(24):  # fresh connections: the kernel spreads them over both processes
            with AtlasClient(address) as client:
                assert (client.stats(), tuple(client.get_edges_for_unit(0, 0))) == reference
        # A plain server cannot take the port while they hold it (reuse is opt-in).
        other = subprocess.run(
            [sys.executable, "-m", "circuits_atlas", "--duckdb", str(planted_atlas), "--host", "127.0.0.1",
             "--insecure", "--port", str(port)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert other.returncode != 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    deadline = time.monotonic() + 30
    while _listeners(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _listeners(port) == 0
    assert hashlib.sha256(planted_atlas.read_bytes()).hexdigest() == before


def test_processes_must_be_positive(planted_atlas: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "circuits_atlas", "--duckdb", str(planted_atlas), "--insecure",
                             "--processes", "0"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error: --processes")

"""Helpers of the reliability drills (imported by conftest.py and the drill modules as
``drill_support``; a unique name, unlike ``conftest``, resolves to this file whichever test
folders run together)."""

from __future__ import annotations

import importlib
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# -- secrets: planted everywhere a secret could leak from, searched for in every log at the end ----
READ_TOKEN = "drill-read-token-5b1f0e6c2a9d47"
WRITE_TOKEN = "drill-write-token-8c3e7a1b9f2d60"
ADMIN_TOKEN = "drill-admin-token-2d9c4b7e1a3f85"
WRONG_TOKEN = "drill-wrong-token-0000000000000"
FAKE_ANTHROPIC_KEY = "sk-ant-api03-DRILLFAKEKEY-9d8c7b6a5f4e3d2c1b0a"
FAKE_HF_TOKEN = "hf_DrillFakeHubToken0123456789abcdef"
SECRETS = (READ_TOKEN, WRITE_TOKEN, ADMIN_TOKEN, WRONG_TOKEN, FAKE_ANTHROPIC_KEY, FAKE_HF_TOKEN)

#: Environment every service subprocess gets: real-looking secrets that must never be logged.
SECRET_ENV = {"ANTHROPIC_API_KEY": FAKE_ANTHROPIC_KEY, "HF_TOKEN": FAKE_HF_TOKEN, "HUGGING_FACE_HUB_TOKEN": FAKE_HF_TOKEN}


# -- the drill summary table ---------------------------------------------------------------------
@dataclass(slots=True, kw_only=True)
class DrillRow:
    drill: str
    requests: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    faults: int = 0
    recovered: int = 0
    note: str = ""


DRILL_ROWS: list[DrillRow] = []

#: Names of the circuits_core.limits.Limits fields a drill of this session saw enforced (a drill
#: appends a name only after it watched an over-limit request refused or clamped).
ENFORCED_LIMITS: list[str] = []
#: The drill modules that enforce limits; the summary asserts every limit only when all ran.
LIMIT_DRILL_MODULES = ("test_drill_limits.py", "test_drill_streams.py", "test_drill_load.py", "test_drill_echo.py",
                       "test_drill_labeler_spend.py", "test_drill_trace_stop.py")  # fmt: skip


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of values by nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))
    return ordered[rank]


def record_drill(drill: str, *, latencies_s: Sequence[float] = (), **fields) -> DrillRow:
    """Add one row to the summary table (latencies give p50/p99 and, by default, the request count)."""
    row = DrillRow(drill=drill, **fields)
    if latencies_s:
        row.p50_ms = statistics.median(latencies_s) * 1000
        row.p99_ms = percentile(latencies_s, 0.99) * 1000
        if not row.requests:
            row.requests = len(latencies_s)
    DRILL_ROWS.append(row)
    return row


# -- every log line of the session (in-process records + subprocess output) ----------------------
def find_secrets(text: str) -> list[str]:
    """The planted secrets that occur in ``text`` (names only, never the values)."""
    names = {READ_TOKEN: "read token", WRITE_TOKEN: "write token", ADMIN_TOKEN: "admin token",
             WRONG_TOKEN: "wrong token", FAKE_ANTHROPIC_KEY: "ANTHROPIC_API_KEY", FAKE_HF_TOKEN: "HF token"}  # fmt: skip
    return [name for secret, name in names.items() if secret in text]


# -- service subprocesses ------------------------------------------------------------------------
_PARSER_FACTORIES = ("build_parser", "parser")


def service_flags(module: str) -> frozenset[str]:
    """The option strings ``python -m <module>`` accepts (read from its argparse parser)."""
    main = importlib.import_module(f"{module}.__main__")
    for name in _PARSER_FACTORIES:
        factory = getattr(main, name, None)
        if callable(factory):
            return frozenset(factory()._option_string_actions)
    return frozenset()


def health(address: str, timeout: float = 1.0) -> str:
    from circuits_server.localstack import health_status

    return health_status(address, timeout=timeout)


_ADDRESS = re.compile(r"(?:listening on|serving on)\s+[\w.\-\[\]:]*?:(\d+)")


@dataclass(slots=True, kw_only=True)
class ServiceProcess:
    """``python -m <module> ARGS --host 127.0.0.1 --port P`` with output appended to a log file.

    The first start picks a free port (``--port 0``); restarts reuse it so clients reconnect to the
    same address. Uses ``--port-file`` and ``--insecure`` when the service accepts them.
    """

    module: str
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> ServiceProcess:
        flags = service_flags(self.module)
        argv = [sys.executable, "-m", self.module, *self.args, "--host", "127.0.0.1", "--port", str(self.port)]
        if "--insecure" in flags:
            argv.append("--insecure")
        port_file = self.log_path.with_suffix(".port")
        port_file.unlink(missing_ok=True)
        if "--port-file" in flags:
            argv += ["--port-file", str(port_file)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **SECRET_ENV, **self.env}
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {self.starts}: {' '.join(argv[1:])}\n".encode())
            offset = log.tell()
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.starts += 1
        deadline = time.monotonic() + timeout
        port = 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited with {self.proc.returncode}:\n{self.tail()}")
            if not port:
                if port_file.exists():
                    port = int(port_file.read_text().strip() or 0)
                else:
                    with open(self.log_path, "rb") as log:
                        log.seek(offset)
                        found = _ADDRESS.search(log.read().decode("utf-8", "replace"))
                    port = int(found.group(1)) if found else 0
                if port:
                    self.port = port
            if port and health(self.address, timeout=1.0) == "SERVING":
                return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"{self.module} did not report SERVING within {timeout:.0f}s:\n{self.tail()}")

    def restart_on_same_port(self, timeout: float = 120.0) -> ServiceProcess:
        """Start again on the same port (a just-killed listener may take a moment to free it)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.start(timeout=max(5.0, deadline - time.monotonic()))
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL, no grace: the process gets no chance to flush or close anything."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def rss_bytes(self) -> int:
        return rss_bytes(self.proc.pid) if self.proc else 0

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# -- a tiny real model, saved as a local checkpoint (subprocesses load it like any model) ----------
WORDS = ["the", "capital", "of", "france", "is", "paris", "london", "rome", "city", "one", "two", "three", "four", "five", "red", "green", "blue", "big", "small", "cat", "dog", "sun", "moon", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p"]
SPECIALS = ["<unk>", "<bos>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}"
    "{% if not loop.last %} <|end|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %} <|end|> <|assistant|>{% endif %}"
)
PROMPTS = [
    "the capital of france is", "big red dog a b c", "one two three four five", "sun moon cat dog",
    "the city of rome is", "green blue red big small", "a b c d e f", "london paris rome city",
]  # fmt: skip


# -- a small real atlas: random graphs -> aggregator store -> export -> build_atlas ---------------
ATLAS_LAYERS = 4
LABEL_WORDS = ("enzyme", "capital", "rhyme", "number", "colour", "animal", "river", "music")


def aggregated_export(tmp: Path, n_graphs: int = 300, seed: int = 5) -> Path:
    import numpy as np
    from circuits_aggregator import AggregateStore
    from circuits_core.aggregator_types import graph_arrays_from_graph
    from circuits_aggregator.testing import random_graph

    rng = np.random.default_rng(seed)
    graphs = [random_graph(rng, n_neurons=10, n_edges=30, n_layers=ATLAS_LAYERS, pool=40) for _ in range(n_graphs)]
    with AggregateStore(tmp / "agg.duckdb") as store:
        store.ingest([graph_arrays_from_graph(g) for g in graphs])
        store.export(tmp / "export")
    return tmp / "export"


def write_labels(path: Path, *, layers: int = ATLAS_LAYERS, neurons: int = 40) -> Path:
    import json

    lines = []
    for layer in range(layers):
        for neuron in range(neurons):
            word = LABEL_WORDS[(layer * 7 + neuron) % len(LABEL_WORDS)]
            lines.append(json.dumps({"layer": layer, "neuron": neuron, "label": f"{word} detector L{layer}",
                                     "description": f"fires on {word} tokens"}))  # fmt: skip
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

"""`circuits serve atlas --duckdb atlas.duckdb --port 50054 --metrics-port 9094` (also `circuits-atlas`).

``--processes N`` serves the same port from N processes (SO_REUSEPORT; the kernel spreads
connections over them): the atlas is read-only, so each process opens it on its own and Python's
GIL stops limiting throughput to one core. The first process starts the others, forwards SIGTERM
to them and waits for them; only it exposes ``--metrics-port``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from circuits_core.config import DEFAULT_PORTS
from circuits_core.errors import CircuitsError, error_line
from circuits_server.serving import add_server_arguments, server_settings_from_args, write_port_file

from circuits_atlas.database import CircuitDatabase, QueryLimits
from circuits_atlas.server import AtlasSettings, build_server


_DEFAULT_LIMITS = QueryLimits()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="circuits serve atlas", description="Serve a DuckDB atlas read-only over gRPC.")
    p.add_argument("--duckdb", required=True, help="atlas file built by `circuits build-db`")
    p.add_argument("--max-results", type=int, default=_DEFAULT_LIMITS.max_results, help="most rows per answer")
    p.add_argument("--query-timeout", type=float, default=_DEFAULT_LIMITS.query_timeout_s, help="seconds before a query is interrupted")
    p.add_argument("--max-query-chars", type=int, default=_DEFAULT_LIMITS.max_query_chars, help="longest search text")
    p.add_argument("--processes", type=int, default=1,
                   help="serve the port from N processes (SO_REUSEPORT, read-only atlas); default 1")
    p.add_argument("--no-preload", dest="preload", action="store_false",
                   help="answer searches and label lookups with SQL instead of holding the search postings, "
                        "neuron labels and labels in memory (~0.7 GB per process for 1.6M labelled neurons)")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set for the helper processes
    add_server_arguments(p, default_port=DEFAULT_PORTS["atlas"])
    return p


def _reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket holding ``port`` (0 = a free one) while the
    serving processes bind it too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _start_helpers(argv: Sequence[str], port: int, count: int) -> list[subprocess.Popen]:
    """``count`` more atlas processes on ``port``; returns once each is serving."""
    helpers = []
    base = [a for a in argv]
    for _ in range(count):
        cmd = [sys.executable, "-m", "circuits_atlas", *base, "--port", str(port), "--processes", "1", "--reuse-port"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        helpers.append(proc)
    for proc in helpers:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "serving on" in line:
                threading.Thread(target=lambda p=proc: [None for _ in p.stdout], daemon=True).start()
                break
            if not line and proc.poll() is not None:
                for other in helpers:
                    other.kill()
                raise SystemExit(2)
    return helpers


def _without(argv: Sequence[str], flags: tuple[str, ...]) -> list[str]:
    """``argv`` without the given valued flags (``--flag V`` or ``--flag=V``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in flags:
            skip = True
            continue
        if any(arg.startswith(f + "=") for f in flags):
            continue
        out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.processes < 1:
        print(f"error: --processes must be >= 1, got {args.processes}", file=sys.stderr)
        return 2
    try:
        server_settings = server_settings_from_args(args)
    except CircuitsError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    # Handlers first: a SIGTERM while the helpers start or the atlas loads (seconds with preload)
    # must still stop the helpers, not kill this process and orphan them.
    stop_requested = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop_requested.set())
    helpers: list[subprocess.Popen] = []
    reserved = None
    if args.processes > 1 or args.reuse_port:
        import dataclasses

        if args.processes > 1:
            try:
                reserved = _reserve_port(server_settings.host, server_settings.port)
            except OSError as exc:
                print(f"error: cannot bind {server_settings.host}:{server_settings.port} ({exc.strerror or exc})", file=sys.stderr)
                return 2
            port = reserved.getsockname()[1]
            server_settings = dataclasses.replace(server_settings, port=port, reuse_port=True)
            helpers = _start_helpers(_without(argv, ("--port", "--processes", "--metrics-port", "--port-file")),
                                     port, args.processes - 1)  # fmt: skip
        else:
            server_settings = dataclasses.replace(server_settings, reuse_port=True)
    settings = AtlasSettings(
        duckdb_path=args.duckdb,
        server=server_settings,
        limits=QueryLimits(max_results=args.max_results, query_timeout_s=args.query_timeout, max_query_chars=args.max_query_chars),
        preload=args.preload,
    )  # fmt: skip
    database = None
    try:
        database = CircuitDatabase(settings.duckdb_path, read_only=True, limits=settings.limits, preload=settings.preload)
        server = build_server(settings, database=database).start()
    except CircuitsError as exc:
        print(error_line(exc), file=sys.stderr)
        if database is not None:
            database.close()
        for helper in helpers:
            helper.terminate()
        return 2
    finally:
        if reserved is not None:
            reserved.close()
    server.set_serving(True)
    logging.getLogger("circuits_atlas").info(
        "atlas %s serving on %s (metrics port %s); neighbour index %s", args.duckdb, server.address,
        server.metrics.port, database.neighbour_index_note,
    )
    print(f"atlas serving on {server.address}" + (f" ({args.processes} processes)" if helpers else ""), flush=True)
    write_port_file(server, args.port_file)
    # Stop in the main thread: GrpcServer.wait() returns as soon as stop() *starts* in its signal
    # thread, and the interpreter could then exit while DuckDB is closing (std::terminate).
    while not stop_requested.wait(0.5):
        pass
    for helper in helpers:
        helper.terminate()
    server.stop()
    for helper in helpers:
        try:
            helper.wait(server_settings.grace_seconds + 5)
        except subprocess.TimeoutExpired:
            helper.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())

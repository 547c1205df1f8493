"""`circuits serve atlas --duckdb atlas.duckdb --port 50054 --metrics-port 9094` (also `circuits-atlas`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from circuits_core.errors import CircuitsError, error_line
from circuits_server.serving import add_server_arguments, server_settings_from_args, write_port_file

from circuits_atlas.database import QueryLimits
from circuits_atlas.server import AtlasSettings, build_server


_DEFAULT_LIMITS = QueryLimits()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="circuits serve atlas", description="Serve a DuckDB atlas read-only over gRPC.")
    p.add_argument("--duckdb", required=True, help="atlas file built by `circuits build-db`")
    p.add_argument("--max-results", type=int, default=_DEFAULT_LIMITS.max_results, help="most rows per answer")
    p.add_argument("--query-timeout", type=float, default=_DEFAULT_LIMITS.query_timeout_s, help="seconds before a query is interrupted")
    p.add_argument("--max-query-chars", type=int, default=_DEFAULT_LIMITS.max_query_chars, help="longest search text")
    add_server_arguments(p, default_port=50054)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server_settings = server_settings_from_args(args)
    except CircuitsError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    settings = AtlasSettings(
        duckdb_path=args.duckdb,
        server=server_settings,
        limits=QueryLimits(max_results=args.max_results, query_timeout_s=args.query_timeout, max_query_chars=args.max_query_chars),
    )  # fmt: skip
    try:
        server = build_server(settings).start()
    except CircuitsError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    server.set_serving(True)
    logging.getLogger("circuits_atlas").info(
        "atlas %s serving on %s (metrics port %s)", args.duckdb, server.address, server.metrics.port
    )
    print(f"atlas serving on {server.address}", flush=True)
    write_port_file(server, args.port_file)
    # Stop in the main thread: GrpcServer.wait() returns as soon as stop() *starts* in its signal
    # thread, and the interpreter could then exit while DuckDB is closing (std::terminate).
    stop_requested = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop_requested.set())
    while not stop_requested.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

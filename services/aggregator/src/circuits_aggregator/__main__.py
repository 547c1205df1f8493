"""`circuits serve aggregator` / `python -m circuits_aggregator`: run the aggregator gRPC server.

Prints ``circuits-aggregator listening on HOST:PORT`` on stdout once serving (with ``--port 0``
that is how callers learn the port; ``--port-file`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from circuits_core.config import DEFAULT_PORTS
from circuits_core.errors import CircuitsError, error_line
from circuits_core.limits import add_limit_arguments, limits_from_args
from circuits_server.serving import add_server_arguments, announce, server_settings_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="circuits serve aggregator", description="exactly-once streaming aggregation server")
    p.add_argument("--state", required=True, help="DuckDB state file (created if missing)")
    p.add_argument("--shard-index", type=int, default=0, help="this replica's shard (default 0)")
    p.add_argument("--shard-count", type=int, default=1, help="number of shards (default 1)")
    p.add_argument("--batch-graphs", type=int, default=256, help="commit an Ingest micro-batch after N graphs (default 256)")
    p.add_argument("--batch-ms", type=float, default=50.0,
                   help="... or once no graph arrived for T ms (default 50) ...")
    p.add_argument("--batch-max-ms", type=float, default=1000.0,
                   help="... or T ms after its first graph (default 1000)")
    p.add_argument("--threads", type=int, default=1, help="DuckDB threads (default 1)")
    p.add_argument("--memory-limit", default="1GB", help="DuckDB memory limit (default 1GB)")
    p.add_argument("--export-root", default="",
                   help="Export may only write below this folder (default: the state file's folder)")
    add_server_arguments(p, default_port=DEFAULT_PORTS["aggregator"])
    add_limit_arguments(p, ("max_edges_per_batch",))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from circuits_aggregator.server import AggregatorServerSettings, build_server
        from circuits_aggregator.store import AggregateStore, StoreSettings
        from circuits_aggregator.stream import BatchPolicy

        if args.batch_graphs < 1 or args.batch_ms <= 0 or args.batch_max_ms <= 0:
            raise CircuitsError("--batch-graphs must be >= 1, --batch-ms and --batch-max-ms > 0")
        store = AggregateStore(
            args.state,
            StoreSettings(shard_index=args.shard_index, shard_count=args.shard_count, threads=args.threads,
                          memory_limit=args.memory_limit),
        )  # fmt: skip
        settings = AggregatorServerSettings(
            server=server_settings_from_args(args),
            export_root=args.export_root,
            limits=limits_from_args(args),
            batch=BatchPolicy(max_graphs=args.batch_graphs, max_delay_s=args.batch_ms / 1000.0,
                              max_wait_s=args.batch_max_ms / 1000.0),
        )
        server = build_server(settings, store=store).start()
    except (CircuitsError, OSError) as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    server.set_serving(True)
    announce(server, args)
    server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

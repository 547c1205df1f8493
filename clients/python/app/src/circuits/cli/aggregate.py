"""`circuits aggregate`: exactly-once edge and neuron statistics over a directory of graph files.

    circuits aggregate graphs/ --state aggregate.duckdb --export export/
    circuits aggregate graphs/ --state aggregate.duckdb --resume          # continue a killed run
    circuits aggregate --merge shard0/ shard1/ --export merged/           # combine shard exports
    circuits aggregate --config config.yaml                               # aggregation.* settings

Reads *.json, *.json.gz, *.pb, *.pb.gz under the directory (recursively). Corrupt or truncated
files are reported with their name and skipped; the summary counts them. Without --resume an
existing non-empty state is refused (so two different corpora are never mixed by accident).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from circuits_core.errors import FailedPrecondition, InvalidArgument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("graphs_dir", nargs="?", help="directory of graph files (default: aggregation.graphs_dir)")
    parser.add_argument("--config", help="YAML config (aggregation section)")
    parser.add_argument("--state", help="DuckDB state file (default: aggregation.state_path = aggregate.duckdb)")
    parser.add_argument("--resume", action="store_true", help="continue an existing state; ingested files are skipped")
    parser.add_argument("--checkpoint-interval", type=int, help="commit every N graphs (default 500)")
    parser.add_argument("--min-count", type=int, default=1,
                        help="edges.parquet keeps edges with at least N observations (default 1 = all; keep 1 for "
                             "shard partials that will be merged)")  # fmt: skip
    parser.add_argument("--export", dest="export_dir", help="write edges/units/ledger.parquet to DIR at the end")
    parser.add_argument("--merge", nargs="+", metavar="EXPORT_DIR", help="merge these exports into --export DIR")
    parser.add_argument("--max-graphs", type=int, default=0, help="stop after N newly counted graphs (0 = all)")
    parser.add_argument("--threads", type=int, default=1, help="DuckDB threads (default 1)")
    parser.add_argument("--memory-limit", default="1GB", help="DuckDB memory limit (default 1GB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.min_count < 0:
        raise InvalidArgument(f"--min-count must be >= 0, got {args.min_count}")
    from circuits.extras import require

    require("circuits_aggregator", what="`circuits aggregate`")
    if args.merge:
        return _merge(args)
    return _aggregate(args)


def _merge(args: argparse.Namespace) -> int:
    from circuits_aggregator.merge import merge_exports

    if not args.export_dir:
        raise InvalidArgument("--merge needs --export DIR (where the merged export goes)")
    if args.graphs_dir:
        raise InvalidArgument("give either a graphs directory or --merge, not both")
    out = Path(args.export_dir)
    existed = out.exists()
    try:
        files = merge_exports(args.merge, out, min_count=args.min_count)
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed merge leaves no empty output folder behind
        raise
    print(f"merged {len(args.merge)} exports into {Path(args.export_dir)}: {', '.join(f.name for f in files)}")
    return 0


def _aggregate(args: argparse.Namespace) -> int:
    from circuits_core.config import Config, load_config
    from circuits_aggregator.directory import aggregate_directory
    from circuits_aggregator.heap import keep_freed_memory
    from circuits_aggregator.store import AggregateStore, StoreSettings

    cfg = load_config(args.config) if args.config else Config()
    agg = cfg.aggregation
    graphs_dir = Path(args.graphs_dir) if args.graphs_dir else cfg.resolve(agg.graphs_dir)
    state = Path(args.state) if args.state else cfg.resolve(agg.state_path)
    interval = args.checkpoint_interval if args.checkpoint_interval is not None else agg.checkpoint_interval
    if interval < 1:
        raise InvalidArgument(f"--checkpoint-interval must be >= 1, got {interval}")
    if args.max_graphs < 0:
        raise InvalidArgument(f"--max-graphs must be >= 0, got {args.max_graphs}")
    if not graphs_dir.is_dir():
        raise InvalidArgument(f"{graphs_dir}: graphs directory not found")
    from circuits_aggregator.directory import list_graph_files

    if not list_graph_files(graphs_dir):  # checked before the state is created: an empty run leaves nothing behind
        raise InvalidArgument(f"{graphs_dir}: no graph file (*.json, *.json.gz, *.pb, *.pb.gz) found; nothing to aggregate")
    export_dir = Path(args.export_dir) if args.export_dir else (cfg.resolve(agg.export_dir) if args.config else None)

    keep_freed_memory()  # batch buffers are reused, not faulted in again per batch
    with AggregateStore(state, StoreSettings(threads=args.threads, memory_limit=args.memory_limit)) as store:
        if store.graphs_total and not args.resume:
            raise FailedPrecondition(
                f"{state} already holds {store.graphs_total} graphs; pass --resume to continue it or choose another --state"
            )
        report = aggregate_directory(
            store,
            graphs_dir,
            checkpoint_interval=interval,
            max_graphs=args.max_graphs,
            progress=not args.no_progress,
        )
        stats = store.stats()
        rate = report.edge_observations / report.seconds if report.seconds > 0 else 0.0
        print(
            f"aggregated {report.ingested} new graphs ({report.edge_observations} edge observations, "
            f"{rate:,.0f}/s) from {report.files} files in {report.seconds:.1f}s; "
            f"skipped {report.resumed_skips} already ingested, {report.duplicates} duplicates, "
            f"{len(report.corrupt)} corrupt"
        )
        print(
            f"state {state}: {stats.graphs_processed} graphs, {stats.distinct_edges} edges, "
            f"{stats.distinct_units} neurons, {stats.total_edge_observations} edge observations"
        )
        if report.corrupt:
            print(f"corrupt files ({len(report.corrupt)}): " + ", ".join(src for src, _ in report.corrupt[:20])
                  + (" ..." if len(report.corrupt) > 20 else ""), file=sys.stderr)  # fmt: skip
        if export_dir is not None:
            files = store.export(export_dir, min_count=args.min_count)
            print(f"exported {', '.join(str(f) for f in files)}")
    return 0

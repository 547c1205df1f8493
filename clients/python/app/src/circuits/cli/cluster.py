"""`circuits cluster`: Infomap clusters of a whole atlas or of one graph (relp-spec §G).

    circuits cluster --duckdb atlas.duckdb            # (re)write cluster columns + clusters table
    circuits cluster --duckdb atlas.duckdb --dry-run  # only print the cluster summary
    circuits cluster --graph graph.json [--output clusters.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path



def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--duckdb", help="atlas file: cluster its edges and write the result into it")
    source.add_argument("--graph", help="one graph file (.json/.json.gz/.pb): print its clusters")
    parser.add_argument("--dry-run", action="store_true", help="atlas: print the summary, do not write")
    parser.add_argument("--output", help="graph: write the clusters as JSON to this file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--min-edge-count", type=int, default=5, help="atlas: edges need this many observations (default 5)")
    parser.add_argument(
        "--weight-transform", choices=("abs_weight_sq", "abs_weight", "weight"), default="abs_weight_sq",
        help="atlas: link weight from edge statistics (default abs_weight_sq)",
    )  # fmt: skip
    parser.add_argument("--num-trials", type=int, default=None, help="Infomap trials (default 20 atlas, 10 graph)")
    parser.add_argument("--seed", type=int, default=42, help="Infomap seed (default 42)")
    parser.add_argument("--two-level", action="store_true", help="atlas: two-level instead of multi-level Infomap")
    parser.add_argument("--keep-special", action="store_true", help="graph: keep chat-template positions")


def run(args: argparse.Namespace) -> int:
    if args.graph:
        return _run_graph(args)
    return _run_atlas(args)


def _run_graph(args: argparse.Namespace) -> int:
    from circuits_core.graphio import read_graph
    from circuits_atlas.clustering import cluster_graph

    graph = read_graph(args.graph)
    result = cluster_graph(
        graph, skip_special_positions=not args.keep_special, num_trials=args.num_trials or 10, seed=args.seed
    )
    data = result.to_json()
    if args.output:
        from circuits_core.graphio import write_json

        write_json(data, args.output)
        print(f"wrote {len(result.clusters)} clusters to {args.output}")
        return 0
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"{'cluster':<10} {'size':>5} {'mean layer':>10}  members")
    for c in result.clusters:
        names = ", ".join(f"{m.node_id}{'=' + m.label[:30] if m.label else ''}" for m in c.members[:6])
        more = f" (+{len(c.members) - 6})" if len(c.members) > 6 else ""
        print(f"{c.cluster_id:<10} {len(c.members):>5} {c.mean_layer:>10.2f}  {names}{more}")
    if result.logits:
        print("logits: " + ", ".join(f"{t!r} p={p:.3f}" if p is not None else repr(t) for t, p in result.logits))
    return 0


def _run_atlas(args: argparse.Namespace) -> int:
    from circuits_atlas.build import ClusterSettings, recluster_atlas

    settings = ClusterSettings(
        min_edge_count=args.min_edge_count, weight_transform=args.weight_transform, num_trials=args.num_trials or 20,
        multi_level=not args.two_level, seed=args.seed,
    )
    path = Path(args.duckdb)
    result = recluster_atlas(
        path, settings, write=not args.dry_run, progress=lambda message: print(message, file=sys.stderr, flush=True)
    )
    stats = result.stats(top_n=20)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(
            f"{stats['clustered_units']} units in {stats['total_clusters']} top clusters "
            f"({stats['singletons']} singletons, >10: {stats['clusters_gt_10']}, max {stats['max_cluster_size']} "
            f"= {stats['max_cluster_pct']:.1f}%), codelength {stats['codelength']:.4f}, depth {stats['max_depth']}"
        )
        print(f"{'top':>5} {'size':>7} {'layers':>9} {'median':>7}")
        for c in stats["top_clusters"]:
            lo, hi = c["layer_range"]
            print(f"{c['top']:>5} {c['size']:>7} {f'{lo}-{hi}':>9} {c['median_layer']:>7.1f}")
    if not args.dry_run:
        print(f"wrote clusters into {path}", file=sys.stderr)
    return 0

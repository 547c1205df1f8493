"""`circuits build-db`: build the DuckDB atlas from the aggregator export, labels and clusters.

    circuits build-db --config atlas_config.yaml
    circuits build-db --export export/ --labels labels.jsonl --output atlas.duckdb
    circuits build-db --export export/ --connectivity connectivity/ --output atlas.duckdb
    circuits build-db --connectivity connectivity/ --edges-from weight_graph --output atlas.duckdb

Flags override the config (aggregation.export_dir, labeling.labels_path, clustering.*,
aggregation.min_edge_count, aggregation.connectivity_dir, aggregation.method, output.duckdb). With
``--edges-from weight_graph | output_projection`` (config ``aggregation.method``) the edge table is
built from the connectivity folder's weights (no traced prompts needed; every edge counts once, so
the edge-count minimums are 1) and Infomap clusters it unchanged. The atlas is written to a temporary file and renamed
into place only when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from circuits_core.errors import InvalidArgument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (aggregation / labeling / clustering / output sections)")
    parser.add_argument("--export", dest="export_dir", help="aggregator Parquet export directory (edges/units/ledger.parquet)")
    parser.add_argument("--connectivity", metavar="DIR",
                        help="`circuits connectivity` folder: adds projections and weight_edges tables "
                             "(default: aggregation.connectivity_dir)")
    parser.add_argument("--edges-from", choices=("relp", "weight_graph", "output_projection"), default=None,
                        help="source of the atlas edges (default: aggregation.method, relp)")
    parser.add_argument("--labels", help="labels JSONL (one object per neuron); default: labeling.labels_path if it exists")
    parser.add_argument("--no-labels", action="store_true", help="build without labels")
    parser.add_argument("--output", help="atlas file to write (default: output.duckdb or atlas.duckdb)")
    parser.add_argument("--min-edge-count", type=int, help="edges need this many observations (default 3)")
    parser.add_argument("--no-cluster", action="store_true", help="skip Infomap clustering")
    parser.add_argument("--num-trials", type=int, help="Infomap trials (default clustering.num_trials = 20)")
    parser.add_argument("--seed", type=int, help="Infomap seed (default 42)")
    parser.add_argument("--model", default=None, help="model name recorded in metadata (default model.name from the config)")
    parser.add_argument("--memory-limit", help="DuckDB memory limit for the build, e.g. 8GB")
    parser.add_argument("--threads", type=int, help="DuckDB threads for the build")
    parser.add_argument("--index-only", action="store_true",
                        help="only (re)write the neighbour index beside the existing atlas at --output "
                             "(an atlas built before the index existed); nothing else is rebuilt")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from circuits_core.config import Config, load_config

    cfg = load_config(args.config) if args.config else None
    if args.index_only:
        from circuits_atlas.neighbours import index_atlas

        atlas = Path(args.output) if args.output else (cfg.resolve(cfg.output.duckdb) if cfg else Path("atlas.duckdb"))
        report = index_atlas(atlas, progress=lambda step: print(f"build-db: {step} ...", file=sys.stderr, flush=True))
        print(f"wrote {report.path}: {report.edges} edges, {report.source_units} source and {report.target_units} "
              f"target units, {report.bytes / 2**20:.1f} MiB in {report.seconds:.1f} s")
        return 0
    base = cfg or Config()
    edge_source = args.edges_from or base.aggregation.method
    connectivity: Path | None = Path(args.connectivity) if args.connectivity else None
    if connectivity is None and cfg is not None and cfg.aggregation.connectivity_dir:
        connectivity = cfg.resolve(cfg.aggregation.connectivity_dir)
    if edge_source != "relp" and connectivity is None:
        raise InvalidArgument(f"edges from {edge_source} need the connectivity folder: give --connectivity DIR")
    export_dir: Path | None = Path(args.export_dir) if args.export_dir else None
    if export_dir is None and cfg is not None and edge_source == "relp":
        export_dir = cfg.resolve(cfg.aggregation.export_dir)
        state = cfg.resolve(cfg.aggregation.state_path)
        if not export_dir.is_dir() and state.is_dir() and (state / "edges.parquet").exists():
            export_dir = state
    if export_dir is None and edge_source == "relp":
        raise InvalidArgument("give --export DIR or --config with aggregation.export_dir")

    labels: Path | None = None
    if args.labels:
        labels = Path(args.labels)
    elif cfg is not None and not args.no_labels:
        candidate = cfg.resolve(cfg.labeling.labels_path)
        labels = candidate if candidate.exists() else None
    if args.no_labels:
        labels = None
    tmp_labels = None
    if labels is None and not args.no_labels and cfg is not None and cfg.labeling.method in ("neurondb", "file", "goodfire") \
            and export_dir is not None:
        labels = tmp_labels = _labels_from_source(cfg, export_dir)

    output = Path(args.output) if args.output else (cfg.resolve(cfg.output.duckdb) if cfg else Path("atlas.duckdb"))
    clustering_cfg = base.clustering
    if args.num_trials is not None:
        clustering_cfg = replace(clustering_cfg, num_trials=args.num_trials)
    if args.seed is not None:
        clustering_cfg = replace(clustering_cfg, seed=args.seed)
    min_edge_count = args.min_edge_count if args.min_edge_count is not None else base.aggregation.min_edge_count

    from circuits_atlas.build import ClusterSettings, build_atlas

    settings = ClusterSettings(
        enabled=clustering_cfg.enabled and not args.no_cluster,
        min_edge_count=clustering_cfg.min_edge_count,
        weight_transform=clustering_cfg.weight_transform,
        num_trials=clustering_cfg.num_trials,
        multi_level=clustering_cfg.multi_level,
        seed=clustering_cfg.seed,
    )
    try:
        report = _build(build_atlas, export_dir, output, labels, settings, min_edge_count, args, base, cfg,
                        connectivity=connectivity, edge_source=edge_source)
    finally:
        if tmp_labels is not None:
            tmp_labels.unlink(missing_ok=True)
    print(
        f"wrote {report.path}: {report.neurons} neurons ({report.labeled} labeled), {report.edges} edges, "
        f"{report.clusters} clusters in {report.timings['total']:.1f} s"
    )
    return 0


def _labels_from_source(cfg, export_dir: Path) -> Path:
    """Fetch labels for the export's neurons from the configured source into a temporary JSONL."""
    import tempfile

    import pyarrow.parquet as pq

    from circuits_core.labels import label_source_from_config, write_label_file

    units_file = export_dir / "units.parquet"
    if not units_file.exists():
        raise InvalidArgument(f"{export_dir}: no units.parquet in the aggregator export")
    table = pq.read_table(units_file, columns=["layer", "neuron"])
    keys = list(zip(table.column("layer").to_pylist(), table.column("neuron").to_pylist()))
    source = label_source_from_config(cfg.labeling, base_dir=cfg.base_dir)
    try:
        records = source.labels_for(keys)
    finally:
        if hasattr(source, "close"):
            source.close()
    fd, name = tempfile.mkstemp(prefix="circuits-labels-", suffix=".jsonl")
    import os

    os.close(fd)
    print(f"build-db: {len(records):,} labels from labeling.method={cfg.labeling.method}", file=sys.stderr)
    return write_label_file(records.values(), name)


def _build(build_atlas, export_dir, output, labels, settings, min_edge_count, args, base, cfg, *, connectivity, edge_source):
    if connectivity is not None and not connectivity.is_dir():
        raise InvalidArgument(f"--connectivity {connectivity}: no such folder")
    return build_atlas(
        connectivity_dir=connectivity,
        edge_source=edge_source,
        export_dir=export_dir,
        output_path=output,
        labels_path=labels,
        clustering=settings,
        min_edge_count=min_edge_count,
        model=args.model if args.model is not None else (base.model.name if cfg else ""),
        memory_limit=args.memory_limit,
        threads=args.threads,
        progress=lambda step: print(f"build-db: {step} ...", file=sys.stderr, flush=True),
    )

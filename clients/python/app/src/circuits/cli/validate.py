"""`circuits validate GRAPH.json`: faithfulness curve of a graph by ablation on its model.

Keeps only the graph's top-N nodes (by |attribution|) and ablates every other MLP neuron at the
traced positions (zero or mean), for each N in ``--sizes``; also ablates the top-N nodes alone
(removal) and random node sets of the same sizes (``--random-seeds`` seeds). Prints the curve as
a table and writes ``<output-dir>/<graph-stem>.faithfulness.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from circuits_core.errors import InvalidArgument


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {text!r}")
    return sizes


def _positions(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"positions must be comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("graph", help="graph JSON file (legacy viewer format, plain or .gz)")
    parser.add_argument("--ablation", choices=("zero", "mean"), default="zero",
                        help="replace ablated neurons by zero or by their mean activation (default: %(default)s)")
    parser.add_argument("--sizes", type=_sizes, default=(10, 20, 50, 100),
                        help="comma-separated numbers of top nodes (default: 10,20,50,100; the graph's node count is added)")
    parser.add_argument("--model", default=None, help="model name or checkpoint directory (default: the graph's model)")
    parser.add_argument("--random-seeds", type=int, default=5, help="random node sets per size (default: %(default)s)")
    parser.add_argument("--mode", choices=("real", "linearized"), default="real",
                        help="ablate in the real model or the frozen-constant RelP replacement model (default: %(default)s)")
    parser.add_argument("--output-dir", default=None, help="where to write JSON and PNG (default: next to the graph)")
    parser.add_argument("--batch-size", type=int, default=8, help="ablation masks per forward pass (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | float64 (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: %(default)s)")
    parser.add_argument("--protect-positions", type=_positions, default=(), metavar="P,...",
                        help="token positions never ablated, e.g. 0 for the attention-sink first token; "
                             "graph nodes there are skipped (default: none)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")


def run(args: argparse.Namespace) -> int:
    from circuits_core.schemas import Graph

    path = Path(args.graph)
    if not path.is_file():
        raise InvalidArgument(f"graph file {path} does not exist")
    if args.random_seeds < 0:
        raise InvalidArgument(f"--random-seeds must be >= 0, got {args.random_seeds}")
    if args.batch_size < 1:
        raise InvalidArgument(f"--batch-size must be >= 1, got {args.batch_size}")
    graph = Graph.load(path)
    model_name = args.model or graph.model
    if not model_name:
        raise InvalidArgument("the graph names no model; pass --model")

    from circuits_attribution import load_model
    from circuits_attribution.faithfulness import (
        FaithfulnessConfig,
        faithfulness_report,
        format_table,
        plot_report,
        report_warnings,
    )

    config = FaithfulnessConfig(ablation=args.ablation, sizes=args.sizes, random_seeds=args.random_seeds,
                                mode=args.mode, batch_size=args.batch_size, protect_positions=args.protect_positions)
    loaded = load_model(model_name, dtype=args.dtype, device=args.device)
    report = faithfulness_report(loaded.model, loaded.tokenizer, graph, config, model_name=model_name, progress=True)

    out_dir = Path(args.output_dir) if args.output_dir else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = path.name.removesuffix(".gz").removesuffix(".json")
    from circuits_core.graphio import VALIDATION_MARK

    suffix = f"{VALIDATION_MARK}-{args.ablation}" + ("" if args.mode == "real" else f"-{args.mode}")
    if args.protect_positions:
        suffix += "-protect" + "_".join(str(p) for p in sorted(set(args.protect_positions)))
    json_path = out_dir / f"{stem}{suffix}.json"
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2, allow_nan=True))
    tmp.replace(json_path)
    print(format_table(report))
    written = [str(json_path)]
    if not args.no_plot:
        png_path = out_dir / f"{stem}{suffix}.png"
        plot_report(report, png_path)
        written.append(str(png_path))
    for line in report_warnings(report):
        print(f"warning: {line}", file=sys.stderr)
    print("wrote " + ", ".join(written), file=sys.stderr)
    return 0

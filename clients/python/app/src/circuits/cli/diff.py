"""`circuits diff A.json B.json`: what changes between two attribution graphs of the same model.

    circuits graph "The capital of France is" --slug france
    circuits graph "The capital of Germany is" --slug germany
    circuits diff graphs/relp-france.json graphs/relp-germany.json --json diff.json --graph diff-graph.json

Prints neurons and edges only in A (lost), only in B (gained) and in both, ranked by |change| of
RelP divided by each graph's |metric|. Positions are aligned by token when both prompts have the
same number of tokens, otherwise by neuron only (the output says which). ``--graph`` writes a
viewer graph (``circuits view``) whose nodes are grouped and coloured as gained / lost / changed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from circuits_core.errors import InvalidArgument


EXAMPLES = """examples:
  circuits graph "The capital of France is" --raw --slug france
  circuits graph "The capital of Germany is" --raw --slug germany
  circuits diff graphs/relp-france.json graphs/relp-germany.json --json diff.json --graph diff-graph.json
  circuits view diff-graph.json
values are RelP / |m| of each graph; positions aligned by token when both prompts have the same
number of tokens, otherwise by neuron only (docs/connectivity.md)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("graph_a", metavar="A", help="first graph file (.json, .json.gz, .pb, .pb.gz)")
    parser.add_argument("graph_b", metavar="B", help="second graph file")
    parser.add_argument("--top", type=int, default=15, help="rows shown per table (default: %(default)s)")
    parser.add_argument("--json", dest="json_out", metavar="FILE", help="write the full diff as JSON")
    parser.add_argument("--graph", dest="graph_out", metavar="FILE",
                        help="write a viewer graph (.json/.json.gz) of the change, coloured gained/lost/changed")
    parser.add_argument("--print-json", action="store_true", help="print the diff JSON instead of the table")


def run(args: argparse.Namespace) -> int:
    from circuits_core.graphdiff import diff_graphs
    from circuits_core.graphio import read_graph

    if args.top < 0:
        raise InvalidArgument(f"--top must be >= 0, got {args.top}")
    for name in (args.graph_a, args.graph_b):
        if not Path(name).is_file():
            raise InvalidArgument(f"{name}: no such file")
    if args.graph_out and not args.graph_out.endswith((".json", ".json.gz")):
        raise InvalidArgument(f"--graph {args.graph_out}: the viewer graph is JSON (name it .json or .json.gz)")
    a, b = read_graph(args.graph_a), read_graph(args.graph_b)
    diff = diff_graphs(a, b, sources={"a": args.graph_a, "b": args.graph_b})
    if args.json_out:
        diff.save(args.json_out)
    if args.graph_out:
        diff.save_graph(args.graph_out)
    if args.print_json:
        print(json.dumps(diff.to_json(), ensure_ascii=False, indent=1))
        return 0
    print(diff.summary(top=args.top))
    written = [f for f in (args.json_out, args.graph_out) if f]
    if written:
        print("\nwrote " + ", ".join(written))
    return 0

"""Timings of the analysis stages on a large synthetic graph (no model, no LLM).

    .venv/bin/python benchmarks/analysis_bench.py [--neurons 500] [--edges 40000] [--smoke]

Prints seconds per stage and each stage's ratio to the baseline: serialising the same graph to
legacy JSON (json.dumps(graph.to_legacy())), which every stage's output needs anyway.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from circuits import analysis
from circuits_core.schemas import EMBEDDING_LAYER, Edge, Graph, Unit
from circuits.viewer import render_page


def big_graph(n_neurons: int, n_edges: int, *, n_layers: int = 30, n_pos: int = 12, seed: int = 0) -> Graph:
    rng = random.Random(seed)
    units = [Unit(layer=EMBEDDING_LAYER, index=p, position=p, kind="embedding", token=f"t{p}") for p in range(n_pos)]
    seen = set()
    while len(units) < n_pos + n_neurons:
        key = (rng.randrange(n_layers), rng.randrange(1536), rng.choice([n_pos - 1, n_pos - 1, rng.randrange(n_pos)]))
        if key not in seen:
            seen.add(key)
            units.append(Unit(layer=key[0], index=key[1], position=key[2], attribution=rng.gauss(0, 1), activation=1.0))
    units.append(Unit(layer=n_layers, index=7, position=n_pos - 1, kind="logit", token="x", probability=0.5))
    edges = {}
    while len(edges) < n_edges:
        s, t = rng.choice(units[:-1]), rng.choice(units[n_pos:])
        if s.layer < t.layer and (s.node_key, t.node_key) not in edges:
            edges[(s.node_key, t.node_key)] = Edge(src_layer=s.layer, src_index=s.index, src_position=s.position,
                                                   tgt_layer=t.layer, tgt_index=t.index, tgt_position=t.position,
                                                   weight=rng.gauss(0, 0.1))
    return Graph(units=tuple(units), edges=tuple(edges.values()), prompt="bench", prompt_tokens=tuple(f"t{p}" for p in range(n_pos)))


def timed(fn, repeat: int = 3):
    best, value = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - started)
    return best, value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--neurons", type=int, default=500)
    parser.add_argument("--edges", type=int, default=40000)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (the test suite runs this)")
    args = parser.parse_args()
    repeat = 3
    if args.smoke:
        args.neurons, args.edges, repeat = 60, 400, 1
    graph = big_graph(args.neurons, args.edges)
    # Cross-check: the graph survives the legacy JSON round trip the baseline times.
    from circuits_core.graphio import graph_from_legacy

    assert len(graph_from_legacy(json.loads(json.dumps(graph.to_legacy()))).edge_table) == len(graph.edge_table)
    base, _ = timed(lambda: json.dumps(graph.to_legacy()), repeat)
    print(f"graph: {len(graph.neurons)} neurons, {len(graph.edges)} edges")
    print(f"baseline json.dumps(to_legacy): {base:.3f} s")
    stages = {
        "label_graph (no source)": lambda: analysis.label_graph(graph, []),
        "cluster_graph (infomap)": lambda: analysis.cluster_graph(graph),
        "top_paths k=5 product": lambda: analysis.top_paths(graph, k=5),
        "top_paths k=5 sum": lambda: analysis.top_paths(graph, k=5, mode="sum"),
        "render_page": lambda: render_page(graph),
    }
    for name, fn in stages.items():
        seconds, value = timed(fn, repeat)
        extra = f" ({len(value) / 1e6:.1f} MB)" if isinstance(value, str) else ""
        print(f"{name:28s} {seconds:.3f} s  x{seconds / base:.2f} of baseline{extra}")
    print("analysis stages done")


if __name__ == "__main__":
    main()

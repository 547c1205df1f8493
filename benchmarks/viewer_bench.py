"""Cost of the viewers' influence field when writing graph JSON.

Builds a layered attribution-graph-shaped DAG (neurons over layers and positions, embeddings,
logits, forward edges), then times in the same process:
- ``graph_influence`` (one reverse-topological pass over the edge list, pure Python),
- the baseline: circuit-tracer's way, a dense |A| row-normalised and summed as the matrix series
  wᵀ(Â + Â² + …) with numpy until the powers vanish (checked equal to ours),
- the whole ``to_legacy`` (so the share of influence in writing a graph shows).

    .venv/bin/python benchmarks/viewer_bench.py [--neurons 500] [--edges 60000] [--repeat 3] [--smoke]
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from circuits_core.graphio import graph_influence
from circuits_core.schemas import EMBEDDING_LAYER, Edge, Graph, GraphMetadata, Unit


def make_graph(n_neurons: int, n_edges: int, *, n_layers: int = 30, n_pos: int = 8, seed: int = 0) -> Graph:
    rng = random.Random(seed)
    units = [Unit(layer=EMBEDDING_LAYER, index=1000 + p, position=p, kind="embedding", token=f"t{p}", attribution=rng.gauss(0, 1))
             for p in range(n_pos)]
    keys = set()
    while len(keys) < n_neurons:
        keys.add((rng.randrange(n_layers), rng.randrange(5000), rng.randrange(n_pos)))
    units += [Unit(layer=l, index=i, position=p, attribution=rng.gauss(0, 1) ** 3, activation=rng.random()) for l, i, p in sorted(keys)]
    units += [Unit(layer=n_layers, index=j, position=n_pos - 1, kind="logit", token=f"x{j}", probability=p)
              for j, p in enumerate((0.7, 0.1, 0.05, 0.03, 0.02))]
    # every causal forward pair (lower layer, same or earlier position) is a candidate edge
    pairs = [(s, t) for s in units if s.kind != "logit" for t in units
             if s.layer < t.layer and s.position <= t.position]
    edges = [Edge(src_layer=s.layer, src_index=s.index, src_position=s.position,
                  tgt_layer=t.layer, tgt_index=t.index, tgt_position=t.position, weight=rng.gauss(0, 1))
             for s, t in rng.sample(pairs, min(n_edges, len(pairs)))]
    return Graph(units=tuple(units), edges=tuple(edges), prompt="bench", prompt_tokens=tuple(f"t{p}" for p in range(n_pos)),
                 metadata=GraphMetadata(slug="bench", scan="bench"))


def dense_series(graph: Graph) -> np.ndarray:
    """circuit-tracer's computation on a dense matrix (rows = targets)."""
    row = {u.node_key: n for n, u in enumerate(graph.units)}
    n = len(graph.units)
    a = np.zeros((n, n))
    for e in graph.edges:
        a[row[e.tgt_key], row[e.src_key]] += e.weight
    a = np.abs(a)
    a /= np.clip(a.sum(axis=1, keepdims=True), 1e-10, None)
    w = np.array([u.probability if u.kind == "logit" else 0.0 for u in graph.units])
    current = w @ a
    total = current.copy()
    while current.any():
        current = current @ a
        total += current
    return total


def best_of(repeat: int, fn):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=500)
    parser.add_argument("--edges", type=int, default=60_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny size that runs in a second (the test suite runs it)")
    args = parser.parse_args()
    if args.smoke:
        args.neurons, args.edges, args.repeat = 60, 800, 1
    graph = make_graph(args.neurons, args.edges)

    t_ours, ours = best_of(args.repeat, lambda: graph_influence(graph))
    t_dense, dense = best_of(args.repeat, lambda: dense_series(graph))
    from circuits_core.influence import cumulative_shares

    expected = cumulative_shares(list(dense))
    got = [s for s, u in zip(ours.shares, graph.units) if u.kind != "logit"]
    want = [s for s, u in zip(expected, graph.units) if u.kind != "logit"]
    assert ours.basis == "graph" and np.allclose(got, want, atol=1e-9), "influence differs from the matrix series"
    t_legacy, _ = best_of(args.repeat, graph.to_legacy)

    print(f"graph: {len(graph.units):,} units, {len(graph.edges):,} edges")
    print(f"graph_influence (edge-list pass):       {t_ours * 1000:8.1f} ms")
    print(f"baseline dense matrix series (numpy):   {t_dense * 1000:8.1f} ms   ratio baseline / ours {t_dense / t_ours:.1f}x")
    print(f"whole to_legacy:                        {t_legacy * 1000:8.1f} ms   influence share {t_ours / t_legacy:.0%}")


if __name__ == "__main__":
    main()

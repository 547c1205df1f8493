"""Synthetic graphs for tests and benchmarks (no model needed).

``random_graph`` draws neurons from a skewed pool (a few neurons appear in many graphs, as in
real corpora), places some at several positions, adds embedding and logit units and links them
with random signed weights - every shape aggregation must handle.
"""

from __future__ import annotations

import numpy as np

from circuits_core.schemas import Edge, Graph, GraphMetadata, Unit


def random_graph(
    rng: np.random.Generator,
    *,
    n_neurons: int = 12,
    n_edges: int = 40,
    n_layers: int = 4,
    pool: int = 30,
    positions: int = 4,
    graph_id: str | None = None,
    corpus_index: int = -1,
) -> Graph:
    """A random graph; ``graph_id`` None -> a random id, "" -> no id (content id applies)."""
    units: list[Unit] = []
    seen: set[tuple[int, int, int]] = set()
    for _ in range(n_neurons):
        layer = int(rng.integers(0, n_layers))
        index = int(min(rng.zipf(1.5), pool) - 1) if pool else int(rng.integers(0, 1 << 20))
        pos = int(rng.integers(0, positions))
        if (layer, index, pos) in seen:
            continue
        seen.add((layer, index, pos))
        act = None if rng.random() < 0.1 else float(rng.normal())
        attr = None if rng.random() < 0.1 else float(rng.normal())
        units.append(Unit(layer=layer, index=index, position=pos, activation=act, attribution=attr))
    units.append(Unit(layer=-1, index=int(rng.integers(0, 100)), position=0, kind="embedding", token="a", activation=1.0))
    units.append(Unit(layer=n_layers, index=int(rng.integers(0, 100)), position=positions - 1, kind="logit",
                      token="b", probability=0.5))  # fmt: skip
    edges = []
    for _ in range(n_edges if len(units) > 1 else 0):
        s, t = rng.choice(len(units), size=2, replace=False)
        a, b = units[int(s)], units[int(t)]
        edges.append(Edge(src_layer=a.layer, src_index=a.index, src_position=a.position,
                          tgt_layer=b.layer, tgt_index=b.index, tgt_position=b.position,
                          weight=float(rng.normal())))  # fmt: skip
    gid = f"g{rng.integers(0, 1 << 62):016x}" if graph_id is None else graph_id
    return Graph(units=tuple(units), edges=tuple(edges), prompt="p", prompt_tokens=("a", "b"), model="m",
                 graph_id=gid, metadata=GraphMetadata(corpus_index=corpus_index))  # fmt: skip


def random_graph_proto(rng: np.random.Generator, *, n_neurons: int, n_edges: int, n_layers: int = 16,
                       pool: int = 4096, graph_id: str = "", corpus_index: int = -1):  # fmt: skip
    """A large random ``circuits.v1.Graph`` built directly with numpy (benchmarks)."""
    from circuits_core._proto.circuits.v1 import graph_pb2

    msg = graph_pb2.Graph(graph_id=graph_id or f"g{rng.integers(0, 1 << 62):016x}", model="m", prompt="p")
    layers = rng.integers(0, n_layers, n_neurons)
    index = np.minimum(rng.zipf(1.3, n_neurons), pool) - 1
    acts = rng.normal(size=n_neurons)
    for i in range(n_neurons):
        msg.units.add(layer=int(layers[i]), index=int(index[i]), position=i, kind=graph_pb2.UNIT_KIND_NEURON,
                      activation=float(acts[i]), attribution=float(acts[i]) * 0.5)  # fmt: skip
    msg.units.add(layer=-1, index=3, position=0, kind=graph_pb2.UNIT_KIND_EMBEDDING, activation=1.0)
    msg.units.add(layer=n_layers, index=7, position=n_neurons, kind=graph_pb2.UNIT_KIND_LOGIT, probability=0.5)
    n_units = n_neurons + 2
    msg.edges.src.extend(rng.integers(0, n_units, n_edges).tolist())
    msg.edges.tgt.extend(rng.integers(0, n_units, n_edges).tolist())
    msg.edges.weight.extend(rng.normal(size=n_edges).tolist())
    msg.metadata.corpus_index = corpus_index
    msg.metadata.generator = "synthetic"
    return msg

"""Synthetic attribution graphs for viewer tests (no model needed)."""

from __future__ import annotations

import random

from circuits_core.schemas import EMBEDDING_LAYER, Edge, Graph, Unit

TOKENS = ("<bos>", "The", " capital", " of", " France", " is")


def synthetic_graph(seed: int = 0, *, n_layers: int = 10, per_layer: int = 12, p_edge: float = 0.08,
                    prompt: str = "The capital of France is") -> Graph:
    """Embeddings, neurons over ``n_layers`` layers at random positions, two logits, random
    forward edges (every neuron gets at least one outgoing edge), some neurons labelled."""
    rng = random.Random(seed)
    n_pos = len(TOKENS)
    units = [Unit(layer=EMBEDDING_LAYER, index=1000 + p, position=p, kind="embedding", token=TOKENS[p],
                  activation=1.0, attribution=rng.uniform(-1, 1)) for p in range(n_pos)]
    neurons = []
    for layer in range(n_layers):
        for i in range(per_layer):
            pos = rng.choice([n_pos - 1, n_pos - 1, n_pos - 2, rng.randrange(n_pos)])
            label = f"feature {layer}.{i} <b>&" if rng.random() < 0.5 else ""
            u = Unit(layer=layer, index=rng.randrange(5000), position=pos, kind="neuron", label=label,
                     attribution=rng.gauss(0, 1) ** 3, activation=rng.uniform(0, 4), token=TOKENS[pos])
            if u.node_key not in {n.node_key for n in neurons}:
                neurons.append(u)
    units += neurons
    logits = [Unit(layer=n_layers, index=7, position=n_pos - 1, kind="logit", token=" Paris", probability=0.77),
              Unit(layer=n_layers, index=8, position=n_pos - 1, kind="logit", token=" the", probability=0.06)]
    units += logits
    edges = {}
    sources = units[:n_pos] + neurons
    for s in sources:
        later = [t for t in neurons + logits if t.layer > s.layer]
        if not later:
            continue
        picks = [t for t in later if rng.random() < p_edge] or [rng.choice(later)]
        for t in picks:
            w = rng.choice([-1, 1]) * rng.lognormvariate(-2, 1)
            edges[(s.node_key, t.node_key)] = Edge(
                src_layer=s.layer, src_index=s.index, src_position=s.position,
                tgt_layer=t.layer, tgt_index=t.index, tgt_position=t.position, weight=w)
    return Graph(units=tuple(units), edges=tuple(edges.values()), prompt=prompt, prompt_tokens=TOKENS,
                 model="synthetic")


def big_synthetic_graph(n_neurons: int, n_edges: int, *, n_layers: int = 30, seed: int = 0) -> Graph:
    """A graph of the size that breaks browsers (e.g. 50k neurons, 10M edges), built with numpy:
    neurons over ``n_layers`` layers and the prompt's positions, two logits, random forward edges
    (source layer below the target's) with heavy-tailed weights."""
    import numpy as np

    from circuits_core.edge_table import EdgeTable

    rng = np.random.default_rng(seed)
    n_pos = len(TOKENS)
    units = [Unit(layer=EMBEDDING_LAYER, index=1000 + p, position=p, kind="embedding", token=TOKENS[p],
                  activation=1.0, attribution=float(rng.uniform(-1, 1))) for p in range(n_pos)]
    layer = np.sort(rng.integers(0, n_layers, n_neurons))
    index = np.arange(n_neurons) % 8192
    position = rng.integers(0, n_pos, n_neurons)
    attribution = rng.standard_normal(n_neurons) ** 3
    units += [Unit(layer=int(layer[i]), index=int(index[i]), position=int(position[i]), kind="neuron",
                   attribution=float(attribution[i]), activation=1.0, token=TOKENS[int(position[i])],
                   label=f"feature {int(layer[i])}.{int(index[i])}" if i % 3 == 0 else "")
              for i in range(n_neurons)]
    units += [Unit(layer=n_layers, index=7, position=n_pos - 1, kind="logit", token=" Paris", probability=0.77),
              Unit(layer=n_layers, index=8, position=n_pos - 1, kind="logit", token=" the", probability=0.06)]
    u_layer = np.array([u.layer for u in units])
    u_index = np.array([u.index for u in units])
    u_pos = np.array([u.position for u in units])
    n_units = len(units)
    # sources: any non-logit unit; targets: a unit in a higher layer (neurons sorted by layer)
    order = np.argsort(u_layer, kind="stable")
    sorted_layer = u_layer[order]
    src = order[rng.integers(0, n_units - 2, n_edges)]
    first_above = np.searchsorted(sorted_layer, u_layer[src], side="right")
    tgt = order[first_above + (rng.random(n_edges) * (n_units - first_above)).astype(np.int64)]
    weight = rng.choice([-1.0, 1.0], n_edges) * rng.lognormal(-3, 1.5, n_edges)
    table = EdgeTable(src_layer=u_layer[src], src_index=u_index[src], src_position=u_pos[src],
                      tgt_layer=u_layer[tgt], tgt_index=u_index[tgt], tgt_position=u_pos[tgt], weight=weight)
    return Graph(units=units, edge_table=table, prompt="The capital of France is", prompt_tokens=TOKENS,
                 model="synthetic-big")

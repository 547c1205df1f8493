"""Infomap clustering of the whole aggregated model and of single graphs (relp-spec §G).

Both entry points are deterministic for a given input and seed: links are fed to Infomap in a
fixed order (sorted unit keys), Infomap runs single-threaded with ``--seed``.

A unit's cluster *path* lists its module at each level of the Infomap hierarchy, top first,
1-based (``"1.5.3"`` = top module 1, sub-module 5, sub-sub-module 3); the leaf node's own index
inside its module is not part of the path.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from circuits_core.errors import InvalidArgument
from circuits_core.schemas import Graph, Unit

from circuits_atlas.inputs import edge_arrays, unit_arrays

WeightTransform = Literal["abs_weight_sq", "abs_weight", "weight"]
WEIGHT_TRANSFORMS: tuple[str, ...] = ("abs_weight_sq", "abs_weight", "weight")
_KEY_SHIFT = np.int64(1 << 32)


def infomap_flags(*, num_trials: int, seed: int, multi_level: bool) -> str:
    """The Infomap command line used for the full model (§G.3)."""
    flags = f"--directed --num-trials {int(num_trials)} --seed {int(seed)} --silent"
    return flags if multi_level else flags + " --two-level"


@dataclass(frozen=True, slots=True, kw_only=True)
class FullModelClustering:
    """Infomap clusters of the aggregated model, one row per clustered unit (sorted by layer, neuron).

    ``paths[i]`` is the module path of unit ``(layers[i], neurons[i])`` as a tuple of 1-based ints.
    """

    layers: np.ndarray
    neurons: np.ndarray
    paths: tuple[tuple[int, ...], ...]
    flows: np.ndarray
    codelength: float
    num_top_modules: int
    max_depth: int
    num_links: int
    settings: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def path_strings(self) -> list[str]:
        return [".".join(map(str, p)) for p in self.paths]

    def assignments(self) -> dict[str, dict[str, Any]]:
        """Seed-compatible ``{"L{layer}/N{index}": {"path", "top", "sub", "subsub", "depth", "flow"}}``."""
        out: dict[str, dict[str, Any]] = {}
        for layer, neuron, path, flow in zip(self.layers.tolist(), self.neurons.tolist(), self.paths, self.flows.tolist()):
            out[f"L{layer}/N{neuron}"] = {
                "path": ".".join(map(str, path)),
                "top": path[0] if len(path) > 0 else None,
                "sub": path[1] if len(path) > 1 else None,
                "subsub": path[2] if len(path) > 2 else None,
                "depth": len(path),
                "flow": flow,
            }
        return out

    def stats(self, *, top_n: int = 200) -> dict[str, Any]:
        """Summary numbers of §G.6 (sizes are top-level cluster sizes)."""
        tops = [p[0] for p in self.paths]
        sizes = Counter(tops)
        layers_by_top: dict[int, list[int]] = defaultdict(list)
        for top, layer in zip(tops, self.layers.tolist()):
            layers_by_top[top].append(layer)
        n = len(self.paths)
        biggest = max(sizes.values()) if sizes else 0
        ordered = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]
        return {
            "clustered_units": n,
            "total_clusters": len(sizes),
            "singletons": sum(1 for s in sizes.values() if s == 1),
            **{f"clusters_gt_{t}": sum(1 for s in sizes.values() if s > t) for t in (2, 5, 10, 50, 100, 1000)},
            "max_cluster_size": biggest,
            "max_cluster_pct": 100.0 * biggest / n if n else 0.0,
            "codelength": self.codelength,
            "num_top_modules": self.num_top_modules,
            "max_depth": self.max_depth,
            "num_links": self.num_links,
            "top_clusters": [
                {
                    "top": top,
                    "size": size,
                    "layer_range": [min(layers_by_top[top]), max(layers_by_top[top])],
                    "median_layer": float(np.median(layers_by_top[top])),
                }
                for top, size in ordered
            ],
        }


def link_weights(weight_sum: np.ndarray, weight_abs_sum: np.ndarray, count: np.ndarray, transform: str) -> np.ndarray:
    """Directed link weight per edge (§G.4): mean |w| squared, mean |w|, or |mean w|."""
    safe = np.maximum(count, 1).astype(np.float64)
    if transform == "abs_weight_sq":
        return (weight_abs_sum / safe) ** 2
    if transform == "abs_weight":
        return weight_abs_sum / safe
    if transform == "weight":
        return np.abs(weight_sum / safe)
    raise InvalidArgument(f"weight_transform must be one of {', '.join(WEIGHT_TRANSFORMS)}, got {transform!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class InfomapInput:
    """The network handed to Infomap: node i is unit ``(layers[i], neurons[i])``; links [n, 3]."""

    layers: np.ndarray
    neurons: np.ndarray
    links: np.ndarray


def full_model_network(
    edges: Any,
    units: Any,
    *,
    min_edge_count: int = 5,
    weight_transform: str = "abs_weight_sq",
) -> InfomapInput:
    """Steps 1, 2 and 4 of §G: filter edges and units, index units, weight links (vectorised)."""
    if weight_transform not in WEIGHT_TRANSFORMS:
        raise InvalidArgument(f"weight_transform must be one of {', '.join(WEIGHT_TRANSFORMS)}, got {weight_transform!r}")
    if min_edge_count < 0:
        raise InvalidArgument(f"min_edge_count must be >= 0, got {min_edge_count}")
    e = edge_arrays(edges)
    u = unit_arrays(units)
    known = np.unique(u.layer * _KEY_SHIFT + u.neuron)
    src = e.src_layer * _KEY_SHIFT + e.src_neuron
    tgt = e.tgt_layer * _KEY_SHIFT + e.tgt_neuron

    def is_known(keys: np.ndarray) -> np.ndarray:
        if len(known) == 0:
            return np.zeros(len(keys), dtype=bool)
        pos = np.minimum(np.searchsorted(known, keys), len(known) - 1)
        return known[pos] == keys

    keep = (e.count >= min_edge_count) & is_known(src) & is_known(tgt)
    src, tgt = src[keep], tgt[keep]
    weights = link_weights(e.weight_sum[keep], e.weight_abs_sum[keep], e.count[keep], weight_transform)
    # Units need more than one kept edge (in + out) to be clustered.
    endpoint_keys, degree = np.unique(np.concatenate([src, tgt]), return_counts=True)
    nodes = endpoint_keys[degree > 1]  # sorted (layer, neuron) order = node index
    src_idx = np.searchsorted(nodes, src)
    tgt_idx = np.searchsorted(nodes, tgt)
    in_nodes = (src_idx < len(nodes)) & (tgt_idx < len(nodes))
    in_nodes[in_nodes] &= (nodes[src_idx[in_nodes]] == src[in_nodes]) & (nodes[tgt_idx[in_nodes]] == tgt[in_nodes])
    positive = in_nodes & (weights > 0)
    links = np.empty((int(positive.sum()), 3), dtype=np.float64)
    links[:, 0] = src_idx[positive]
    links[:, 1] = tgt_idx[positive]
    links[:, 2] = weights[positive]
    # Fixed link order (by source, then target) so the result depends only on the edge set.
    order = np.lexsort((links[:, 1], links[:, 0]))
    return InfomapInput(layers=nodes // _KEY_SHIFT, neurons=nodes % _KEY_SHIFT, links=links[order])


def _check_run_settings(*, num_trials: int, seed: int) -> None:
    if num_trials < 1:
        raise InvalidArgument(f"num_trials must be >= 1, got {num_trials}")
    if seed < 1:
        raise InvalidArgument(f"Infomap seed must be >= 1, got {seed}")


def run_infomap(links: np.ndarray, flags: str) -> Any:
    """Run Infomap on an [n, 3] (source, target, weight) array; return its Result object."""
    import infomap

    im = infomap.Infomap(flags)
    if len(links):
        im.add_links(links)
    return im.run()


def cluster_full_model(
    edges: Any,
    units: Any,
    *,
    min_edge_count: int = 5,
    weight_transform: WeightTransform = "abs_weight_sq",
    num_trials: int = 20,
    multi_level: bool = True,
    seed: int = 42,
) -> FullModelClustering:
    """Cluster the aggregated model with directed Infomap (relp-spec §G, full model).

    ``edges``: aggregated edges (pyarrow Table / column mapping / ``edges.parquet`` path /
    iterable of :class:`~circuits_core.schemas.Edge` with running sums); ``units``: the known units
    (same forms, or :class:`~circuits_core.schemas.Unit`). Keeps edges with ``count >= min_edge_count``
    between known units, then units with more than one kept edge; links weigh
    ``weight_transform`` of the edge statistics and only positive weights enter. Same input and
    seed give the same clusters.
    """
    _check_run_settings(num_trials=num_trials, seed=seed)
    network = full_model_network(edges, units, min_edge_count=min_edge_count, weight_transform=weight_transform)
    settings = {
        "min_edge_count": min_edge_count,
        "weight_transform": weight_transform,
        "num_trials": num_trials,
        "multi_level": multi_level,
        "seed": seed,
    }
    if len(network.links) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return FullModelClustering(
            layers=empty, neurons=empty, paths=(), flows=np.zeros(0), codelength=0.0,
            num_top_modules=0, max_depth=0, num_links=0, settings=settings,
        )  # fmt: skip
    result = run_infomap(network.links, infomap_flags(num_trials=num_trials, seed=seed, multi_level=multi_level))
    by_node: dict[int, tuple[tuple[int, ...], float]] = {}
    for node in result.nodes():
        by_node[node.node_id] = (tuple(node.path[:-1]) or (1,), node.flow)
    ids = np.array(sorted(by_node), dtype=np.int64)
    paths = tuple(by_node[i][0] for i in ids.tolist())
    return FullModelClustering(
        layers=network.layers[ids],
        neurons=network.neurons[ids],
        paths=paths,
        flows=np.array([by_node[i][1] for i in ids.tolist()], dtype=np.float64),
        codelength=float(result.codelength),
        num_top_modules=int(result.num_top_modules),
        max_depth=max((len(p) for p in paths), default=0),
        num_links=len(network.links),
        settings=settings,
    )


# ------------------------------------------------------------------------------------------
# Single graph (§G single graph)
# ------------------------------------------------------------------------------------------
_CHAT_MARKER = re.compile(r"<\|[^|]*\|>|\[/?INST\]|<</?SYS>>|<s>|</s>")
_ROLE_WORDS = ("system", "user", "assistant")


def is_special_position(tokens: Sequence[str], position: int | None) -> bool:
    """True for chat-template positions: a chat marker or role word anywhere, or a
    newline/empty token among the first 10 positions."""
    if position is None or not 0 <= position < len(tokens):
        return False
    token = tokens[position]
    lowered = token.lower()
    if _CHAT_MARKER.search(token) or any(word in lowered for word in _ROLE_WORDS):
        return True
    return position < 10 and (token.strip() == "" or "\n" in token or "Ċ" in token)


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphClusterMember:
    node_id: str
    layer: int
    neuron: int
    position: int | None
    token: str
    label: str
    influence: float | None
    activation: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphCluster:
    """A leaf cluster of one graph; ``cluster_id`` like ``"2.1"`` (module 2, sub-module 1)."""

    cluster_id: str
    mean_layer: float
    members: tuple[GraphClusterMember, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphClustering:
    """Leaf clusters sorted by mean layer, plus the graph's logits ``(token, probability)``."""

    clusters: tuple[GraphCluster, ...]
    logits: tuple[tuple[str, float | None], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "clusters": [
                {
                    "cluster_id": c.cluster_id,
                    "mean_layer": c.mean_layer,
                    "size": len(c.members),
                    "members": [
                        {
                            "node_id": m.node_id, "layer": m.layer, "neuron": m.neuron, "position": m.position,
                            "token": m.token, "label": m.label, "influence": m.influence, "activation": m.activation,
                        }  # fmt: skip
                        for m in c.members
                    ],
                }
                for c in self.clusters
            ],
            "logits": [{"token": t, "probability": p} for t, p in self.logits],
        }


def _two_level_modules(links: list[tuple[int, int, float]], *, num_trials: int, seed: int) -> dict[int, int]:
    arr = np.array(links, dtype=np.float64).reshape(-1, 3)
    result = run_infomap(arr, f"--two-level --directed --num-trials {num_trials} --seed {seed} --silent")
    return {node.node_id: node.module_id for node in result.nodes()}


def cluster_graph(
    graph: Graph,
    *,
    skip_special_positions: bool = True,
    num_trials: int = 10,
    seed: int = 42,
    max_depth: int = 3,
    min_split_size: int = 10,
) -> GraphClustering:
    """Cluster one attribution graph's neurons (relp-spec §G, single graph).

    Neurons only (embeddings, logits and, by default, chat-template positions are skipped);
    links weigh ``|w|``; two-level directed Infomap; clusters with at least ``min_split_size``
    members are re-clustered inside up to ``max_depth`` levels, keeping a split only when it
    yields more than one sub-cluster. Neurons without a kept link are not clustered.
    """
    _check_run_settings(num_trials=num_trials, seed=seed)
    tokens = graph.prompt_tokens
    member_rows = [
        row
        for row, u in enumerate(graph.units)
        if u.kind == "neuron" and not (skip_special_positions and is_special_position(tokens, u.position))
    ]
    members: list[Unit] = [graph.units[row] for row in member_rows]
    member_of = np.full(len(graph.units), -1, dtype=np.int64)
    member_of[member_rows] = np.arange(len(member_rows))
    src_rows, tgt_rows = graph.edge_table.endpoint_rows(graph.units)
    src_member, tgt_member, weight = member_of[src_rows], member_of[tgt_rows], graph.edge_table.weight
    keep = (src_member >= 0) & (tgt_member >= 0) & (src_member != tgt_member) & (weight != 0) & np.isfinite(weight)
    links: list[tuple[int, int, float]] = list(
        zip(src_member[keep].tolist(), tgt_member[keep].tolist(), np.abs(weight[keep]).tolist())
    )
    links.sort()

    def split(node_ids: list[int], prefix: str, depth: int) -> list[tuple[str, list[int]]]:
        local = {n: i for i, n in enumerate(node_ids)}
        sub_links = [(local[s], local[t], w) for s, t, w in links if s in local and t in local]
        if not sub_links:
            return [(prefix, node_ids)] if prefix else []
        modules = _two_level_modules(sub_links, num_trials=num_trials, seed=seed)
        groups: dict[int, list[int]] = defaultdict(list)
        for local_id, module in sorted(modules.items()):
            groups[module].append(node_ids[local_id])
        if prefix and len(groups) <= 1:
            return [(prefix, node_ids)]
        out: list[tuple[str, list[int]]] = []
        for module in sorted(groups):
            child = f"{prefix}.{module}" if prefix else str(module)
            group = groups[module]
            if depth < max_depth and len(group) >= min_split_size:
                out.extend(split(group, child, depth + 1))
            else:
                out.append((child, group))
        return out

    leaves = split(list(range(len(members))), "", 1) if members else []
    clusters = []
    for cluster_id, node_ids in leaves:
        units = [members[i] for i in node_ids]
        clusters.append(
            GraphCluster(
                cluster_id=cluster_id,
                mean_layer=float(np.mean([u.layer for u in units])),
                members=tuple(
                    GraphClusterMember(
                        node_id=u.node_id,
                        layer=u.layer,
                        neuron=u.index,
                        position=u.position,
                        token=u.token or (tokens[u.position] if u.position is not None and 0 <= u.position < len(tokens) else ""),
                        label=u.label,
                        influence=u.attribution,
                        activation=u.activation,
                    )
                    for u in sorted(units, key=lambda u: (u.layer, u.index, u.position or 0))
                ),
            )
        )
    clusters.sort(key=lambda c: (c.mean_layer, c.cluster_id))
    return GraphClustering(clusters=tuple(clusters), logits=tuple((u.token, u.probability) for u in graph.logits))


def iter_cluster_prefixes(path: Iterable[int]) -> Iterable[str]:
    """``(1, 5, 3)`` -> ``"1"``, ``"1.5"``, ``"1.5.3"``."""
    parts: list[str] = []
    for p in path:
        parts.append(str(p))
        yield ".".join(parts)

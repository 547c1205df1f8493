"""Clusters of one graph's neurons as supernodes (relp-spec §G).

The clustering itself is injected (a :data:`GraphClusterer`); the default is the atlas's
single-graph Infomap clustering (``circuits_atlas.clustering.cluster_graph``), the one
implementation. Without the atlas part it ends in the one-line ``circuits.extras`` error.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from circuits_core.schemas import Graph

#: Graph -> leaf clusters as (cluster_id, member node ids).
GraphClusterer = Callable[[Graph], Sequence[tuple[str, Sequence[str]]]]


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterInfo:
    """One leaf cluster of a graph's neurons."""

    cluster_id: str
    node_ids: tuple[str, ...]
    mean_layer: float
    layers: tuple[int, int]
    #: Token positions the members sit at, most members first: ((position, token, count), ...).
    positions: tuple[tuple[int, str, int], ...]
    total_abs_attribution: float

    @property
    def name(self) -> str:
        """The supernode label: ``C{id} L{lo}-L{hi}``."""
        lo, hi = self.layers
        return f"C{self.cluster_id} L{lo}" + (f"-L{hi}" if hi != lo else "")


def atlas_clusters(graph: Graph) -> list[tuple[str, list[str]]]:
    """The atlas's Infomap clustering of one graph (default settings), as (cluster_id, node ids)."""
    from circuits.extras import require

    clustering = require("circuits_atlas.clustering", what="clustering a graph")
    return [(c.cluster_id, [m.node_id for m in c.members]) for c in clustering.cluster_graph(graph).clusters]


def cluster_graph(graph: Graph, clusterer: GraphClusterer = atlas_clusters) -> list[ClusterInfo]:
    """The graph's neuron clusters by ``clusterer``, described and sorted by mean layer."""
    by_id = {u.node_id: u for u in graph.units}
    tokens = graph.prompt_tokens
    out = []
    for cluster_id, node_ids in clusterer(graph):
        members = [by_id[n] for n in node_ids if n in by_id]
        if not members:
            continue
        layers = [u.layer for u in members]
        counts = Counter(u.position for u in members if u.position is not None)
        positions = tuple(
            (p, tokens[p] if 0 <= p < len(tokens) else "", c)
            for p, c in sorted(counts.items(), key=lambda pc: (-pc[1], pc[0]))
        )
        out.append(ClusterInfo(
            cluster_id=str(cluster_id),
            node_ids=tuple(u.node_id for u in members),
            mean_layer=sum(layers) / len(layers),
            layers=(min(layers), max(layers)),
            positions=positions,
            total_abs_attribution=sum(abs(u.attribution or 0.0) for u in members),
        ))
    out.sort(key=lambda c: (c.mean_layer, _natural(c.cluster_id)))
    return out


def _natural(cluster_id: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in cluster_id.split("."))


def with_clusters(graph: Graph, clusters: Sequence[ClusterInfo]) -> Graph:
    """A copy whose neurons carry ``cluster`` ids and whose ``qParams.supernodes`` list the clusters."""
    cluster_of = {n: c.cluster_id for c in clusters for n in c.node_ids}
    units = tuple(replace(u, cluster=cluster_of.get(u.node_id, u.cluster)) for u in graph.units)
    extra = dict(graph.metadata.extra)
    q_params = dict(extra.get("qParams") or {})
    q_params["supernodes"] = [[c.name, *c.node_ids] for c in clusters]
    extra["qParams"] = q_params
    return replace(graph, units=units, metadata=replace(graph.metadata, extra=extra))

"""Big graphs served server-side: a pruned first view, and neighbourhoods fetched on demand.

A graph with tens of thousands of nodes and millions of edges does not fit in a browser tab as
viewer JSON. For such a graph ``circuits view`` sends a pruned view instead: the embeddings and
logits, the neurons carrying the first ``node_threshold`` of the cumulative influence (capped at
``max_nodes``, most influential first), and the strongest ``max_edges`` edges among them. Every
node keeps the influence share it has in the *whole* graph, so the page's node filter means the
same as for a small graph. A click on a node fetches its neighbourhood (its strongest incident
edges and their other ends, ``/neighbourhood/<graph>?node=<node_id>``), which the page merges in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from circuits_core.errors import NotFound
from circuits_core.schemas import Graph

#: Graphs with more edges than this are served as a pruned view with neighbourhoods on demand.
BIG_GRAPH_EDGES = 200_000
#: Neurons and edges in the first view of a big graph.
FIRST_VIEW_NODES = 600
FIRST_VIEW_EDGES = 6_000
#: Edges of one neighbourhood (the strongest incident edges of the clicked node).
NEIGHBOURHOOD_EDGES = 150


@dataclass(frozen=True, slots=True, kw_only=True)
class ViewLimits:
    """How much of a big graph one response carries."""

    first_nodes: int = FIRST_VIEW_NODES
    first_edges: int = FIRST_VIEW_EDGES
    neighbourhood_edges: int = NEIGHBOURHOOD_EDGES
    node_threshold: float = 0.8


class BigGraphView:
    """One big graph held server-side (columnar edges, numpy) with its whole-graph influence."""

    def __init__(self, graph: Graph, *, name: str, limits: ViewLimits = ViewLimits()) -> None:
        from circuits_core.graphio import graph_influence

        self.graph = graph
        self.name = name
        self.limits = limits
        self.src, self.tgt = graph.edge_table.endpoint_rows(graph.units)
        self.weight = graph.edge_table.weight
        self.influence = graph_influence(graph)
        self.shares = np.array([np.inf if s is None else s for s in self.influence.shares])
        self.node_ids = [u.node_id for u in graph.units]
        self._row_of = {node_id: n for n, node_id in enumerate(self.node_ids)}
        # incident edges of every node, strongest first (one argsort, then stable groupings)
        by_strength = np.argsort(-np.abs(self.weight), kind="stable")
        self._incident: dict[int, np.ndarray] = {}
        ends = np.concatenate([self.src[by_strength], self.tgt[by_strength]])
        edges = np.concatenate([by_strength, by_strength])
        order = np.argsort(ends, kind="stable")
        self._ends, self._edges = ends[order], edges[order]
        self._starts = np.searchsorted(self._ends, np.arange(len(graph.units) + 1))

    @property
    def n_nodes(self) -> int:
        return len(self.graph.units)

    @property
    def n_edges(self) -> int:
        return len(self.weight)

    def _legacy(self, rows: np.ndarray, edges: np.ndarray) -> dict[str, Any]:
        """Viewer JSON of the units ``rows`` and the edges ``edges`` (indices into the whole graph)."""
        from circuits_core.edge_table import EdgeTable
        from circuits_core.graphio import graph_to_legacy

        rows = np.unique(np.concatenate([rows, self.src[edges], self.tgt[edges]])) if len(edges) else np.unique(rows)
        t = self.graph.edge_table
        table = EdgeTable(
            src_layer=t.src_layer[edges], src_index=t.src_index[edges], src_position=t.src_position[edges],
            tgt_layer=t.tgt_layer[edges], tgt_index=t.tgt_index[edges], tgt_position=t.tgt_position[edges],
            weight=t.weight[edges], raw_weight=t.raw_weight[edges],
        )  # fmt: skip
        units = [self.graph.units[int(n)] for n in rows]
        sub = Graph(units=units, edge_table=table, prompt=self.graph.prompt, prompt_tokens=self.graph.prompt_tokens,
                    model=self.graph.model, graph_id=self.graph.graph_id, metadata=self.graph.metadata)
        legacy = graph_to_legacy(sub)
        for node, n in zip(legacy["nodes"], rows):  # whole-graph shares, not the subgraph's
            legacy_share = self.influence.shares[int(n)]
            node["influence"] = legacy_share
        return legacy

    def first_view(self) -> dict[str, Any]:
        """The pruned view the page opens with (see the module docstring)."""
        lim = self.limits
        kinds = np.array([u.kind for u in self.graph.units])
        always = np.flatnonzero(kinds != "neuron")
        neurons = np.flatnonzero((kinds == "neuron") & (self.shares <= lim.node_threshold))
        if neurons.size < min(lim.first_nodes, int((kinds == "neuron").sum())):  # thin graphs: most influential
            neurons = np.flatnonzero(kinds == "neuron")
        neurons = neurons[np.argsort(self.shares[neurons], kind="stable")][: lim.first_nodes]
        keep = np.zeros(self.n_nodes, dtype=bool)
        keep[always] = keep[neurons] = True
        inside = np.flatnonzero(keep[self.src] & keep[self.tgt])
        inside = inside[np.argsort(-np.abs(self.weight[inside]), kind="stable")][: lim.first_edges]
        legacy = self._legacy(np.flatnonzero(keep), inside)
        legacy["metadata"]["subgraph"] = {
            "nodes": self.n_nodes, "edges": self.n_edges, "shown_nodes": len(legacy["nodes"]),
            "shown_edges": len(legacy["links"]), "neighbourhood": "/neighbourhood/" + self.name,
            "neighbourhood_edges": lim.neighbourhood_edges,
        }
        return legacy

    def neighbourhood(self, node_id: str) -> dict[str, Any]:
        """The node, its strongest ``neighbourhood_edges`` incident edges and their other ends."""
        row = self._row_of.get(node_id)
        if row is None:
            raise NotFound(f"no node {node_id!r} in this graph")
        edges = self._edges[self._starts[row]:self._starts[row + 1]]  # strongest first
        edges = np.unique(edges[: self.limits.neighbourhood_edges])
        legacy = self._legacy(np.array([row]), edges)
        return {"node_id": node_id, "degree": int(self._starts[row + 1] - self._starts[row]),
                "nodes": legacy["nodes"], "links": legacy["links"]}

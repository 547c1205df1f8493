"""What an AI agent can ask the atlas, as compact, bounded JSON (the tools of ``circuits mcp``).

:class:`AtlasTools` answers over any :class:`~circuits_core.capabilities.AtlasQueries`: the
in-process :class:`circuits_atlas.database.CircuitDatabase` or the SDK's
:class:`circuits_sdk.atlas.AtlasClient`. With a :class:`~circuits_core.capabilities.Tracer` it also
traces a prompt and summarises the graph to its top neurons, labelled from the atlas. No MCP import here: the MCP
server (``circuits.cli.mcp``) only registers these methods as tools.

Every answer is a plain dict of JSON types with bounded size: result counts are capped, long
texts are cut to :data:`MAX_TEXT` characters. Bad arguments raise
:class:`~circuits_core.errors.InvalidArgument`, absent units/clusters
:class:`~circuits_core.errors.NotFound`; the caller turns them into tool errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from circuits_core.atlas_types import EDGE_DIRECTIONS, ClusterInfo, UnitCard
from circuits_core.capabilities import AtlasQueries, Tracer
from circuits_core.errors import InvalidArgument, NotFound
from circuits_core.schemas import Unit
from circuits_core.tracing import TraceRequest

#: Longest label / description text in an answer (characters).
MAX_TEXT = 300
MAX_SEARCH = 50
MAX_NEIGHBOURS = 25
MAX_MEMBERS = 100
MAX_TRACE_NEURONS = 50
#: Most metadata entries in atlas_stats.
MAX_METADATA = 40


def _text(value: str) -> str:
    value = " ".join(value.split())
    return value if len(value) <= MAX_TEXT else value[: MAX_TEXT - 3] + "..."


def _number(value: float | None, digits: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def _bounded(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _cluster_json(info: ClusterInfo) -> dict[str, Any]:
    return {
        "path": info.cluster_path, "level": info.level, "size": info.size,
        "layers": [info.layer_min, info.layer_max], "median_layer": _number(info.median_layer),
    }  # fmt: skip


def unit_brief(unit: Unit) -> dict[str, Any]:
    """The few fields that name a unit in a list."""
    out: dict[str, Any] = {"unit": unit.unit_id, "label": _text(unit.label)}
    if unit.input_label:
        out["input_label"] = _text(unit.input_label)
    return out


class AtlasTools:
    """Agent-facing atlas queries; ``attribution`` (a Tracer, e.g. an AttributionClient) enables :meth:`trace_prompt`."""

    def __init__(self, atlas: AtlasQueries, *, attribution: Tracer | None = None, timeout: float | None = 30.0) -> None:
        self.atlas = atlas
        self.attribution = attribution
        self.timeout = timeout

    # -- helpers ------------------------------------------------------------------------------
    def _unit_or_none(self, layer: int, index: int) -> Unit | None:
        return self.atlas.get_unit(layer, index, timeout=self.timeout)

    def _card(self, layer: int, neuron: int) -> UnitCard:
        card = self.atlas.get_unit_card(layer, neuron, timeout=self.timeout)
        if card is None:
            raise NotFound(f"unit L{layer}/N{neuron} is not in the atlas")
        return card

    # -- tools ------------------------------------------------------------------------------
    def search_units(self, text: str, limit: int = 10) -> dict[str, Any]:
        """Units whose labels match ``text`` (BM25 over label words, then substring), best first."""
        limit = _bounded(limit, "limit", 1, MAX_SEARCH)
        hits = self.atlas.search(text, limit, timeout=self.timeout)
        units = []
        for hit in hits:
            item = {**unit_brief(hit.unit), "score": _number(hit.score, 4), "appearances": hit.unit.appearance_count}
            if hit.unit.cluster:
                item["cluster"] = hit.unit.cluster
            confidences = [lab.confidence for lab in hit.unit.labels if lab.confidence]
            if confidences:
                item["label_confidence"] = confidences[0][:40]
            units.append(item)
        return {"query": _text(text), "count": len(units), "units": units}

    def unit_card(self, layer: int, neuron: int) -> dict[str, Any]:
        """One unit's labels, activation statistics, cluster and edge counts."""
        card = self._card(layer, neuron)
        unit, stats = card.unit, card.stats
        labels = []
        for lab in unit.labels[:6]:
            entry = {"text": _text(lab.text), "source": lab.source}
            if lab.confidence:
                entry["confidence"] = lab.confidence[:40]
            if lab.description:
                entry["description"] = _text(lab.description)
            labels.append(entry)
        activation = {
            "observations": stats.observation_count,
            "mean_activation": _number(stats.mean_activation),
            "max_activation": _number(stats.max_activation),
            "mean_attribution": _number(stats.mean_attribution),
            "output_norm": _number(stats.output_norm),
            "num_exemplars": stats.num_exemplars,
        }
        return {
            **unit_brief(unit),
            "layer": unit.layer,
            "neuron": unit.index,
            "labels": labels,
            "appearances": unit.appearance_count,
            "activation": {k: v for k, v in activation.items() if v is not None},
            "cluster": None if card.cluster is None else _cluster_json(card.cluster),
            "edges": {"downstream": card.downstream_edges, "upstream": card.upstream_edges},
        }

    def unit_neighbours(self, layer: int, neuron: int, direction: str = "both", limit: int = 10, min_count: int = 0) -> dict[str, Any]:
        """The unit's strongest downstream (it feeds) and upstream (feed it) neighbours, most frequent first."""
        if direction not in EDGE_DIRECTIONS:
            raise InvalidArgument(f"direction must be one of {', '.join(EDGE_DIRECTIONS)}, got {direction!r}")
        limit = _bounded(limit, "limit", 1, MAX_NEIGHBOURS)
        min_count = _bounded(min_count, "min_count", 0, 2**62)
        unit = self._unit_or_none(layer, neuron)
        if unit is None:
            raise NotFound(f"unit L{layer}/N{neuron} is not in the atlas")
        edges = self.atlas.get_edges_for_unit(layer, neuron, direction, limit, min_count, timeout=self.timeout)
        out: dict[str, Any] = {**unit_brief(unit)}
        sides = ("downstream", "upstream") if direction == "both" else (direction,)
        for side in sides:
            out[side] = []
        labels: dict[tuple[int, int], str] = {}
        for edge in edges:
            side = "downstream" if (edge.src_layer, edge.src_index) == (layer, neuron) else "upstream"
            if side not in out:
                continue
            other = (edge.tgt_layer, edge.tgt_index) if side == "downstream" else (edge.src_layer, edge.src_index)
            if other not in labels:
                found = self._unit_or_none(*other)
                labels[other] = "" if found is None else found.label
            out[side].append(
                {
                    "unit": f"L{other[0]}/N{other[1]}",
                    "label": _text(labels[other]),
                    "count": edge.count,
                    "mean_weight": _number(edge.weight),
                    "mean_abs_weight": _number(edge.mean_abs_weight),
                }
            )
        return out

    def cluster_members(self, cluster: str, limit: int = 25) -> dict[str, Any]:
        """An Infomap cluster (``"3"`` or a path like ``"3.1"``) and its member units by layer."""
        limit = _bounded(limit, "limit", 1, MAX_MEMBERS)
        members = self.atlas.get_cluster(str(cluster), limit, timeout=self.timeout)
        return {
            "cluster": _cluster_json(members.cluster),
            "members": [unit_brief(u) for u in members.units],
            "truncated": len(members.units) < members.cluster.size,
        }

    def atlas_stats(self) -> dict[str, Any]:
        """Row counts and (up to 40) build metadata entries of the atlas."""
        stats = self.atlas.stats(timeout=self.timeout)
        metadata = {k: _text(str(v)) for k, v in sorted(stats.metadata.items())[:MAX_METADATA]}
        return {"neurons": stats.neurons, "edges": stats.edges, "clusters": stats.clusters, "metadata": metadata}

    def trace_prompt(self, prompt: str, top: int = 15, k: int = 0) -> dict[str, Any]:
        """Trace a prompt on the attribution server (``k`` 0: TraceRequest's default); the graph
        summarised to its top neurons by |attribution|, each with the atlas label when the atlas has one."""
        if self.attribution is None:
            raise InvalidArgument("no attribution endpoint configured (start `circuits mcp` with --attribution HOST:PORT)")
        top = _bounded(top, "top", 1, MAX_TRACE_NEURONS)
        k = _bounded(k, "k", 0, 50)
        graph = self.attribution.trace(TraceRequest(prompt=prompt, **({"k": k} if k else {})))
        neurons = sorted(graph.neurons, key=lambda u: -abs(u.attribution or 0.0))[:top]
        atlas_labels: dict[tuple[int, int], str] = {}
        for unit in neurons:
            if unit.key not in atlas_labels:
                found = self._unit_or_none(*unit.key)
                atlas_labels[unit.key] = "" if found is None else found.label
        tokens = graph.prompt_tokens
        summary = []
        for unit in neurons:
            item: dict[str, Any] = {
                "unit": unit.unit_id,
                "position": unit.position,
                "attribution": _number(unit.attribution),
                "activation": _number(unit.activation),
            }
            if unit.position is not None and 0 <= unit.position < len(tokens):
                item["token"] = tokens[unit.position][:40]
            label = atlas_labels[unit.key] or unit.label
            if label:
                item["label"] = _text(label)
            summary.append(item)
        return {
            "prompt": _text(graph.prompt or prompt),
            "model": graph.model,
            "metric": _number(graph.metadata.metric_value),
            "targets": [{"token": u.token[:40], "probability": _number(u.probability, 4)} for u in graph.logits[:10]],
            "neurons_in_graph": len(graph.neurons),
            "edges_in_graph": len(graph.edge_table),
            "top_neurons": summary,
        }

    def tools(self) -> dict[str, Callable[..., dict[str, Any]]]:
        """Tool name -> bound method (trace_prompt only with an attribution client)."""
        out = {
            "search_units": self.search_units,
            "unit_card": self.unit_card,
            "unit_neighbours": self.unit_neighbours,
            "cluster_members": self.cluster_members,
            "atlas_stats": self.atlas_stats,
        }
        if self.attribution is not None:
            out["trace_prompt"] = self.trace_prompt
        return out

"""Graph diff: what changes between two attribution graphs (owner of the diff JSON file).

``diff_graphs(a, b)`` compares two graphs of the same model, typically a prompt and a minimal
variant ("France" vs "Germany"):

* **alignment**: when both prompts have the same number of tokens, nodes are matched by token
  position (a neuron is ``(layer, index, position)``, an embedding is its position, a logit its
  token at the target position); otherwise by neuron only (positions collapsed: a neuron's RelP is
  summed over its positions, embeddings and logits are matched by token id). The diff says which.
* **values**: each graph's RelP attributions and edge weights are divided by ``|m|``, the absolute
  value of that graph's own metric (``metadata.metric_value``), so two graphs with different metric
  sizes compare as fractions of their metric; without a metric value in both graphs the raw values
  are compared (stated as ``normalisation: "none"``).
* **status**: ``lost`` (only in A), ``gained`` (only in B), ``changed`` (in both); ``change = B - A``
  (absent counts as 0). Units and edges are ranked by ``|change|``.

Outputs: :meth:`GraphDiff.to_json` (the diff file, format ``circuits.graph_diff``),
:meth:`GraphDiff.summary` (a table) and :meth:`GraphDiff.to_legacy_graph` (a viewer graph whose
node attribution / edge weight is the change, nodes grouped as gained / lost / changed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from circuits_core.errors import CorruptInput, InvalidArgument
from circuits_core.schemas import EMBEDDING_LAYER, Graph, GraphMetadata, Unit, slugify

FORMAT = "circuits.graph_diff"
VERSION = 1
STATUSES = ("gained", "lost", "changed")

#: A node key: (kind, layer, index, position); layer/index/position may be None (see module doc).
NodeKey = tuple[str, int | None, int | None, int | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitChange:
    """One node of either graph: its normalised RelP in A and B and the change."""

    kind: str
    layer: int
    index: int
    position: int | None
    status: str
    a: float
    b: float
    change: float
    token_a: str = ""
    token_b: str = ""
    label: str = ""
    #: Logits: the token's probability in B (in A when only A has it).
    probability: float | None = None

    @property
    def name(self) -> str:
        where = "" if self.position is None else f"@{self.position}"
        if self.kind == "embedding":
            tokens = self.token_a if self.token_a == self.token_b or not self.token_b else (
                self.token_b if not self.token_a else f"{self.token_a}->{self.token_b}")
            return f"E{where} {tokens!r}"
        if self.kind == "logit":
            return f"logit {(self.token_b or self.token_a)!r}"
        return f"L{self.layer}/N{self.index}{where}"


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeChange:
    """One edge of either graph (endpoints as node keys), normalised weights and the change."""

    source: NodeKey
    target: NodeKey
    status: str
    a: float
    b: float
    change: float


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphDiff:
    """The comparison of graph A with graph B (module docstring)."""

    model: str
    prompt_a: str
    prompt_b: str
    tokens_a: tuple[str, ...]
    tokens_b: tuple[str, ...]
    #: "token" (same token count: matched by position) or "neuron" (positions collapsed)
    alignment: str
    #: "metric" (values divided by each graph's |m|) or "none"
    normalisation: str
    metric_a: float | None
    metric_b: float | None
    units: tuple[UnitChange, ...]
    edges: tuple[EdgeChange, ...]
    sources: Mapping[str, str] = field(default_factory=dict, hash=False)

    # -- views ------------------------------------------------------------------------------
    def neurons(self) -> tuple[UnitChange, ...]:
        return tuple(u for u in self.units if u.kind == "neuron")

    def counts(self) -> dict[str, dict[str, int]]:
        """``{"neurons": {"gained": n, "lost": n, "changed": n}, "edges": {...}}``."""
        out = {"neurons": dict.fromkeys(STATUSES, 0), "edges": dict.fromkeys(STATUSES, 0)}
        for u in self.units:
            if u.kind == "neuron":
                out["neurons"][u.status] += 1
        for e in self.edges:
            out["edges"][e.status] += 1
        return out

    def alignment_note(self) -> str:
        if self.alignment == "token":
            return f"aligned by token position (both prompts have {len(self.tokens_a)} tokens)"
        return (
            f"aligned by neuron only (prompts have {len(self.tokens_a)} and {len(self.tokens_b)} tokens; "
            "RelP summed over positions)"
        )

    def normalisation_note(self) -> str:
        if self.normalisation == "metric":
            return f"values are RelP / |m| of each graph (|m_A| = {abs(self.metric_a):.4g}, |m_B| = {abs(self.metric_b):.4g})"
        return "values are raw RelP (a graph lacks metric_value, so no normalisation)"

    def summary(self, *, top: int = 15) -> str:
        """A readable table: counts, then the top units and edges by |change|."""
        counts = self.counts()
        n, e = counts["neurons"], counts["edges"]
        lines = [
            f"A: {self.prompt_a!r}",
            f"B: {self.prompt_b!r}",
            self.alignment_note(),
            self.normalisation_note(),
            f"neurons: {n['lost']} only in A (lost), {n['gained']} only in B (gained), {n['changed']} in both",
            f"edges:   {e['lost']} only in A (lost), {e['gained']} only in B (gained), {e['changed']} in both",
        ]
        neurons = [u for u in self.units if u.kind == "neuron"]
        tokens = [u for u in self.units if u.kind != "neuron"]
        for title, rows in ((f"top {min(top, len(neurons))} neurons by |change|:", neurons[:top]),
                            (f"top {min(top, len(tokens))} embeddings and logits by |change|:", tokens[:top])):
            lines += ["", title, f"  {'node':<28} {'status':<8} {'A':>9} {'B':>9} {'change':>9}"]
            for u in rows:
                lines.append(f"  {u.name[:28]:<28} {u.status:<8} {u.a:>9.4f} {u.b:>9.4f} {u.change:>+9.4f}")
        by_key = {_key_of(u): u for u in self.units}
        lines += ["", f"top {min(top, len(self.edges))} edges by |change|:"]
        for edge in self.edges[:top]:
            src = by_key.get(edge.source)
            tgt = by_key.get(edge.target)
            name = f"{src.name if src else edge.source} -> {tgt.name if tgt else edge.target}"
            lines.append(f"  {name[:44]:<44} {edge.status:<8} {edge.a:>9.4f} {edge.b:>9.4f} {edge.change:>+9.4f}")
        return "\n".join(lines)

    # -- the diff file ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The diff file's content (format ``circuits.graph_diff``, version 1)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "a": {"prompt": self.prompt_a, "tokens": list(self.tokens_a), "metric_value": self.metric_a,
                  "file": self.sources.get("a", "")},
            "b": {"prompt": self.prompt_b, "tokens": list(self.tokens_b), "metric_value": self.metric_b,
                  "file": self.sources.get("b", "")},
            "alignment": self.alignment,
            "alignment_note": self.alignment_note(),
            "normalisation": self.normalisation,
            "normalisation_note": self.normalisation_note(),
            "counts": self.counts(),
            "units": [
                {"kind": u.kind, "layer": u.layer, "index": u.index, "position": u.position, "status": u.status,
                 "a": u.a, "b": u.b, "change": u.change, "token_a": u.token_a, "token_b": u.token_b, "label": u.label,
                 "probability": u.probability}
                for u in self.units
            ],
            "edges": [
                {"source": list(e.source), "target": list(e.target), "status": e.status, "a": e.a, "b": e.b,
                 "change": e.change}
                for e in self.edges
            ],
        }

    def save(self, path: str | Path) -> Path:
        """Write the diff file atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> GraphDiff:
        """Read a diff file; CorruptInput naming the file for anything else."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidArgument(f"{path}: no such file") from None
        except (OSError, ValueError) as exc:
            raise CorruptInput(f"{path}: not a graph diff file ({exc.__class__.__name__})") from None
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise CorruptInput(f"{path}: not a graph diff file (format is not {FORMAT!r})")
        try:
            return cls(
                model=str(data["model"]), prompt_a=data["a"]["prompt"], prompt_b=data["b"]["prompt"],
                tokens_a=tuple(data["a"]["tokens"]), tokens_b=tuple(data["b"]["tokens"]),
                alignment=data["alignment"], normalisation=data["normalisation"],
                metric_a=data["a"]["metric_value"], metric_b=data["b"]["metric_value"],
                units=tuple(UnitChange(**u) for u in data["units"]),
                edges=tuple(
                    EdgeChange(source=tuple(e["source"]), target=tuple(e["target"]), status=e["status"], a=e["a"],
                               b=e["b"], change=e["change"])
                    for e in data["edges"]
                ),
                sources={"a": data["a"].get("file", ""), "b": data["b"].get("file", "")},
            )
        except (KeyError, TypeError) as exc:
            raise CorruptInput(f"{path}: graph diff file lacks or mistypes {exc}") from None

    # -- the viewer graph -------------------------------------------------------------------
    def to_legacy_graph(self) -> dict[str, Any]:
        """A viewer graph (legacy JSON): node attribution and edge weight = change; nodes carry
        ``diff_status`` / ``diff_a`` / ``diff_b`` / ``diff_change`` and are grouped as supernodes
        "gained (only in B)", "lost (only in A)", "changed" so the viewer colours them by status."""
        logit_layer = 1 + max((u.layer for u in self.units if u.kind == "neuron"), default=-1)
        tokens = _display_tokens(self)
        units: list[Unit] = []
        extras: list[dict[str, Any]] = []
        node_keys: dict[NodeKey, tuple[int, int, int | None]] = {}
        for u in self.units:
            layer = logit_layer if u.kind == "logit" else (EMBEDDING_LAYER if u.kind == "embedding" else u.layer)
            # Position-collapsed nodes (and logits) are drawn at the last position.
            position = len(tokens) - 1 if u.position is None else u.position
            unit = Unit(
                layer=layer, index=u.index, position=position, kind=u.kind,  # type: ignore[arg-type]
                attribution=u.change, activation=None, token=u.token_b or u.token_a,
                label=f"{u.status}: A {u.a:+.4f} -> B {u.b:+.4f}" if u.kind == "neuron" else "",
                probability=u.probability,
            )
            units.append(unit)
            node_keys[_key_of(u)] = unit.node_key
            extras.append({"diff_status": u.status, "diff_a": u.a, "diff_b": u.b, "diff_change": u.change})
        from circuits_core.schemas import Edge

        edges = []
        for e in self.edges:
            src, tgt = node_keys.get(e.source), node_keys.get(e.target)
            if src is None or tgt is None:
                continue
            edges.append(Edge(src_layer=src[0], src_index=src[1], src_position=src[2], tgt_layer=tgt[0],
                              tgt_index=tgt[1], tgt_position=tgt[2], weight=e.change))
        graph = Graph(
            units=tuple(units), edges=tuple(edges), prompt=f"{self.prompt_a}  ->  {self.prompt_b}",
            prompt_tokens=tokens, model=self.model,
            metadata=GraphMetadata(
                slug="diff-" + slugify(f"{self.prompt_a} vs {self.prompt_b}"), scan=self.model,
                target_position=len(tokens) - 1,
                extra={"info": {"description": f"graph diff (B - A): {self.alignment_note()}; {self.normalisation_note()}"},
                       "diff": {"alignment": self.alignment, "normalisation": self.normalisation,
                                "counts": self.counts()}},
            ),
        )
        data = graph.to_legacy()
        groups: dict[str, list[str]] = {"gained (only in B)": [], "lost (only in A)": [], "changed": []}
        names = {"gained": "gained (only in B)", "lost": "lost (only in A)", "changed": "changed"}
        for node, extra in zip(data["nodes"], extras):
            node.update(extra)
            groups[names[extra["diff_status"]]].append(node["node_id"])
        data["qParams"]["supernodes"] = [[name, *ids] for name, ids in groups.items() if ids]
        return data

    def save_graph(self, path: str | Path) -> Path:
        """Write :meth:`to_legacy_graph` (``.json`` / ``.json.gz``) atomically."""
        from circuits_core.graphio import write_json

        return write_json(self.to_legacy_graph(), path)


def _key_of(u: UnitChange) -> NodeKey:
    if u.kind == "neuron":
        return ("neuron", u.layer, u.index, u.position)
    if u.kind == "embedding":
        return ("embedding", None, None, u.position) if u.position is not None else ("embedding", None, u.index, None)
    return ("logit", None, u.index, None)


def _display_tokens(diff: GraphDiff) -> tuple[str, ...]:
    if diff.alignment != "token":
        return diff.tokens_b
    return tuple(a if a == b else f"{a}→{b}" for a, b in zip(diff.tokens_a, diff.tokens_b))


# ------------------------------------------------------------------------------------------
# Computing a diff
# ------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Node:
    kind: str
    layer: int
    index: int
    position: int | None
    value: float = 0.0
    token: str = ""
    label: str = ""
    probability: float | None = None


def _graph_model(graph: Graph) -> str:
    return graph.model or graph.metadata.scan or ""


def _node_key(unit: Unit, by_position: bool) -> NodeKey:
    if unit.kind == "neuron":
        return ("neuron", unit.layer, unit.index, unit.position if by_position else None)
    if unit.kind == "embedding":
        # Token-aligned: the embedding at a position is one node even when its token differs.
        return ("embedding", None, None, unit.position) if by_position else ("embedding", None, unit.index, None)
    return ("logit", None, unit.index, None)


def _collect(graph: Graph, by_position: bool, scale: float) -> tuple[dict[NodeKey, _Node], dict[tuple[NodeKey, NodeKey], float]]:
    nodes: dict[NodeKey, _Node] = {}
    keys: dict[tuple[int, int, int | None], NodeKey] = {}
    for unit in graph.units:
        key = _node_key(unit, by_position)
        keys[unit.node_key] = key
        node = nodes.get(key)
        if node is None:
            node = nodes[key] = _Node(
                kind=unit.kind, layer=unit.layer, index=unit.index,
                position=unit.position if (by_position and unit.kind != "logit") else None,
                token=unit.token, label=unit.label, probability=unit.probability,
            )
        node.value += (unit.attribution or 0.0) * scale
    edges: dict[tuple[NodeKey, NodeKey], float] = {}
    for edge in graph.edges:
        src, tgt = keys.get(edge.src_key), keys.get(edge.tgt_key)
        if src is None or tgt is None:
            raise CorruptInput(f"graph {graph.prompt[:40]!r}: an edge refers to a unit that is not in the graph")
        edges[(src, tgt)] = edges.get((src, tgt), 0.0) + edge.weight * scale
    return nodes, edges


def _status(in_a: bool, in_b: bool) -> str:
    return "changed" if in_a and in_b else ("lost" if in_a else "gained")


def diff_graphs(a: Graph, b: Graph, *, sources: Mapping[str, str] | None = None) -> GraphDiff:
    """Compare graph A with graph B (module docstring). Graphs of different models raise InvalidArgument."""
    names = dict(sources or {})
    model_a, model_b = _graph_model(a), _graph_model(b)
    if model_a and model_b and model_a != model_b:
        raise InvalidArgument(
            f"graphs come from different models: {model_a} ({names.get('a', 'A')}) vs {model_b} ({names.get('b', 'B')})"
        )
    by_position = len(a.prompt_tokens) == len(b.prompt_tokens) and len(a.prompt_tokens) > 0
    m_a, m_b = a.metadata.metric_value, b.metadata.metric_value
    normalise = all(m is not None and math.isfinite(m) and m != 0 for m in (m_a, m_b))
    scale_a = 1.0 / abs(m_a) if normalise else 1.0
    scale_b = 1.0 / abs(m_b) if normalise else 1.0
    nodes_a, edges_a = _collect(a, by_position, scale_a)
    nodes_b, edges_b = _collect(b, by_position, scale_b)

    units = []
    for key in nodes_a.keys() | nodes_b.keys():
        na, nb = nodes_a.get(key), nodes_b.get(key)
        ref = nb or na
        va, vb = (na.value if na else 0.0), (nb.value if nb else 0.0)
        units.append(UnitChange(
            kind=ref.kind, layer=ref.layer,
            index=ref.index, position=ref.position, status=_status(na is not None, nb is not None),
            a=va, b=vb, change=vb - va, token_a=na.token if na else "", token_b=nb.token if nb else "",
            label=(nb.label if nb and nb.label else (na.label if na else "")),
            probability=ref.probability,
        ))
    units.sort(key=lambda u: (-abs(u.change), u.kind, u.layer, u.index, -1 if u.position is None else u.position))
    edges = []
    for key in edges_a.keys() | edges_b.keys():
        in_a, in_b = key in edges_a, key in edges_b
        va, vb = edges_a.get(key, 0.0), edges_b.get(key, 0.0)
        edges.append(EdgeChange(source=key[0], target=key[1], status=_status(in_a, in_b), a=va, b=vb, change=vb - va))
    edges.sort(key=lambda e: (-abs(e.change), repr(e.source), repr(e.target)))
    return GraphDiff(
        model=model_a or model_b, prompt_a=a.prompt, prompt_b=b.prompt,
        tokens_a=tuple(a.prompt_tokens), tokens_b=tuple(b.prompt_tokens),
        alignment="token" if by_position else "neuron", normalisation="metric" if normalise else "none",
        metric_a=m_a, metric_b=m_b, units=tuple(units), edges=tuple(edges), sources=names,
    )

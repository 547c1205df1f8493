"""Domain types: Unit, Edge, Graph, and the legacy Neuronpedia/Anthropic graph JSON.

These are plain frozen dataclasses with no protobuf, torch or database imports. Conversion to
protobuf lives in :mod:`circuits_core.wire`; conversion to and from the legacy viewer JSON
(relp-spec §E) lives here, because the viewer format is part of the domain.

Unit keys inside one graph are ``(layer, index, position)``: neurons use their decoder layer,
embeddings use ``EMBEDDING_LAYER`` (-1) with the token id as index, logits use the graph's logit
layer (largest neuron layer + 1, as the viewer expects) with the vocabulary id as index.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import unicodedata
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from circuits_core.errors import CorruptInput, InvalidArgument
from circuits_core.influence import DEFAULT_NODE_THRESHOLD, InfluenceShares, influence_shares, logit_weights_from_probabilities
from circuits_core.viewers import logit_clerp, parse_logit_clerp, scan_id, slug_id

EMBEDDING_LAYER = -1
UnitKind = Literal["neuron", "embedding", "logit"]
UNIT_KINDS: tuple[str, ...] = ("neuron", "embedding", "logit")
CLERP_LABEL_CHARS = 60
GENERATOR_NAME = "circuits RelP"
GENERATOR_VERSION = "0.1.0"


@dataclass(frozen=True, slots=True, kw_only=True)
class UnitLabel:
    """One label of a unit and where it came from."""

    text: str
    source: str = ""
    confidence: str = ""
    description: str = ""
    #: How well the label predicts the neuron's activations (circuits_labeler.scoring): balanced
    #: accuracy of "fires" and correlation of predicted with true activations; None = not scored.
    score_detection: float | None = None
    score_simulation: float | None = None
    #: Contexts the scorer judged, and how many of them truly fire.
    score_contexts: int = 0
    score_positives: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Unit:
    """A neuron (optionally at one token position), an embedding or a logit.

    ``Unit(layer=24, index=5326, label="capital cities")`` is a position-collapsed neuron as the
    atlas stores it; graph nodes also carry ``position``, ``activation`` and ``attribution``.
    """

    layer: int
    index: int
    position: int | None = None
    kind: UnitKind = "neuron"
    label: str = ""
    input_label: str = ""
    activation: float | None = None
    attribution: float | None = None
    token: str = ""
    probability: float | None = None
    appearance_count: int = 0
    labels: tuple[UnitLabel, ...] = ()
    cluster: str = ""

    def __post_init__(self) -> None:
        if self.kind not in UNIT_KINDS:
            raise InvalidArgument(f"unit kind must be one of {UNIT_KINDS}, got {self.kind!r}")
        if not isinstance(self.labels, tuple):
            object.__setattr__(self, "labels", tuple(self.labels))

    @property
    def key(self) -> tuple[int, int]:
        """Position-collapsed identity ``(layer, index)``."""
        return (self.layer, self.index)

    @property
    def node_key(self) -> tuple[int, int, int | None]:
        """Identity of the unit inside one graph."""
        return (self.layer, self.index, self.position)

    @property
    def unit_id(self) -> str:
        """Canonical string id of the position-collapsed unit, ``"L{layer}/N{index}"``."""
        return f"L{self.layer}/N{self.index}"

    @property
    def node_id(self) -> str:
        """The legacy viewer node id (relp-spec §E.2)."""
        pos = -1 if self.position is None else self.position
        if self.kind == "embedding":
            return f"E_{self.index}_{pos}"
        if self.kind == "logit":
            return f"L_{self.index}_{pos}"
        return f"{self.layer}_{self.index}_{pos}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Edge:
    """A directed edge between two units.

    In a graph, ``weight`` is the attribution flow and ``raw_weight`` the raw direct-effect
    attribution; positions identify the endpoints. In aggregates, ``weight`` is the mean weight
    and ``count``/``weight_*`` are the running statistics (relp-spec §F).
    """

    src_layer: int
    src_index: int
    tgt_layer: int
    tgt_index: int
    weight: float
    src_position: int | None = None
    tgt_position: int | None = None
    raw_weight: float | None = None
    count: int = 1
    weight_sum: float = 0.0
    weight_abs_sum: float = 0.0
    weight_sq_sum: float = 0.0
    weight_min: float = 0.0
    weight_max: float = 0.0
    method: str = "relp"

    @property
    def src_key(self) -> tuple[int, int, int | None]:
        return (self.src_layer, self.src_index, self.src_position)

    @property
    def tgt_key(self) -> tuple[int, int, int | None]:
        return (self.tgt_layer, self.tgt_index, self.tgt_position)

    @property
    def mean_abs_weight(self) -> float:
        return self.weight_abs_sum / self.count if self.count else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphMetadata:
    """How a graph was made. ``extra`` holds further JSON-compatible settings and viewer fields."""

    slug: str = ""
    scan: str = ""
    target_position: int | None = None
    node_threshold: float | None = None
    metric_value: float | None = None
    nodes_exceeded: bool = False
    max_n_logits: int = 0
    create_time_ms: int = 0
    generator: str = GENERATOR_NAME
    generator_version: str = GENERATOR_VERSION
    corpus_index: int = -1
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Graph:
    """An attribution graph for one prompt: units (nodes) and edges between them."""

    units: tuple[Unit, ...] = ()
    edges: tuple[Edge, ...] = ()
    prompt: str = ""
    prompt_tokens: tuple[str, ...] = ()
    model: str = ""
    graph_id: str = ""
    metadata: GraphMetadata = field(default_factory=GraphMetadata)

    def __post_init__(self) -> None:
        for name in ("units", "edges", "prompt_tokens"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    # -- views -------------------------------------------------------------------------------
    @property
    def neurons(self) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.kind == "neuron")

    @property
    def logits(self) -> tuple[Unit, ...]:
        return tuple(u for u in self.units if u.kind == "logit")

    def unit_index(self) -> dict[tuple[int, int, int | None], int]:
        """Map from unit node key to its index in ``units``; raises on duplicate keys."""
        index: dict[tuple[int, int, int | None], int] = {}
        for i, unit in enumerate(self.units):
            if unit.node_key in index:
                raise InvalidArgument(f"duplicate unit {unit.node_id} in graph")
            index[unit.node_key] = i
        return index

    def with_labels(self, labels: Mapping[tuple[int, int], str]) -> Graph:
        """A copy whose neurons carry ``labels[(layer, index)]`` where given."""
        units = tuple(
            replace(u, label=labels[u.key]) if u.kind == "neuron" and u.key in labels else u
            for u in self.units
        )
        return replace(self, units=units)

    # -- legacy viewer JSON ------------------------------------------------------------------
    def to_legacy(self) -> dict[str, Any]:
        """The Neuronpedia/Anthropic viewer JSON (validates against the Neuronpedia schema)."""
        return graph_to_legacy(self)

    @classmethod
    def from_legacy(cls, data: Any, *, source: str = "graph") -> Graph:
        """Parse viewer JSON; malformed input raises CorruptInput naming ``source`` and the field."""
        return graph_from_legacy(data, source=source)

    def save(self, path: str | Path) -> Path:
        """Write legacy JSON (gzip when the name ends in .gz) atomically; return the path."""
        return save_legacy(self.to_legacy(), path)

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        """Read a legacy JSON graph file (plain or .gz)."""
        return cls.from_legacy(load_legacy(path), source=str(path))


# ------------------------------------------------------------------------------------------
# Identity
# ------------------------------------------------------------------------------------------
def graph_content_id(*, model: str, prompt: str, settings: Mapping[str, Any], revision: str = "") -> str:
    """Content hash identifying a graph: same model, revision, prompt and settings -> same id."""
    payload = json.dumps(
        {"model": model, "revision": revision, "prompt": prompt, "settings": dict(settings)},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def slugify(text: str, *, max_chars: int = 50) -> str:
    """Lowercase ASCII slug: accents dropped ("Région" -> "region"), other characters except
    letters, digits, space, '_' and '-' removed, runs of space/'_'/'-' collapsed to '-'.
    ASCII because Neuronpedia accepts only [a-zA-Z0-9_.-] in a slug."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^a-z0-9_\s-]", "", text.lower())
    text = re.sub(r"[\s_-]+", "-", text).strip("-")
    return text[:max_chars].strip("-") or "graph"


# ------------------------------------------------------------------------------------------
# Legacy JSON writer
# ------------------------------------------------------------------------------------------
_META_KEYS = ("slug", "scan", "prompt", "prompt_tokens", "node_threshold", "target_position", "info")


def _clerp(unit: Unit) -> str:
    if unit.kind == "embedding":
        return f"Token: {unit.token}"
    if unit.kind == "logit":
        return logit_clerp(unit.token, unit.probability)
    base = f"L{unit.layer}/N{unit.index}"
    return f"{base}: {unit.label[:CLERP_LABEL_CHARS]}" if unit.label else base


def _legacy_node(unit: Unit, first_logit: bool, influence: float | None) -> dict[str, Any]:
    node_id = unit.node_id
    layer = "E" if unit.kind == "embedding" else str(unit.layer)
    node: dict[str, Any] = {
        "node_id": node_id,
        "feature": unit.index,
        "layer": layer,
        "ctx_idx": -1 if unit.position is None else unit.position,
        "feature_type": {"neuron": "mlp_neuron", "embedding": "embedding", "logit": "logit"}[unit.kind],
        "jsNodeId": node_id,
        "clerp": _clerp(unit),
        "influence": influence,
        "attribution": unit.attribution,
        "activation": unit.activation,
        "isLogit": unit.kind == "logit",
    }
    if unit.kind == "logit":
        if unit.probability is not None:  # circuit-tracer's token_prob is a float (default 0.0), never null
            node["token_prob"] = unit.probability
        node["is_target_logit"] = first_logit
    if unit.label:
        node["label"] = unit.label
    if unit.input_label:
        node["input_label"] = unit.input_label
    if unit.cluster:
        node["cluster"] = unit.cluster
    if unit.token and unit.kind == "neuron":
        node["token"] = unit.token
    if unit.appearance_count:
        node["appearance_count"] = unit.appearance_count
    if unit.labels:
        node["labels"] = [
            {"text": lab.text, "source": lab.source, "confidence": lab.confidence, "description": lab.description}
            for lab in unit.labels
        ]
    return node


def graph_influence(graph: Graph) -> InfluenceShares:
    """Each unit's viewer ``influence`` (cumulative influence share, relp-spec §E), in unit order."""
    row = {u.node_key: n for n, u in enumerate(graph.units)}
    sources: list[int] = []
    targets: list[int] = []
    weights: list[float] = []
    for edge in graph.edges:
        s, t = row.get(edge.src_key), row.get(edge.tgt_key)
        if s is not None and t is not None:
            sources.append(s)
            targets.append(t)
            weights.append(edge.weight)
    is_logit = [u.kind == "logit" for u in graph.units]
    return influence_shares(
        n_nodes=len(graph.units), sources=sources, targets=targets, weights=weights,
        logit_weights=logit_weights_from_probabilities([u.probability for u in graph.units], is_logit),
        attributions=[u.attribution for u in graph.units], is_logit=is_logit,
    )  # fmt: skip


def _viewer_metadata(metadata: dict[str, Any], extra: dict[str, Any], influence: InfluenceShares) -> None:
    """The metadata fields circuit-tracer's and Neuronpedia's viewers read (relp-spec §E)."""
    pruning = dict(extra.pop("pruning_settings", {}) or {})
    threshold = pruning.get("node_threshold", DEFAULT_NODE_THRESHOLD)
    pruning.update({"node_threshold": threshold, "influence_basis": influence.basis})
    metadata["node_threshold"] = threshold
    metadata["pruning_settings"] = pruning
    metadata["transcoder_list"] = list(extra.pop("transcoder_list", []) or [])


def _viewer_metadata_from_legacy(meta: Mapping[str, Any], extra: dict[str, Any]) -> None:
    """Inverse of :func:`_viewer_metadata`: keep only what differs from the defaults in ``extra``."""
    pruning = dict(meta.get("pruning_settings") or {}) if isinstance(meta.get("pruning_settings"), Mapping) else {}
    pruning.pop("influence_basis", None)
    if "transcoder_list" in meta and "node_threshold" in meta:  # older files: node_threshold was tau
        pruning["node_threshold"] = meta["node_threshold"]
    if pruning.get("node_threshold") == DEFAULT_NODE_THRESHOLD:
        pruning.pop("node_threshold")
    extra.pop("pruning_settings", None)
    if pruning:
        extra["pruning_settings"] = pruning
    if extra.get("transcoder_list") == []:
        extra.pop("transcoder_list")


def graph_to_legacy(graph: Graph) -> dict[str, Any]:
    """See :meth:`Graph.to_legacy`."""
    md = graph.metadata
    extra = dict(md.extra)
    settings = dict(extra.pop("generation_settings", {}) or {})
    settings.update(
        {
            "max_n_logits": md.max_n_logits,
            "node_threshold": md.node_threshold,
            "metric_value": md.metric_value,
            "target_position": md.target_position,
            "nodes_exceeded": md.nodes_exceeded,
        }
    )
    settings = {k: v for k, v in settings.items() if v is not None}
    info = dict(extra.pop("info", {}) or {})
    info.setdefault("description", "RelP attribution graph for neuron circuits")
    info["generator"] = {**dict(info.get("generator") or {}), "name": md.generator, "version": md.generator_version}
    if md.create_time_ms:
        info["create_time_ms"] = md.create_time_ms
    q_params = dict(extra.pop("qParams", {}) or {})
    q_params.setdefault("pinnedIds", [])
    q_params.setdefault("supernodes", [])
    q_params.setdefault("linkType", "both")
    q_params.setdefault("clickedId", "")
    q_params.setdefault("sg_pos", "")
    influence = graph_influence(graph)
    metadata: dict[str, Any] = {
        "slug": slug_id(md.slug) if md.slug else ("relp-" + slugify(graph.prompt)),
        "scan": scan_id(md.scan or graph.model or "model"),
        "prompt": graph.prompt,
        "prompt_tokens": list(graph.prompt_tokens),
        "info": info,
        "generation_settings": settings,
    }
    _viewer_metadata(metadata, extra, influence)
    if md.target_position is not None:
        metadata["target_position"] = md.target_position
    if graph.model:
        metadata["model"] = graph.model
    if graph.graph_id:
        metadata["graph_id"] = graph.graph_id
    if md.corpus_index >= 0:
        metadata["corpus_index"] = md.corpus_index
    metadata.update(extra)

    by_key = {u.node_key: u for u in graph.units}
    nodes = []
    seen_logit = False
    for unit, share in zip(graph.units, influence.shares):
        nodes.append(_legacy_node(unit, first_logit=unit.kind == "logit" and not seen_logit, influence=share))
        seen_logit = seen_logit or unit.kind == "logit"
    links = []
    for n, edge in enumerate(graph.edges):
        src, tgt = by_key.get(edge.src_key), by_key.get(edge.tgt_key)
        if src is None or tgt is None:
            missing = edge.src_key if src is None else edge.tgt_key
            raise InvalidArgument(f"edge {n} refers to unit {missing} that is not in the graph")
        link: dict[str, Any] = {"source": src.node_id, "target": tgt.node_id, "weight": edge.weight}
        if edge.raw_weight is not None:
            link["raw_weight"] = edge.raw_weight
        links.append(link)
    features: dict[tuple[str, int], dict[str, Any]] = {}
    for node, unit in zip(nodes, graph.units):
        if unit.kind == "embedding":
            continue
        features.setdefault(
            (node["layer"], unit.index),
            {
                "featureId": f"{node['layer']}_{unit.index}",
                "featureIndex": unit.index,
                "layer": node["layer"],
                "clerp": node["clerp"],
                "feature_type": node["feature_type"],
            },
        )
    return {
        "metadata": metadata,
        "qParams": q_params,
        "nodes": nodes,
        "links": links,
        "features": list(features.values()),
        "nodes_exceeded": md.nodes_exceeded,
    }


# ------------------------------------------------------------------------------------------
# Legacy JSON reader
# ------------------------------------------------------------------------------------------
def _require(obj: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise CorruptInput(f"{where}: missing field '{key}'")
    value = obj[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise CorruptInput(f"{where}: field '{key}' must be {names}, got {type(value).__name__}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _optional_number(node: Mapping[str, Any], key: str, where: str) -> float | None:
    value = node.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CorruptInput(f"{where}: field '{key}' must be a number or null, got {type(value).__name__}")
    return float(value)


def _parse_node(node: Any, n: int, prompt_tokens: tuple[str, ...], source: str) -> Unit:
    where = f"{source}: nodes[{n}]"
    if not isinstance(node, Mapping):
        raise CorruptInput(f"{where}: must be an object, got {type(node).__name__}")
    node_id = _require(node, "node_id", str, where)
    where = f"{source}: node '{node_id}'"
    feature = _require(node, "feature", (int, type(None)), where)
    layer_field = _require(node, "layer", (str, int), where)
    ctx = _require(node, "ctx_idx", int, where)
    ftype = _require(node, "feature_type", str, where)
    clerp = _require(node, "clerp", str, where)
    _require(node, "jsNodeId", str, where)
    position = None if ctx < 0 else ctx
    raw_labels = node.get("labels") or []
    if not isinstance(raw_labels, list) or not all(isinstance(lab, Mapping) for lab in raw_labels):
        raise CorruptInput(f"{where}: field 'labels' must be a list of objects")
    labels = tuple(
        UnitLabel(
            text=str(lab.get("text", "")),
            source=str(lab.get("source", "")),
            confidence=str(lab.get("confidence", "")),
            description=str(lab.get("description", "")),
        )
        for lab in raw_labels
    )
    count = node.get("appearance_count", 0) or 0
    if isinstance(count, bool) or not isinstance(count, int):
        raise CorruptInput(f"{where}: field 'appearance_count' must be an integer")
    # Since the viewer fix the signed RelP score has its own key and `influence` is the viewers'
    # cumulative share; older files carry the score in `influence`.
    common = {
        "position": position,
        "attribution": _optional_number(node, "attribution" if "attribution" in node else "influence", where),
        "activation": _optional_number(node, "activation", where),
        "input_label": str(node.get("input_label", "") or ""),
        "cluster": str(node.get("cluster", "") or ""),
        "appearance_count": count,
        "labels": labels,
    }
    if feature is None:
        raise CorruptInput(f"{where}: field 'feature' must be an integer for {ftype} nodes")
    if ftype == "embedding" or layer_field == "E":
        token = clerp[len("Token: "):] if clerp.startswith("Token: ") else clerp
        return Unit(layer=EMBEDDING_LAYER, index=feature, kind="embedding", token=token, **common)
    try:
        layer = int(layer_field)
    except ValueError:
        raise CorruptInput(f"{where}: layer {layer_field!r} is not an integer") from None
    if ftype == "logit" or node.get("isLogit") is True:
        token, clerp_prob = parse_logit_clerp(clerp)
        prob = _optional_number(node, "token_prob", where)
        if prob is None:
            prob = clerp_prob
        return Unit(layer=layer, index=feature, kind="logit", token=token, probability=prob, **common)
    if ftype != "mlp_neuron":
        raise CorruptInput(f"{where}: unsupported feature_type {ftype!r} (expected mlp_neuron, embedding, logit)")
    label = node.get("label")
    if not isinstance(label, str):
        prefix = f"L{layer}/N{feature}: "
        label = clerp[len(prefix):] if clerp.startswith(prefix) else ""
    token = node.get("token")
    return Unit(layer=layer, index=feature, kind="neuron", label=label, token=token if isinstance(token, str) else "", **common)


def graph_from_legacy(data: Any, *, source: str = "graph") -> Graph:
    """See :meth:`Graph.from_legacy`."""
    if not isinstance(data, Mapping):
        raise CorruptInput(f"{source}: top level must be a JSON object, got {type(data).__name__}")
    meta = _require(data, "metadata", Mapping, source)
    nodes = _require(data, "nodes", list, source)
    links = _require(data, "links", list, source)
    where = f"{source}: metadata"
    prompt = _require(meta, "prompt", str, where)
    tokens = _require(meta, "prompt_tokens", list, where)
    if not all(isinstance(t, str) for t in tokens):
        raise CorruptInput(f"{where}: prompt_tokens must be a list of strings")
    prompt_tokens = tuple(tokens)

    units = [_parse_node(node, n, prompt_tokens, source) for n, node in enumerate(nodes)]
    by_id: dict[str, Unit] = {}
    for unit, node in zip(units, nodes):
        if node["node_id"] in by_id:
            raise CorruptInput(f"{source}: duplicate node_id {node['node_id']!r}")
        by_id[node["node_id"]] = unit

    edges = []
    for n, link in enumerate(links):
        lw = f"{source}: links[{n}]"
        if not isinstance(link, Mapping):
            raise CorruptInput(f"{lw}: must be an object, got {type(link).__name__}")
        src_id = _require(link, "source", str, lw)
        tgt_id = _require(link, "target", str, lw)
        weight = _require(link, "weight", (int, float), lw)
        src, tgt = by_id.get(src_id), by_id.get(tgt_id)
        if src is None:
            raise CorruptInput(f"{lw}: source {src_id!r} is not a node of the graph")
        if tgt is None:
            raise CorruptInput(f"{lw}: target {tgt_id!r} is not a node of the graph")
        raw = _optional_number(link, "raw_weight", lw)
        edges.append(
            Edge(
                src_layer=src.layer, src_index=src.index, src_position=src.position,
                tgt_layer=tgt.layer, tgt_index=tgt.index, tgt_position=tgt.position,
                weight=float(weight), raw_weight=raw,
            )
        )

    settings = dict(meta.get("generation_settings") or {}) if isinstance(meta.get("generation_settings"), Mapping) else {}
    known = set(_META_KEYS) | {"generation_settings", "model", "graph_id", "corpus_index"}
    extra: dict[str, Any] = {k: v for k, v in meta.items() if k not in known}
    _viewer_metadata_from_legacy(meta, extra)
    for key in ("max_n_logits", "node_threshold", "metric_value", "target_position", "nodes_exceeded"):
        settings.pop(key, None)
    if settings:
        extra["generation_settings"] = settings
    info = dict(meta.get("info") or {}) if isinstance(meta.get("info"), Mapping) else {}
    generator = dict(info.pop("generator", {}) or {})
    create_time_ms = int(info.pop("create_time_ms", 0) or 0)
    if info.get("description") == "RelP attribution graph for neuron circuits":
        info.pop("description")
    gen_extra = {k: v for k, v in generator.items() if k not in ("name", "version")}
    if gen_extra:
        info["generator"] = gen_extra
    if info:
        extra["info"] = info
    q_params = data.get("qParams")
    if isinstance(q_params, Mapping):
        q = dict(q_params)
        for key, empty in (("pinnedIds", []), ("supernodes", []), ("linkType", "both"), ("clickedId", ""), ("sg_pos", "")):
            if q.get(key) == empty:
                q.pop(key)
        if q:
            extra["qParams"] = q
    gs = meta.get("generation_settings") if isinstance(meta.get("generation_settings"), Mapping) else {}

    def _num(key: str, *, settings_only: bool = False) -> float | None:
        value = gs.get(key) if settings_only else meta.get(key, gs.get(key))
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    # tau: files written for the viewers (they carry transcoder_list) keep it in generation_settings
    # only, metadata.node_threshold being the viewers' pruning fraction; older files had tau in both.
    viewer_format = "transcoder_list" in meta

    target_position = meta.get("target_position", gs.get("target_position"))
    metadata = GraphMetadata(
        slug=str(meta.get("slug", "")),
        scan=str(meta.get("scan", "")),
        target_position=int(target_position) if isinstance(target_position, int) else None,
        node_threshold=_num("node_threshold", settings_only=viewer_format),
        metric_value=_num("metric_value"),
        nodes_exceeded=bool(data.get("nodes_exceeded", gs.get("nodes_exceeded", False))),
        max_n_logits=int(gs.get("max_n_logits", 0) or 0),
        create_time_ms=create_time_ms,
        generator=str(generator.get("name", GENERATOR_NAME)),
        generator_version=str(generator.get("version", GENERATOR_VERSION)),
        corpus_index=int(meta.get("corpus_index", -1)) if isinstance(meta.get("corpus_index", -1), int) else -1,
        extra=extra,
    )
    return Graph(
        units=tuple(units),
        edges=tuple(edges),
        prompt=prompt,
        prompt_tokens=prompt_tokens,
        model=str(meta.get("model", "")),
        graph_id=str(meta.get("graph_id", "")),
        metadata=metadata,
    )


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------
def load_legacy(path: str | Path) -> Any:
    """Read a JSON graph file (gzip-compressed when it starts with the gzip magic)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidArgument(f"{path}: no such file") from None
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read ({exc.strerror})") from None
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return json.loads(raw)
    except (OSError, EOFError, zlib.error, ValueError, RecursionError) as exc:
        raise CorruptInput(f"{path}: not a valid JSON graph ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def save_legacy(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write JSON atomically (temp file + rename); gzip when the name ends in .gz."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, ensure_ascii=False, allow_nan=True, default=_json_default)
    payload = gzip.compress(text.encode("utf-8"), mtime=0) if path.suffix == ".gz" else text.encode("utf-8")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    tmp.replace(path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (set, tuple)):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def iter_units(graphs: Iterable[Graph]) -> Iterable[Unit]:
    """Every neuron unit of several graphs, in order."""
    for graph in graphs:
        yield from graph.neurons


# ------------------------------------------------------------------------------------------
# Labelling progress (LabelerService.RunProgressive)
# ------------------------------------------------------------------------------------------
LABEL_PASSES: tuple[str, ...] = ("output", "input")


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelProgress:
    """One progress report of a progressive labelling run (relp-spec §H).

    ``done`` counts neurons finished in ``label_pass`` (``labelled`` newly paid + ``cached`` +
    ``failed`` + skipped); token counts and ``spend_usd`` are for the whole run so far.
    ``state``: running | layer_done | pass_done | done | budget_exhausted | stopped | failed.
    """

    label_pass: str = ""
    layer: int = -1
    done: int = 0
    total: int = 0
    labelled: int = 0
    cached: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    spend_usd: float = 0.0
    requests: int = 0
    retries: int = 0
    state: str = "running"
    message: str = ""

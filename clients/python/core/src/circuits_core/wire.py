"""The only place that converts domain types to and from protobuf messages.

Servicers, clients and :mod:`circuits_core.graphio` (compact graph files) call these functions;
nothing else touches ``*_pb2``. Conversions are lossless for every value the domain types can
hold. Graph edges travel as packed columns and map straight onto the Graph's
:class:`~circuits_core.edge_table.EdgeTable` (no per-edge objects either way); a missing
``raw_weight`` travels as NaN, and NaN reads back as missing.

Decoding validates what every graph reader requires (:func:`graph_from_proto` and
:func:`graph_arrays_from_proto` accept and reject the same messages): a unit kind on every
unit, distinct unit keys, neuron layers/indices in range, edge columns of one length naming
existing units, finite edge weights, and metadata ``extra_json`` holding a JSON object.
"""

from __future__ import annotations

import json
import math
from operator import attrgetter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from circuits_core import _graph_scan
from circuits_core._proto.circuits.v1 import aggregator_pb2, atlas_pb2, attribution_pb2, graph_pb2, labeler_pb2
from circuits_core.aggregator_types import (
    MAX_LAYER,
    MAX_NEURON,
    AggregatorStats,
    EdgeColumns,
    GraphArrays,
    IngestAck,
    graph_arrays_from_units,
    model_dims,
)
from circuits_core.atlas_types import AtlasStats, ClusterInfo, ClusterMembers, SearchHit, UnitActivationStats, UnitCard
from circuits_core.edge_table import NO_POSITION, EdgeTable, check_unit_keys, checked_unit_keys
from circuits_core.errors import InvalidArgument, echo
from circuits_core.interventions import (
    InterventionRequest,
    InterventionResult,
    NeuronIntervention,
    TokenProbability,
)
from circuits_core.schemas import Edge, Graph, GraphMetadata, LabelProgress, Unit, UnitLabel
from circuits_core.tracing import ModelInfo, TraceRequest

_KIND_TO_PB = {
    "neuron": graph_pb2.UNIT_KIND_NEURON,
    "embedding": graph_pb2.UNIT_KIND_EMBEDDING,
    "logit": graph_pb2.UNIT_KIND_LOGIT,
}
_PB_TO_KIND = {v: k for k, v in _KIND_TO_PB.items()}


# -- units ------------------------------------------------------------------------------------
def unit_to_proto(unit: Unit, out: graph_pb2.Unit | None = None) -> graph_pb2.Unit:
    msg = out if out is not None else graph_pb2.Unit()
    msg.layer = unit.layer
    msg.index = unit.index
    if unit.position is not None:
        msg.position = unit.position
    msg.kind = _KIND_TO_PB[unit.kind]
    msg.label = unit.label
    msg.input_label = unit.input_label
    if unit.activation is not None:
        msg.activation = unit.activation
    if unit.attribution is not None:
        msg.attribution = unit.attribution
    msg.token = unit.token
    if unit.probability is not None:
        msg.probability = unit.probability
    msg.appearance_count = unit.appearance_count
    for label in unit.labels:
        entry = msg.labels.add(
            text=label.text, source=label.source, confidence=label.confidence, description=label.description,
            score_contexts=label.score_contexts, score_positives=label.score_positives,
        )
        if label.score_detection is not None:
            entry.score_detection = label.score_detection
        if label.score_simulation is not None:
            entry.score_simulation = label.score_simulation
    msg.cluster = unit.cluster
    return msg


def unit_from_proto(msg: graph_pb2.Unit) -> Unit:
    kind = _PB_TO_KIND.get(msg.kind)
    if kind is None:
        raise InvalidArgument(f"unit L{msg.layer}/N{msg.index}: kind must be set (neuron, embedding or logit)")
    return Unit(
        layer=msg.layer,
        index=msg.index,
        position=msg.position if msg.HasField("position") else None,
        kind=kind,
        label=msg.label,
        input_label=msg.input_label,
        activation=_finite_or_none(msg.activation, "activation", msg) if msg.HasField("activation") else None,
        attribution=_finite_or_none(msg.attribution, "attribution", msg) if msg.HasField("attribution") else None,
        token=msg.token,
        probability=_finite_or_none(msg.probability, "probability", msg) if msg.HasField("probability") else None,
        appearance_count=msg.appearance_count,
        labels=tuple(
            UnitLabel(
                text=l.text, source=l.source, confidence=l.confidence, description=l.description,
                score_detection=l.score_detection if l.HasField("score_detection") else None,
                score_simulation=l.score_simulation if l.HasField("score_simulation") else None,
                score_contexts=l.score_contexts, score_positives=l.score_positives,
            )
            for l in msg.labels
        ) if msg.labels else (),
        cluster=msg.cluster,
    )  # fmt: skip


def units_to_proto(units: Iterable[Unit]) -> list[graph_pb2.Unit]:
    return [unit_to_proto(u) for u in units]


# -- edges (row form, query answers) -----------------------------------------------------------
def edge_to_proto(edge: Edge) -> graph_pb2.Edge:
    msg = graph_pb2.Edge(
        src_layer=edge.src_layer,
        src_index=edge.src_index,
        tgt_layer=edge.tgt_layer,
        tgt_index=edge.tgt_index,
        weight=edge.weight,
        count=edge.count,
        weight_sum=edge.weight_sum,
        weight_abs_sum=edge.weight_abs_sum,
        weight_sq_sum=edge.weight_sq_sum,
        weight_min=edge.weight_min,
        weight_max=edge.weight_max,
        method=edge.method,
    )
    if edge.src_position is not None:
        msg.src_position = edge.src_position
    if edge.tgt_position is not None:
        msg.tgt_position = edge.tgt_position
    if edge.raw_weight is not None:
        msg.raw_weight = edge.raw_weight
    return msg


def edge_from_proto(msg: graph_pb2.Edge) -> Edge:
    return Edge(
        src_layer=msg.src_layer,
        src_index=msg.src_index,
        tgt_layer=msg.tgt_layer,
        tgt_index=msg.tgt_index,
        weight=msg.weight,
        src_position=msg.src_position if msg.HasField("src_position") else None,
        tgt_position=msg.tgt_position if msg.HasField("tgt_position") else None,
        raw_weight=msg.raw_weight if msg.HasField("raw_weight") else None,
        count=msg.count,
        weight_sum=msg.weight_sum,
        weight_abs_sum=msg.weight_abs_sum,
        weight_sq_sum=msg.weight_sq_sum,
        weight_min=msg.weight_min,
        weight_max=msg.weight_max,
        method=msg.method,
    )


# -- graphs -----------------------------------------------------------------------------------
def metadata_to_proto(md: GraphMetadata, out: graph_pb2.GraphMetadata) -> None:
    out.slug = md.slug
    out.scan = md.scan
    if md.target_position is not None:
        out.target_position = md.target_position
    if md.node_threshold is not None:
        out.node_threshold = md.node_threshold
    if md.metric_value is not None:
        out.metric_value = md.metric_value
    out.nodes_exceeded = md.nodes_exceeded
    out.max_n_logits = md.max_n_logits
    out.create_time_ms = md.create_time_ms
    out.generator = md.generator
    out.generator_version = md.generator_version
    out.corpus_index = md.corpus_index
    if md.extra:
        out.extra_json = json.dumps(dict(md.extra), sort_keys=True)


def metadata_from_proto(msg: graph_pb2.GraphMetadata) -> GraphMetadata:
    return GraphMetadata(
        slug=msg.slug,
        scan=msg.scan,
        target_position=msg.target_position if msg.HasField("target_position") else None,
        node_threshold=msg.node_threshold if msg.HasField("node_threshold") else None,
        metric_value=msg.metric_value if msg.HasField("metric_value") else None,
        nodes_exceeded=msg.nodes_exceeded,
        max_n_logits=msg.max_n_logits,
        create_time_ms=msg.create_time_ms,
        generator=msg.generator,
        generator_version=msg.generator_version,
        corpus_index=msg.corpus_index,
        extra=_extra_from_json(msg.extra_json),
    )


def _extra_from_json(text: str) -> dict[str, object]:
    try:
        extra = json.loads(text) if text else {}
    except (ValueError, RecursionError):
        raise InvalidArgument("graph metadata extra_json is not valid JSON") from None
    if not isinstance(extra, dict):
        raise InvalidArgument("graph metadata extra_json must be a JSON object")
    return extra


def graph_to_proto(graph: Graph, out: graph_pb2.Graph | None = None) -> graph_pb2.Graph:
    """Encode a graph; its edge columns become packed columns of unit row numbers."""
    msg = out if out is not None else graph_pb2.Graph()
    msg.graph_id = graph.graph_id
    msg.model = graph.model
    msg.prompt = graph.prompt
    msg.prompt_tokens.extend(graph.prompt_tokens)
    for unit in graph.units:
        unit_to_proto(unit, msg.units.add())
    edges = graph.edge_table
    src, tgt = edges.endpoint_rows(graph.units)
    packed = [_packed_varints(1, src), _packed_varints(2, tgt), _packed_doubles(3, edges.weight)]
    if edges.has_raw_weight:
        packed.append(_packed_doubles(4, edges.raw_weight))
    msg.edges.MergeFromString(b"".join(packed))
    metadata_to_proto(graph.metadata, msg.metadata)
    return msg


# Packed repeated fields are written as bytes straight from the numpy columns (the same bytes
# protobuf's own serializer writes, without a Python list per column); the message parses them
# in C. Wire format of a packed field: tag, byte length, payload.
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _packed_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload if payload else b""


def _packed_doubles(number: int, values: np.ndarray) -> bytes:
    return _packed_field(number, values.astype("<f8", copy=False).tobytes())


def _packed_varints(number: int, values: np.ndarray) -> bytes:
    """Non-negative integers (< 2**35) as protobuf varints, vectorised: each row's 5 candidate
    bytes are computed at once and the ones its varint needs are kept, in row order."""
    v = values.astype(np.uint64, copy=False)
    sizes = np.ones(v.shape[0], dtype=np.uint8)
    for k in range(1, 5):
        sizes += v >= (1 << (7 * k))
    groups = np.empty((v.shape[0], 5), dtype=np.uint8)
    for k in range(5):
        groups[:, k] = ((v >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8) | ((sizes > k + 1) << 7).astype(np.uint8)
    return _packed_field(number, groups[np.arange(5, dtype=np.uint8) < sizes[:, None]].tobytes())


def graph_to_bytes(graph: Graph) -> bytes:
    """The deterministic serialization of :func:`graph_to_proto` (compact graph files, content ids)."""
    return graph_to_proto(graph).SerializeToString(deterministic=True)


def graph_message_from_bytes(data: bytes) -> graph_pb2.Graph:
    """Parse a serialized ``circuits.v1.Graph``; undecodable bytes raise InvalidArgument."""
    msg = graph_pb2.Graph()
    try:
        msg.ParseFromString(data)
    except (DecodeError, RecursionError) as exc:
        raise InvalidArgument(" ".join(str(exc).split())[:200] or "undecodable message") from None
    return msg


class ScannedGraph:
    """A serialized Graph read by the compiled scan (:func:`graph_request_from_bytes`): ``header``
    is a Graph message of every field but units and edges; the unit and edge columns are kept
    for :func:`graph_arrays_from_proto`, which accepts this wherever it accepts a Graph."""

    __slots__ = ("header", "_columns")

    def __init__(self, header: graph_pb2.Graph, columns: _graph_scan.Scan) -> None:
        self.header = header
        self._columns = columns

    @property
    def graph_id(self) -> str:
        return self.header.graph_id

    @property
    def n_units(self) -> int:
        return self._columns.n_units

    @property
    def n_edges(self) -> int:
        return self._columns.src.shape[0]


def graph_request_from_bytes(data: bytes) -> graph_pb2.Graph | ScannedGraph:
    """A serialized ``circuits.v1.Graph`` for the aggregator: read by the compiled scan where it
    can (numba installed, the bytes in the shapes a serializer writes), parsed by protobuf
    otherwise; both accept and refuse the same bytes, and undecodable bytes raise InvalidArgument.
    Reading the columns straight from the bytes saves building and reading back ~500 unit
    objects per graph."""
    columns = _graph_scan.scan(data)
    if columns is None:
        return graph_message_from_bytes(data)
    return ScannedGraph(graph_message_from_bytes(columns.header), columns)


def graph_sizes(msg: Any) -> tuple[int, int] | None:
    """``(units, edges)`` of a Graph message or :class:`ScannedGraph`; None for other messages
    (the request guard's size limits)."""
    if isinstance(msg, ScannedGraph):
        return msg.n_units, msg.n_edges
    descriptor = getattr(msg, "DESCRIPTOR", None)
    if descriptor is None or descriptor.full_name != "circuits.v1.Graph":
        return None
    return len(msg.units), len(msg.edges.src)


def request_fields(msg: Any) -> Any:
    """The message whose scalar fields a request guard checks: a :class:`ScannedGraph`'s header
    (its units and edges are bulk data, not checked field by field), else ``msg`` itself."""
    return msg.header if isinstance(msg, ScannedGraph) else msg


def graph_message_has_metadata(msg: graph_pb2.Graph | ScannedGraph) -> bool:
    return request_fields(msg).HasField("metadata")


def _edge_rows(table: graph_pb2.EdgeTable, n_units: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``(src, tgt, weight, raw_weight or None)`` of a packed EdgeTable, checked."""
    n = len(table.src)
    _check_edge_lengths(n, len(table.tgt), len(table.weight), len(table.raw_weight))
    raw = np.array(table.raw_weight, dtype=np.float64) if len(table.raw_weight) else None
    return _checked_edges(np.array(table.src, dtype=np.int64), np.array(table.tgt, dtype=np.int64),
                          np.array(table.weight, dtype=np.float64), raw, n_units)  # fmt: skip


def _check_edge_lengths(n: int, tgt: int, weight: int, raw_weight: int) -> None:
    if tgt != n or weight != n or raw_weight not in (0, n):
        raise InvalidArgument(
            f"edge table columns differ in length (src={n}, tgt={tgt}, weight={weight}, raw_weight={raw_weight})"
        )


def _checked_edges(src: np.ndarray, tgt: np.ndarray, weight: np.ndarray, raw: np.ndarray | None,
                   n_units: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:  # fmt: skip
    if src.shape[0] and (int(src.max()) >= n_units or int(tgt.max()) >= n_units):
        raise InvalidArgument(f"edge table refers to a unit index >= {n_units} (number of units)")
    bad = np.flatnonzero(~np.isfinite(weight))
    if bad.size:
        raise InvalidArgument(f"edge {int(bad[0])} weight must be finite, got {float(weight[bad[0]])}")
    return src, tgt, weight, raw


def _finite_or_none(value: float, what: str, unit: Any) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(f"unit L{unit.layer}/N{unit.index}: {what} must be finite, got {value}")
    return value


def _check_units(layer: np.ndarray, index: np.ndarray, position: np.ndarray, kinds: np.ndarray) -> None:
    unknown = np.flatnonzero((kinds < graph_pb2.UNIT_KIND_NEURON) | (kinds > graph_pb2.UNIT_KIND_LOGIT))
    if unknown.size:
        row = int(unknown[0])
        raise InvalidArgument(f"unit L{int(layer[row])}/N{int(index[row])}: kind must be set (neuron, embedding or logit)")
    check_unit_keys(layer, index, position, kinds == graph_pb2.UNIT_KIND_NEURON)


def graph_from_proto(msg: graph_pb2.Graph) -> Graph:
    """Decode a graph (checked as the module docstring says; problems raise InvalidArgument)."""
    units = tuple(unit_from_proto(u) for u in msg.units)
    unit_keys = checked_unit_keys(units)
    src, tgt, weight, raw = _edge_rows(msg.edges, len(units))
    metadata = metadata_from_proto(msg.metadata)
    return Graph(
        units=units,
        edges=EdgeTable.from_unit_rows(unit_keys, src, tgt, weight, raw),
        prompt=msg.prompt,
        prompt_tokens=tuple(msg.prompt_tokens),
        model=msg.model,
        graph_id=msg.graph_id,
        metadata=metadata,
    )


def graph_arrays_from_proto(
    msg: graph_pb2.Graph | ScannedGraph, *, source: str = "", graph_id: str | None = None, fast: bool = True
) -> GraphArrays:
    """The aggregator's columns of a ``circuits.v1.Graph`` (or a :class:`ScannedGraph`), without
    building units or edges.

    Accepts and rejects exactly what :func:`graph_from_proto` does. ``graph_id`` overrides the
    message's id (files without one). With numba installed (the aggregator's dependency) a parsed
    message's columns come from one compiled scan of its bytes (:mod:`circuits_core._graph_scan`);
    ``fast=False`` reads them attribute by attribute (the reference the tests compare against).
    """
    tokens: Any
    if isinstance(msg, ScannedGraph):
        header, scanned = msg.header, msg._columns
    else:
        header, scanned = msg, None
        if fast and len(msg.units) >= _SCAN_MIN_UNITS and _graph_scan.available():
            scanned = _graph_scan.scan(msg.SerializeToString())
    if scanned is not None and fast:
        checked = _scanned_graph_arrays(header, scanned, source, graph_id)
        if checked is not None:
            return checked
    if scanned is not None:  # one compiled pass over the message's bytes (numba installed)
        layer, index, kinds = scanned.layer, scanned.index, scanned.kind
        n = layer.shape[0]
        has = np.stack([scanned.has_position, scanned.has_activation, scanned.has_attribution], axis=1)
        position = np.where(has[:, 0], scanned.position, NO_POSITION)
        values = np.stack([scanned.activation, scanned.attribution, scanned.probability], axis=1)
        tokens = _ScannedTokens(scanned.data, scanned.token_start, scanned.token_end)
        _check_units(layer, index, position, kinds)
        _check_edge_lengths(scanned.src.shape[0], scanned.tgt.shape[0], scanned.weight.shape[0],
                            scanned.raw_weight.shape[0])  # fmt: skip
        src, tgt, weight, _raw = _checked_edges(scanned.src, scanned.tgt, scanned.weight, None, n)
    else:  # one pass over the units per column group (the per-unit attribute reads are the cost here)
        units = msg.units
        n = len(units)
        ints = np.array(list(map(_UNIT_INTS, units)), dtype=np.int64).reshape(n, 3)
        layer, index, kinds = ints[:, 0], ints[:, 1], ints[:, 2]
        has = np.array(list(map(_unit_presence, units)), dtype=bool).reshape(n, 3)
        position = np.where(has[:, 0], np.fromiter(map(_UNIT_POSITION, units), dtype=np.int64, count=n), NO_POSITION)
        # An absent optional double reads as 0.0, so a non-finite value here was sent.
        values = np.array(list(map(_UNIT_VALUES, units)), dtype=np.float64).reshape(n, 3)
        tokens = _LazyTokens(units)
        _check_units(layer, index, position, kinds)
        src, tgt, weight, _raw = _edge_rows(msg.edges, n)
    extra = _extra_from_json(header.metadata.extra_json)
    if not np.isfinite(values).all():
        for col, name in enumerate(("activation", "attribution", "probability")):
            bad = np.flatnonzero(~np.isfinite(values[:, col]))
            if bad.size:
                row = int(bad[0])
                raise InvalidArgument(f"unit L{int(layer[row])}/N{int(index[row])}: {name} must be finite, got {float(values[row, col])}")
    nan = math.nan
    columns = {
        "activation": np.where(has[:, 1], values[:, 0], nan),
        "attribution": np.where(has[:, 2], values[:, 1], nan),
    }
    return graph_arrays_from_units(
        graph_id=header.graph_id if graph_id is None else graph_id,
        source=source,
        corpus_index=header.metadata.corpus_index if header.HasField("metadata") else -1,
        layer=layer,
        index=index,
        is_neuron=kinds == graph_pb2.UNIT_KIND_NEURON,
        activation=columns["activation"],
        attribution=columns["attribution"],
        edge_src=src,
        edge_tgt=tgt,
        edge_weight=weight,
        is_logit=kinds == graph_pb2.UNIT_KIND_LOGIT,
        tokens=tokens,
        model=header.model,
        extra=extra,
    )


def _scanned_graph_arrays(header: graph_pb2.Graph, scanned: _graph_scan.Scan, source: str,
                          graph_id: str | None) -> GraphArrays | None:  # fmt: skip
    """:func:`graph_arrays_from_proto` of a scanned graph with its checks and column selections
    in one compiled pass; None when a check fails (or numba is unavailable): the reference path
    then raises the error it always raised, so what is accepted and what each refusal says do
    not depend on this path (tests/aggregator/test_graph_scan.py compares the two)."""
    gid = header.graph_id if graph_id is None else graph_id
    try:
        extra = _extra_from_json(header.metadata.extra_json)
        num_layers, d_mlp = model_dims(extra, source or gid or "graph")
    except InvalidArgument:
        return None
    cols = _graph_scan.columns(scanned, num_layers, d_mlp, MAX_LAYER, MAX_NEURON)
    if cols is None:
        return None
    (unit_layer, unit_neuron, activation, attribution, src_layer, src_neuron, tgt_layer, tgt_neuron, weight,
     logit_layer, logit_neuron, logit_token, logit_weight, logit_rows) = cols  # fmt: skip
    names = {}
    if logit_rows.shape[0]:
        tokens = _ScannedTokens(scanned.data, scanned.token_start, scanned.token_end)
        for row in np.unique(logit_rows).tolist():
            names[int(scanned.index[row])] = tokens[row]
    return GraphArrays(
        graph_id=gid,
        source=source,
        corpus_index=header.metadata.corpus_index if header.HasField("metadata") else -1,
        unit_layer=unit_layer,
        unit_neuron=unit_neuron,
        unit_activation=activation,
        unit_attribution=attribution,
        edge_src_layer=src_layer,
        edge_src_neuron=src_neuron,
        edge_tgt_layer=tgt_layer,
        edge_tgt_neuron=tgt_neuron,
        edge_weight=weight,
        logit_src_layer=logit_layer,
        logit_src_neuron=logit_neuron,
        logit_token_id=logit_token,
        logit_weight=logit_weight,
        logit_tokens=tuple(sorted(names.items())),
        model=str(header.model),
        num_layers=num_layers,
        d_mlp=d_mlp,
    )


_UNIT_INTS = attrgetter("layer", "index", "kind")
_UNIT_POSITION = attrgetter("position")
_UNIT_VALUES = attrgetter("activation", "attribution", "probability")


def _unit_presence(u: Any) -> tuple[bool, bool, bool]:
    return u.HasField("position"), u.HasField("activation"), u.HasField("attribution")


def warm_graph_scan() -> bool:
    """Compile the graph scan of :func:`graph_arrays_from_proto` / :func:`graph_request_from_bytes`
    now (a server calls this before it serves); False when numba is not installed (protobuf's
    parse and attribute-by-attribute reads are used)."""
    return _graph_scan.warm()


#: Below this many units the attribute reads cost less than serializing the message for the scan.
_SCAN_MIN_UNITS = 32


class _ScannedTokens:
    """``token`` of unit ``row`` from the byte ranges the scan found (only logit rows are read)."""

    __slots__ = ("_data", "_start", "_end")

    def __init__(self, data: bytes, start: np.ndarray, end: np.ndarray) -> None:
        self._data, self._start, self._end = data, start, end

    def __getitem__(self, row: int) -> str:
        return self._data[int(self._start[row]):int(self._end[row])].decode("utf-8")


class _LazyTokens:
    """``units[row].token`` on demand (only logit rows are read; most graphs have a few)."""

    __slots__ = ("_units",)

    def __init__(self, units: Any) -> None:
        self._units = units

    def __getitem__(self, row: int) -> str:
        return self._units[row].token


# -- labeler ----------------------------------------------------------------------------------
def unit_refs_to_proto(keys: Iterable[tuple[int, int]]) -> list[labeler_pb2.UnitRef]:
    """(layer, index) pairs as labeler UnitRef messages."""
    return [labeler_pb2.UnitRef(layer=int(layer), index=int(index)) for layer, index in keys]


def unit_refs_from_proto(refs: Iterable[labeler_pb2.UnitRef]) -> list[tuple[int, int]]:
    """UnitRef messages as (layer, index) pairs; negative values raise InvalidArgument."""
    keys = []
    for ref in refs:
        if ref.layer < 0 or ref.index < 0:
            raise InvalidArgument(f"unit L{ref.layer}/N{ref.index}: layer and index must be >= 0")
        keys.append((ref.layer, ref.index))
    return keys


_PROGRESS_FIELDS = (
    "label_pass", "layer", "done", "total", "labelled", "cached", "failed", "input_tokens",
    "output_tokens", "spend_usd", "requests", "retries", "state", "message",
)


def label_progress_to_proto(progress: LabelProgress) -> labeler_pb2.LabelProgress:
    return labeler_pb2.LabelProgress(**{name: getattr(progress, name) for name in _PROGRESS_FIELDS})


def label_progress_from_proto(msg: labeler_pb2.LabelProgress) -> LabelProgress:
    return LabelProgress(**{name: getattr(msg, name) for name in _PROGRESS_FIELDS})


# -- attribution service (TraceRequest, ModelInfo) ---------------------------------------------
def trace_request_to_proto(request: TraceRequest) -> attribution_pb2.TraceRequest:
    """Encode a :class:`circuits_core.tracing.TraceRequest` (every setting explicit)."""
    msg = attribution_pb2.TraceRequest(
        prompt=request.prompt,
        answer_prefix=request.answer_prefix,
        corpus_index=request.corpus_index,
        slug=request.slug,
        tau=request.tau,
        max_nodes=request.max_nodes,
        over_max_nodes=request.over_max_nodes,
    )
    if request.raw is not None:  # unset: the server's model picks its prompt form
        msg.raw = request.raw
    msg.target.k = request.k
    msg.target.target_tokens.extend(request.target_tokens)
    if request.contrastive is not None:
        msg.target.contrastive_positive, msg.target.contrastive_negative = request.contrastive
    if request.target_position is not None:
        msg.target_position = request.target_position
    return msg


def trace_request_from_proto(msg: attribution_pb2.TraceRequest) -> TraceRequest:
    """Decode a ``circuits.v1.TraceRequest``; an unset field takes TraceRequest's default.

    Bad values raise InvalidArgument naming the field.
    """
    target = msg.target
    pos, neg = target.contrastive_positive, target.contrastive_negative
    if bool(pos) != bool(neg):
        raise InvalidArgument("contrastive target needs both contrastive_positive and contrastive_negative")
    given: dict[str, Any] = {
        "prompt": msg.prompt,
        "raw": msg.raw if msg.HasField("raw") else None,
        "answer_prefix": msg.answer_prefix,
        "slug": msg.slug,
        "target_tokens": tuple(target.target_tokens),
        "contrastive": (pos, neg) if pos else None,
    }
    if target.k:  # proto3 int: 0 is "not set"
        given["k"] = target.k
    if msg.over_max_nodes:
        given["over_max_nodes"] = msg.over_max_nodes
    for name in ("target_position", "tau", "max_nodes", "corpus_index"):
        if msg.HasField(name):
            given[name] = getattr(msg, name)
    return TraceRequest(**given)


def model_info_to_proto(info: ModelInfo) -> attribution_pb2.ModelInfo:
    return attribution_pb2.ModelInfo(
        model=info.model, num_layers=info.num_layers, d_model=info.d_model, d_mlp=info.d_mlp,
        vocab_size=info.vocab_size, max_context=info.max_context, dtype=info.dtype, device=info.device,
        architecture=info.architecture,
    )  # fmt: skip


def model_info_from_proto(msg: attribution_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        model=msg.model, num_layers=msg.num_layers, d_model=msg.d_model, d_mlp=msg.d_mlp,
        vocab_size=msg.vocab_size, max_context=msg.max_context, dtype=msg.dtype, device=msg.device,
        architecture=msg.architecture,
    )  # fmt: skip


# -- atlas ------------------------------------------------------------------------------------
_DIRECTIONS = {
    "both": atlas_pb2.EDGE_DIRECTION_BOTH,
    "downstream": atlas_pb2.EDGE_DIRECTION_DOWNSTREAM,
    "upstream": atlas_pb2.EDGE_DIRECTION_UPSTREAM,
}
_DIRECTION_NAMES = {v: k for k, v in _DIRECTIONS.items()}


def edge_direction_to_proto(direction: str) -> int:
    """"both" | "downstream" | "upstream" -> EdgeDirection enum value."""
    if direction not in _DIRECTIONS:
        raise InvalidArgument(f"direction must be one of {', '.join(_DIRECTIONS)}, got {echo(direction)}")
    return _DIRECTIONS[direction]


def edge_direction_from_proto(value: int) -> str:
    if value not in _DIRECTION_NAMES:
        raise InvalidArgument(f"unknown edge direction {value}")
    return _DIRECTION_NAMES[value]


def search_hits_to_proto(hits: Iterable[SearchHit]) -> atlas_pb2.SearchUnitsResponse:
    """list[SearchHit] -> SearchUnitsResponse (units and scores in the same order)."""
    msg = atlas_pb2.SearchUnitsResponse()
    for hit in hits:
        unit_to_proto(hit.unit, msg.units.add())
        msg.scores.append(hit.score)
    return msg


def search_hits_from_proto(msg: atlas_pb2.SearchUnitsResponse) -> list[SearchHit]:
    if len(msg.scores) not in (0, len(msg.units)):
        raise InvalidArgument("search response has a different number of scores and units")
    scores = list(msg.scores) or [0.0] * len(msg.units)
    return [SearchHit(unit=unit_from_proto(u), score=s) for u, s in zip(msg.units, scores)]


def edges_response_to_proto(edges: Iterable[Edge]) -> atlas_pb2.GetEdgesForUnitResponse:
    msg = atlas_pb2.GetEdgesForUnitResponse()
    msg.edges.extend(edge_to_proto(e) for e in edges)
    return msg


def _cluster_info_to_proto(c: ClusterInfo) -> atlas_pb2.ClusterInfo:
    return atlas_pb2.ClusterInfo(
        cluster_path=c.cluster_path, level=c.level, size=c.size, layer_min=c.layer_min,
        layer_max=c.layer_max, median_layer=c.median_layer,
    )  # fmt: skip


def _cluster_info_from_proto(c: atlas_pb2.ClusterInfo) -> ClusterInfo:
    return ClusterInfo(
        cluster_path=c.cluster_path, level=c.level, size=c.size, layer_min=c.layer_min,
        layer_max=c.layer_max, median_layer=c.median_layer,
    )  # fmt: skip


def cluster_members_to_proto(members: ClusterMembers) -> atlas_pb2.GetClusterResponse:
    """ClusterMembers -> GetClusterResponse."""
    msg = atlas_pb2.GetClusterResponse(cluster=_cluster_info_to_proto(members.cluster))
    for unit in members.units:
        unit_to_proto(unit, msg.units.add())
    return msg


def cluster_members_from_proto(msg: atlas_pb2.GetClusterResponse) -> ClusterMembers:
    return ClusterMembers(
        cluster=_cluster_info_from_proto(msg.cluster), units=tuple(unit_from_proto(u) for u in msg.units)
    )


def atlas_stats_to_proto(stats: AtlasStats) -> atlas_pb2.AtlasStats:
    msg = atlas_pb2.AtlasStats(neurons=stats.neurons, edges=stats.edges, clusters=stats.clusters)
    msg.metadata.update(dict(stats.metadata))
    return msg


def atlas_stats_from_proto(msg: atlas_pb2.AtlasStats) -> AtlasStats:
    return AtlasStats(neurons=msg.neurons, edges=msg.edges, clusters=msg.clusters, metadata=dict(msg.metadata))


_CARD_STATS = ("mean_activation", "max_activation", "mean_attribution", "output_norm", "num_exemplars")


def unit_card_to_proto(card: UnitCard) -> atlas_pb2.UnitCard:
    """UnitCard -> atlas_pb2.UnitCard (absent statistics stay unset)."""
    msg = atlas_pb2.UnitCard(downstream_edges=card.downstream_edges, upstream_edges=card.upstream_edges)
    unit_to_proto(card.unit, msg.unit)
    msg.stats.observation_count = card.stats.observation_count
    for name in _CARD_STATS:
        value = getattr(card.stats, name)
        if value is not None:
            setattr(msg.stats, name, value)
    if card.cluster is not None:
        msg.cluster.CopyFrom(_cluster_info_to_proto(card.cluster))
    return msg


def unit_card_from_proto(msg: atlas_pb2.UnitCard) -> UnitCard:
    s = msg.stats
    stats = UnitActivationStats(
        observation_count=s.observation_count,
        **{name: getattr(s, name) if s.HasField(name) else None for name in _CARD_STATS},
    )
    return UnitCard(
        unit=unit_from_proto(msg.unit), stats=stats,
        cluster=_cluster_info_from_proto(msg.cluster) if msg.HasField("cluster") else None,
        downstream_edges=msg.downstream_edges, upstream_edges=msg.upstream_edges,
    )  # fmt: skip


# -- attribution service: Intervene ------------------------------------------------------------
_INTERVENTION_MODES = {"set": 1, "scale": 2, "zero": 3, "mean": 4}
_INTERVENTION_MODE_NAMES = {v: k for k, v in _INTERVENTION_MODES.items()}


def intervene_request_to_proto(request: InterventionRequest) -> attribution_pb2.InterveneRequest:
    """Encode an :class:`~circuits_core.interventions.InterventionRequest`."""
    msg = attribution_pb2.InterveneRequest(
        prompt=request.prompt, answer_prefix=request.answer_prefix,
        top_k=request.top_k, generate_tokens=request.generate_tokens,
    )  # fmt: skip
    if request.raw is not None:
        msg.raw = request.raw
    for item in request.interventions:
        msg.interventions.add(
            layer=item.layer, index=item.index, positions=list(item.positions or ()),
            mode=_INTERVENTION_MODES[item.mode], value=float(item.value), include_generated=item.include_generated,
        )  # fmt: skip
    return msg


def intervene_request_from_proto(msg: attribution_pb2.InterveneRequest) -> InterventionRequest:
    """Decode ``circuits.v1.InterveneRequest``; top_k 0 means 10. Bad values raise InvalidArgument."""
    interventions = []
    for number, item in enumerate(msg.interventions):
        mode = _INTERVENTION_MODE_NAMES.get(item.mode)
        if mode is None:
            raise InvalidArgument(f"intervention {number}: mode is unspecified (use SET, SCALE, ZERO or MEAN)")
        interventions.append(
            NeuronIntervention(
                layer=item.layer, index=item.index, mode=mode, value=item.value,
                positions=tuple(item.positions) or None, include_generated=item.include_generated,
            )
        )  # fmt: skip
    return InterventionRequest(
        prompt=msg.prompt, interventions=tuple(interventions), raw=msg.raw if msg.HasField("raw") else None,
        answer_prefix=msg.answer_prefix,
        top_k=msg.top_k or 10, generate_tokens=msg.generate_tokens,
    )  # fmt: skip


def _token_probabilities_to_proto(items: Iterable[TokenProbability]) -> list[attribution_pb2.TokenProbability]:
    return [
        attribution_pb2.TokenProbability(token=t.token, token_id=t.token_id, logit=t.logit, probability=t.probability)
        for t in items
    ]


def _token_probabilities_from_proto(items: Iterable[attribution_pb2.TokenProbability]) -> tuple[TokenProbability, ...]:
    return tuple(
        TokenProbability(token=t.token, token_id=t.token_id, logit=t.logit, probability=t.probability) for t in items
    )


def intervention_result_to_proto(result: InterventionResult) -> attribution_pb2.InterveneResponse:
    """Encode an :class:`~circuits_core.interventions.InterventionResult`."""
    return attribution_pb2.InterveneResponse(
        baseline=_token_probabilities_to_proto(result.baseline),
        intervened=_token_probabilities_to_proto(result.intervened),
        tracked=_token_probabilities_to_proto(result.tracked),
        generated_text=result.generated_text, baseline_text=result.baseline_text,
        prompt_tokens=list(result.prompt_tokens), position=result.position,
    )  # fmt: skip


def intervention_result_from_proto(
    msg: attribution_pb2.InterveneResponse, *, interventions: Sequence[NeuronIntervention] = ()
) -> InterventionResult:
    """Decode ``circuits.v1.InterveneResponse`` (``interventions`` echo the request's)."""
    return InterventionResult(
        prompt_tokens=tuple(msg.prompt_tokens), position=msg.position,
        baseline=_token_probabilities_from_proto(msg.baseline),
        intervened=_token_probabilities_from_proto(msg.intervened),
        tracked=_token_probabilities_from_proto(msg.tracked), baseline_text=msg.baseline_text,
        generated_text=msg.generated_text, interventions=tuple(interventions),
    )  # fmt: skip


# -- attribution service: GetActivations -------------------------------------------------------
def activation_request_to_proto(request: Any) -> Any:
    """Encode a :class:`circuits_core.activations.ActivationRequest` as ``circuits.v1.GetActivationsRequest``."""
    from circuits_core._proto.circuits.v1 import attribution_pb2

    return attribution_pb2.GetActivationsRequest(
        prompts=list(request.prompts), chat_template=not request.raw, answer_prefix=request.answer_prefix,
        neurons=[attribution_pb2.NeuronRef(layer=layer, index=index) for layer, index in request.neurons],
    )


def activation_request_from_proto(msg: Any) -> Any:
    """Decode ``circuits.v1.GetActivationsRequest``; bad values raise InvalidArgument."""
    from circuits_core.activations import ActivationRequest

    return ActivationRequest(prompts=tuple(msg.prompts), neurons=tuple((n.layer, n.index) for n in msg.neurons),
                             raw=not msg.chat_template, answer_prefix=msg.answer_prefix)


def activation_result_to_proto(result: Any) -> Any:
    """Encode a :class:`circuits_core.activations.ActivationResult` as ``circuits.v1.GetActivationsResponse``."""
    from circuits_core._proto.circuits.v1 import attribution_pb2

    return attribution_pb2.GetActivationsResponse(prompts=[
        attribution_pb2.PromptActivations(
            prompt=p.prompt, tokens=list(p.tokens), special_positions=list(p.special_positions),
            neurons=[attribution_pb2.NeuronActivations(values=list(row)) for row in p.values],
        )
        for p in result.prompts
    ])


def activation_result_from_proto(msg: Any, *, neurons: Sequence[tuple[int, int]] = ()) -> Any:
    """Decode ``circuits.v1.GetActivationsResponse`` (``neurons`` echo the request's)."""
    from circuits_core.activations import ActivationResult, PromptActivations

    return ActivationResult(neurons=tuple(neurons), prompts=tuple(
        PromptActivations(prompt=p.prompt, tokens=tuple(p.tokens), values=tuple(tuple(n.values) for n in p.neurons),
                          special_positions=tuple(p.special_positions))
        for p in msg.prompts
    ))


# -- labeler service: Investigate --------------------------------------------------------------
_EVENT_FIELDS = ("kind", "step", "message", "tool", "ok", "status", "label", "confidence", "predictions_correct",
                 "predictions_total", "report_path", "spend_usd")


def investigation_event_to_proto(event: Any) -> Any:
    """circuits_core.investigation.InvestigationEvent -> circuits.v1.InvestigationEvent."""
    from circuits_core._proto.circuits.v1 import labeler_pb2

    return labeler_pb2.InvestigationEvent(**{name: getattr(event, name) for name in _EVENT_FIELDS})


def investigation_event_from_proto(msg: Any) -> Any:
    from circuits_core.investigation import InvestigationEvent

    return InvestigationEvent(**{name: getattr(msg, name) for name in _EVENT_FIELDS})


# -- aggregator -------------------------------------------------------------------------------
def ingest_ack_to_proto(ack: IngestAck) -> aggregator_pb2.IngestAck:
    return aggregator_pb2.IngestAck(
        graph_ids=list(ack.graph_ids),
        duplicates=ack.duplicates,
        graphs_total=ack.graphs_total,
        rejected_graph_ids=list(ack.rejected_graph_ids),
        conflict_graph_ids=list(ack.conflict_graph_ids),
    )


def ingest_ack_from_proto(msg: aggregator_pb2.IngestAck) -> IngestAck:
    return IngestAck(
        graph_ids=tuple(msg.graph_ids),
        duplicates=msg.duplicates,
        graphs_total=msg.graphs_total,
        rejected_graph_ids=tuple(msg.rejected_graph_ids),
        conflict_graph_ids=tuple(msg.conflict_graph_ids),
    )


def edge_columns_to_proto(cols: EdgeColumns) -> aggregator_pb2.EdgeBatch:
    """Aggregated edge columns -> ``circuits.v1.EdgeBatch`` (packed columns)."""
    return aggregator_pb2.EdgeBatch(
        src_layer=cols.src_layer.tolist(),
        src_index=cols.src_neuron.tolist(),
        tgt_layer=cols.tgt_layer.tolist(),
        tgt_index=cols.tgt_neuron.tolist(),
        count=cols.count.tolist(),
        weight_sum=cols.weight_sum.tolist(),
        weight_abs_sum=cols.weight_abs_sum.tolist(),
        weight_sq_sum=cols.weight_sq_sum.tolist(),
        weight_min=cols.weight_min.tolist(),
        weight_max=cols.weight_max.tolist(),
    )


def edge_columns_from_proto(msg: aggregator_pb2.EdgeBatch) -> EdgeColumns:
    """``circuits.v1.EdgeBatch`` -> EdgeColumns; ragged columns raise InvalidArgument."""
    n = len(msg.count)
    names = ("src_layer", "src_index", "tgt_layer", "tgt_index", "weight_sum", "weight_abs_sum",
             "weight_sq_sum", "weight_min", "weight_max")  # fmt: skip
    if any(len(getattr(msg, name)) != n for name in names):
        raise InvalidArgument("edge batch columns differ in length")
    return EdgeColumns(
        src_layer=np.array(msg.src_layer, dtype=np.int32),
        src_neuron=np.array(msg.src_index, dtype=np.int32),
        tgt_layer=np.array(msg.tgt_layer, dtype=np.int32),
        tgt_neuron=np.array(msg.tgt_index, dtype=np.int32),
        count=np.array(msg.count, dtype=np.int64),
        weight_sum=np.array(msg.weight_sum, dtype=np.float64),
        weight_abs_sum=np.array(msg.weight_abs_sum, dtype=np.float64),
        weight_sq_sum=np.array(msg.weight_sq_sum, dtype=np.float64),
        weight_min=np.array(msg.weight_min, dtype=np.float64),
        weight_max=np.array(msg.weight_max, dtype=np.float64),
    )


_AGG_STATS_FIELDS = (
    "graphs_processed", "total_edge_observations", "distinct_edges", "distinct_units", "shard_index", "shard_count",
)  # fmt: skip


def aggregator_stats_to_proto(stats: AggregatorStats) -> aggregator_pb2.AggregatorStats:
    return aggregator_pb2.AggregatorStats(**{name: getattr(stats, name) for name in _AGG_STATS_FIELDS})


def aggregator_stats_from_proto(msg: aggregator_pb2.AggregatorStats) -> AggregatorStats:
    return AggregatorStats(**{name: getattr(msg, name) for name in _AGG_STATS_FIELDS})


# -- atlas: weight-based connectivity ---------------------------------------------------------
def _token_weights_to_proto(items: Iterable[Any], out: Any) -> None:
    for t in items:
        out.add(token_id=t.token_id, token=t.token, weight=t.weight)


def _token_weights_from_proto(items: Iterable[Any]) -> tuple[Any, ...]:
    from circuits_core.connectivity import TokenWeight

    return tuple(TokenWeight(token_id=t.token_id, token=t.token, weight=t.weight) for t in items)


def unit_projections_to_proto(proj: Any) -> Any:
    """:class:`circuits_core.connectivity.UnitProjections` -> ``circuits.v1.UnitProjections``."""
    msg = atlas_pb2.UnitProjections(
        layer=proj.layer, index=proj.neuron, output_norm=proj.output_norm, logit_effect=proj.logit_effect
    )
    _token_weights_to_proto(proj.promotes, msg.promotes)
    _token_weights_to_proto(proj.suppresses, msg.suppresses)
    _token_weights_to_proto(proj.input_tokens, msg.input_tokens)
    return msg


def unit_projections_from_proto(msg: Any) -> Any:
    from circuits_core.connectivity import UnitProjections

    return UnitProjections(
        layer=msg.layer, neuron=msg.index, output_norm=msg.output_norm, logit_effect=msg.logit_effect,
        promotes=_token_weights_from_proto(msg.promotes), suppresses=_token_weights_from_proto(msg.suppresses),
        input_tokens=_token_weights_from_proto(msg.input_tokens),
    )


def weight_edges_to_proto(edges: Iterable[Any]) -> Any:
    """list[WeightEdge] -> ``circuits.v1.GetWeightEdgesResponse``."""
    msg = atlas_pb2.GetWeightEdgesResponse()
    for e in edges:
        msg.edges.add(
            src_layer=e.src_layer, src_index=e.src_neuron, tgt_layer=e.tgt_layer, tgt_index=e.tgt_neuron,
            polarity=e.polarity, c_up=e.c_up, c_gate=e.c_gate, strength=e.strength,
        )
    return msg


def weight_edges_from_proto(msg: Any) -> list[Any]:
    from circuits_core.connectivity import WeightEdge

    return [
        WeightEdge(
            src_layer=e.src_layer, src_neuron=e.src_index, tgt_layer=e.tgt_layer, tgt_neuron=e.tgt_index,
            polarity=e.polarity, c_up=e.c_up, c_gate=e.c_gate, strength=e.strength,
        )
        for e in msg.edges
    ]


# -- attribution service: Patch ---------------------------------------------------------------
def patch_request_to_proto(request: Any) -> Any:
    """:class:`circuits_core.patching.PatchRequest` -> ``circuits.v1.PatchRequest``."""
    from circuits_core._proto.circuits.v1 import attribution_pb2

    msg = attribution_pb2.PatchRequest(
        clean_prompt=request.clean, corrupt_prompt=request.corrupt, top=request.top,
        target_tokens=list(request.target_tokens), raw=request.raw, answer_prefix=request.answer_prefix,
    )
    for item in request.neurons:
        neuron = msg.neurons.add(layer=item.layer, index=item.index)
        if item.position is not None:
            neuron.position = item.position
    return msg


def patch_request_from_proto(msg: Any) -> Any:
    """Decode ``circuits.v1.PatchRequest`` (top 0 means the default); bad values raise InvalidArgument."""
    from circuits_core.patching import DEFAULT_TOP, PatchNeuron, PatchRequest

    neurons = tuple(
        PatchNeuron(layer=n.layer, index=n.index, position=n.position if n.HasField("position") else None)
        for n in msg.neurons
    )
    return PatchRequest(
        clean=msg.clean_prompt, corrupt=msg.corrupt_prompt, neurons=neurons, top=msg.top or DEFAULT_TOP,
        target_tokens=tuple(msg.target_tokens), raw=msg.raw, answer_prefix=msg.answer_prefix,
    )


_PATCH_SCALARS = (
    "metric", "positive_token", "positive_token_id", "negative_token", "negative_token_id", "clean_metric",
    "corrupt_metric", "set_noising", "set_denoising", "set_predicted", "rank_correlation", "magnitude_rank_correlation",
    "compared", "first_difference",
)
_EFFECT_SCALARS = ("layer", "index", "clean_activation", "corrupt_activation", "relp", "predicted", "noising", "denoising")


def patch_result_to_proto(result: Any) -> Any:
    """:class:`circuits_core.patching.PatchResult` -> ``circuits.v1.PatchResponse``."""
    from circuits_core._proto.circuits.v1 import attribution_pb2

    msg = attribution_pb2.PatchResponse(
        clean_tokens=list(result.clean_tokens), corrupt_tokens=list(result.corrupt_tokens),
        **{name: getattr(result, name) for name in _PATCH_SCALARS},
    )
    for effect in result.neurons:
        item = msg.neurons.add(**{name: getattr(effect, name) for name in _EFFECT_SCALARS})
        if effect.position is not None:
            item.position = effect.position
    return msg


def patch_result_from_proto(msg: Any) -> Any:
    from circuits_core.patching import NeuronPatchEffect, PatchResult

    return PatchResult(
        clean_tokens=tuple(msg.clean_tokens), corrupt_tokens=tuple(msg.corrupt_tokens),
        neurons=tuple(
            NeuronPatchEffect(
                position=n.position if n.HasField("position") else None,
                **{name: getattr(n, name) for name in _EFFECT_SCALARS},
            )
            for n in msg.neurons
        ),
        **{name: getattr(msg, name) for name in _PATCH_SCALARS},
    )

"""The only place that converts domain types to and from protobuf messages.

Servicers and clients call these functions; nothing else touches ``*_pb2``. Conversions are
lossless for every value the domain types can hold (a missing ``raw_weight`` inside a graph whose
other edges have one travels as NaN, and NaN reads back as missing).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

from circuits._proto.circuits.v1 import graph_pb2
from circuits.errors import InvalidArgument
from circuits.schemas import Edge, Graph, GraphMetadata, Unit, UnitLabel

_KIND_TO_PB = {
    "neuron": graph_pb2.UNIT_KIND_NEURON,
    "embedding": graph_pb2.UNIT_KIND_EMBEDDING,
    "logit": graph_pb2.UNIT_KIND_LOGIT,
}
_PB_TO_KIND = {v: k for k, v in _KIND_TO_PB.items()}


def _opt(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg.HasField(name) else None


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
        msg.labels.add(
            text=label.text, source=label.source, confidence=label.confidence, description=label.description
        )
    msg.cluster = unit.cluster
    return msg


def unit_from_proto(msg: graph_pb2.Unit) -> Unit:
    kind = _PB_TO_KIND.get(msg.kind)
    if kind is None:
        raise InvalidArgument(f"unit L{msg.layer}/N{msg.index}: kind must be set (neuron, embedding or logit)")
    return Unit(
        layer=msg.layer,
        index=msg.index,
        position=_opt(msg, "position"),
        kind=kind,
        label=msg.label,
        input_label=msg.input_label,
        activation=_opt(msg, "activation"),
        attribution=_opt(msg, "attribution"),
        token=msg.token,
        probability=_opt(msg, "probability"),
        appearance_count=msg.appearance_count,
        labels=tuple(
            UnitLabel(text=l.text, source=l.source, confidence=l.confidence, description=l.description)
            for l in msg.labels
        ),
        cluster=msg.cluster,
    )


# -- edges (row form) -------------------------------------------------------------------------
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
        src_position=_opt(msg, "src_position"),
        tgt_position=_opt(msg, "tgt_position"),
        raw_weight=_opt(msg, "raw_weight"),
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
    try:
        extra = json.loads(msg.extra_json) if msg.extra_json else {}
    except json.JSONDecodeError:
        raise InvalidArgument("graph metadata extra_json is not valid JSON") from None
    if not isinstance(extra, dict):
        raise InvalidArgument("graph metadata extra_json must be a JSON object")
    return GraphMetadata(
        slug=msg.slug,
        scan=msg.scan,
        target_position=_opt(msg, "target_position"),
        node_threshold=_opt(msg, "node_threshold"),
        metric_value=_opt(msg, "metric_value"),
        nodes_exceeded=msg.nodes_exceeded,
        max_n_logits=msg.max_n_logits,
        create_time_ms=msg.create_time_ms,
        generator=msg.generator,
        generator_version=msg.generator_version,
        corpus_index=msg.corpus_index,
        extra=extra,
    )


def graph_to_proto(graph: Graph, out: graph_pb2.Graph | None = None) -> graph_pb2.Graph:
    """Encode a graph; edges become packed columns of unit indices."""
    msg = out if out is not None else graph_pb2.Graph()
    msg.graph_id = graph.graph_id
    msg.model = graph.model
    msg.prompt = graph.prompt
    msg.prompt_tokens.extend(graph.prompt_tokens)
    for unit in graph.units:
        unit_to_proto(unit, msg.units.add())
    index = graph.unit_index()
    try:
        src = [index[e.src_key] for e in graph.edges]
        tgt = [index[e.tgt_key] for e in graph.edges]
    except KeyError as exc:
        raise InvalidArgument(f"edge endpoint {exc.args[0]} is not a unit of the graph") from None
    table = msg.edges
    table.src.extend(src)
    table.tgt.extend(tgt)
    table.weight.extend([e.weight for e in graph.edges])
    raw = [e.raw_weight for e in graph.edges]
    if any(r is not None for r in raw):
        table.raw_weight.extend([math.nan if r is None else r for r in raw])
    metadata_to_proto(graph.metadata, msg.metadata)
    return msg


def graph_from_proto(msg: graph_pb2.Graph) -> Graph:
    """Decode a graph; malformed edge tables raise InvalidArgument."""
    units = tuple(unit_from_proto(u) for u in msg.units)
    table = msg.edges
    n = len(table.src)
    if len(table.tgt) != n or len(table.weight) != n or (len(table.raw_weight) not in (0, n)):
        raise InvalidArgument(
            f"edge table columns differ in length (src={n}, tgt={len(table.tgt)}, "
            f"weight={len(table.weight)}, raw_weight={len(table.raw_weight)})"
        )
    n_units = len(units)
    if n and (max(table.src) >= n_units or max(table.tgt) >= n_units):
        raise InvalidArgument(f"edge table refers to a unit index >= {n_units} (number of units)")
    raw: Sequence[float | None] = (
        [None if math.isnan(r) else r for r in table.raw_weight] if len(table.raw_weight) else [None] * n
    )
    edges = tuple(
        Edge(
            src_layer=units[s].layer, src_index=units[s].index, src_position=units[s].position,
            tgt_layer=units[t].layer, tgt_index=units[t].index, tgt_position=units[t].position,
            weight=w, raw_weight=r,
        )
        for s, t, w, r in zip(table.src, table.tgt, table.weight, raw)
    )
    return Graph(
        units=units,
        edges=edges,
        prompt=msg.prompt,
        prompt_tokens=tuple(msg.prompt_tokens),
        model=msg.model,
        graph_id=msg.graph_id,
        metadata=metadata_from_proto(msg.metadata),
    )


def units_to_proto(units: Iterable[Unit]) -> list[graph_pb2.Unit]:
    return [unit_to_proto(u) for u in units]


def edges_to_proto(edges: Iterable[Edge]) -> list[graph_pb2.Edge]:
    return [edge_to_proto(e) for e in edges]

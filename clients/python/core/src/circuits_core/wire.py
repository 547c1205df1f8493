"""The only place that converts domain types to and from protobuf messages.

Servicers and clients call these functions; nothing else touches ``*_pb2``. Conversions are
lossless for every value the domain types can hold (a missing ``raw_weight`` inside a graph whose
other edges have one travels as NaN, and NaN reads back as missing).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from circuits_core._proto.circuits.v1 import graph_pb2
from circuits_core.errors import InvalidArgument, echo
from circuits_core.schemas import Edge, Graph, GraphMetadata, Unit, UnitLabel

if TYPE_CHECKING:
    from circuits_core._proto.circuits.v1 import attribution_pb2
    from circuits_core.tracing import TraceRequest

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
            UnitLabel(
                text=l.text, source=l.source, confidence=l.confidence, description=l.description,
                score_detection=_opt(l, "score_detection"), score_simulation=_opt(l, "score_simulation"),
                score_contexts=l.score_contexts, score_positives=l.score_positives,
            )
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


# -- labeler ----------------------------------------------------------------------------------
def unit_refs_to_proto(keys: Iterable[tuple[int, int]]) -> list[Any]:
    """(layer, index) pairs as labeler UnitRef messages."""
    from circuits_core._proto.circuits.v1 import labeler_pb2

    return [labeler_pb2.UnitRef(layer=int(layer), index=int(index)) for layer, index in keys]


def unit_refs_from_proto(refs: Iterable[Any]) -> list[tuple[int, int]]:
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


def label_progress_to_proto(progress: Any) -> Any:
    """circuits_core.schemas.LabelProgress -> circuits.v1.LabelProgress."""
    from circuits_core._proto.circuits.v1 import labeler_pb2

    return labeler_pb2.LabelProgress(**{name: getattr(progress, name) for name in _PROGRESS_FIELDS})


def label_progress_from_proto(msg: Any) -> Any:
    """circuits.v1.LabelProgress -> circuits_core.schemas.LabelProgress."""
    from circuits_core.schemas import LabelProgress

    return LabelProgress(**{name: getattr(msg, name) for name in _PROGRESS_FIELDS})


# -- attribution service (TraceRequest, ModelInfo) ---------------------------------------------
def trace_request_to_proto(request: TraceRequest) -> attribution_pb2.TraceRequest:
    """Encode a :class:`circuits_core.tracing.TraceRequest` (every setting explicit)."""
    from circuits_core._proto.circuits.v1 import attribution_pb2

    msg = attribution_pb2.TraceRequest(
        prompt=request.prompt,
        raw=request.raw,
        answer_prefix=request.answer_prefix,
        corpus_index=request.corpus_index,
        slug=request.slug,
        tau=request.tau,
        max_nodes=request.max_nodes,
    )
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
    from circuits_core.tracing import TraceRequest

    target = msg.target
    pos, neg = target.contrastive_positive, target.contrastive_negative
    if bool(pos) != bool(neg):
        raise InvalidArgument("contrastive target needs both contrastive_positive and contrastive_negative")
    given: dict[str, Any] = {
        "prompt": msg.prompt,
        "raw": msg.raw,
        "answer_prefix": msg.answer_prefix,
        "slug": msg.slug,
        "target_tokens": tuple(target.target_tokens),
        "contrastive": (pos, neg) if pos else None,
    }
    if target.k:  # proto3 int: 0 is "not set"
        given["k"] = target.k
    for name in ("target_position", "tau", "max_nodes", "corpus_index"):
        if msg.HasField(name):
            given[name] = getattr(msg, name)
    return TraceRequest(**given)


def model_info_to_proto(info: Any) -> Any:
    """Encode a :class:`circuits_core.tracing.ModelInfo`."""
    from circuits_core._proto.circuits.v1 import attribution_pb2

    return attribution_pb2.ModelInfo(
        model=info.model, num_layers=info.num_layers, d_model=info.d_model, d_mlp=info.d_mlp,
        vocab_size=info.vocab_size, max_context=info.max_context, dtype=info.dtype, device=info.device,
        architecture=info.architecture,
    )


def model_info_from_proto(msg: Any) -> Any:
    from circuits_core.tracing import ModelInfo

    return ModelInfo(
        model=msg.model, num_layers=msg.num_layers, d_model=msg.d_model, d_mlp=msg.d_mlp,
        vocab_size=msg.vocab_size, max_context=msg.max_context, dtype=msg.dtype, device=msg.device,
        architecture=msg.architecture,
    )


# -- atlas ------------------------------------------------------------------------------------
def _atlas_pb2() -> Any:
    from circuits_core._proto.circuits.v1 import atlas_pb2

    return atlas_pb2


_DIRECTION_NAMES = ("both", "downstream", "upstream")


def edge_direction_to_proto(direction: str) -> int:
    """"both" | "downstream" | "upstream" -> EdgeDirection enum value."""
    pb = _atlas_pb2()
    values = {
        "both": pb.EDGE_DIRECTION_BOTH,
        "downstream": pb.EDGE_DIRECTION_DOWNSTREAM,
        "upstream": pb.EDGE_DIRECTION_UPSTREAM,
    }
    if direction not in values:
        raise InvalidArgument(f"direction must be one of {', '.join(_DIRECTION_NAMES)}, got {echo(direction)}")
    return values[direction]


def edge_direction_from_proto(value: int) -> str:
    pb = _atlas_pb2()
    names = {
        pb.EDGE_DIRECTION_BOTH: "both",
        pb.EDGE_DIRECTION_DOWNSTREAM: "downstream",
        pb.EDGE_DIRECTION_UPSTREAM: "upstream",
    }
    if value not in names:
        raise InvalidArgument(f"unknown edge direction {value}")
    return names[value]


def search_hits_to_proto(hits: Iterable[Any]) -> Any:
    """list[SearchHit] -> SearchUnitsResponse (units and scores in the same order)."""
    msg = _atlas_pb2().SearchUnitsResponse()
    for hit in hits:
        unit_to_proto(hit.unit, msg.units.add())
        msg.scores.append(hit.score)
    return msg


def search_hits_from_proto(msg: Any) -> list[Any]:
    from circuits_core.atlas_types import SearchHit

    if len(msg.scores) not in (0, len(msg.units)):
        raise InvalidArgument("search response has a different number of scores and units")
    scores = list(msg.scores) or [0.0] * len(msg.units)
    return [SearchHit(unit=unit_from_proto(u), score=s) for u, s in zip(msg.units, scores)]


def edges_response_to_proto(edges: Iterable[Edge]) -> Any:
    msg = _atlas_pb2().GetEdgesForUnitResponse()
    msg.edges.extend(edge_to_proto(e) for e in edges)
    return msg


def cluster_members_to_proto(members: Any) -> Any:
    """ClusterMembers -> GetClusterResponse."""
    pb = _atlas_pb2()
    c = members.cluster
    msg = pb.GetClusterResponse(
        cluster=pb.ClusterInfo(
            cluster_path=c.cluster_path, level=c.level, size=c.size, layer_min=c.layer_min,
            layer_max=c.layer_max, median_layer=c.median_layer,
        )
    )
    for unit in members.units:
        unit_to_proto(unit, msg.units.add())
    return msg


def cluster_members_from_proto(msg: Any) -> Any:
    from circuits_core.atlas_types import ClusterInfo, ClusterMembers

    c = msg.cluster
    return ClusterMembers(
        cluster=ClusterInfo(
            cluster_path=c.cluster_path, level=c.level, size=c.size, layer_min=c.layer_min,
            layer_max=c.layer_max, median_layer=c.median_layer,
        ),
        units=tuple(unit_from_proto(u) for u in msg.units),
    )


def atlas_stats_to_proto(stats: Any) -> Any:
    msg = _atlas_pb2().AtlasStats(neurons=stats.neurons, edges=stats.edges, clusters=stats.clusters)
    msg.metadata.update(dict(stats.metadata))
    return msg


def atlas_stats_from_proto(msg: Any) -> Any:
    from circuits_core.atlas_types import AtlasStats

    return AtlasStats(neurons=msg.neurons, edges=msg.edges, clusters=msg.clusters, metadata=dict(msg.metadata))


def _cluster_info_to_proto(pb: Any, c: Any) -> Any:
    return pb.ClusterInfo(
        cluster_path=c.cluster_path, level=c.level, size=c.size, layer_min=c.layer_min,
        layer_max=c.layer_max, median_layer=c.median_layer,
    )  # fmt: skip


def unit_card_to_proto(card: Any) -> Any:
    """UnitCard -> atlas_pb2.UnitCard (absent statistics stay unset)."""
    pb = _atlas_pb2()
    msg = pb.UnitCard(downstream_edges=card.downstream_edges, upstream_edges=card.upstream_edges)
    unit_to_proto(card.unit, msg.unit)
    s = card.stats
    msg.stats.observation_count = s.observation_count
    for name in ("mean_activation", "max_activation", "mean_attribution", "output_norm", "num_exemplars"):
        value = getattr(s, name)
        if value is not None:
            setattr(msg.stats, name, value)
    if card.cluster is not None:
        msg.cluster.CopyFrom(_cluster_info_to_proto(pb, card.cluster))
    return msg


def unit_card_from_proto(msg: Any) -> Any:
    from circuits_core.atlas_types import ClusterInfo, UnitActivationStats, UnitCard

    s = msg.stats
    stats = UnitActivationStats(
        observation_count=s.observation_count,
        **{name: _opt(s, name) for name in ("mean_activation", "max_activation", "mean_attribution", "output_norm", "num_exemplars")},
    )
    cluster = None
    if msg.HasField("cluster"):
        c = msg.cluster
        cluster = ClusterInfo(
            cluster_path=c.cluster_path, level=c.level, size=c.size, layer_min=c.layer_min,
            layer_max=c.layer_max, median_layer=c.median_layer,
        )  # fmt: skip
    return UnitCard(
        unit=unit_from_proto(msg.unit), stats=stats, cluster=cluster,
        downstream_edges=msg.downstream_edges, upstream_edges=msg.upstream_edges,
    )  # fmt: skip


# -- attribution service: Intervene ------------------------------------------------------------
_INTERVENTION_MODES = {"set": 1, "scale": 2, "zero": 3, "mean": 4}
_INTERVENTION_MODE_NAMES = {v: k for k, v in _INTERVENTION_MODES.items()}


def intervene_request_to_proto(request: Any) -> Any:
    """Encode a :class:`circuits_core.interventions.InterventionRequest` as ``circuits.v1.InterveneRequest``."""
    from circuits_core._proto.circuits.v1 import attribution_pb2

    msg = attribution_pb2.InterveneRequest(
        prompt=request.prompt, raw=request.raw, answer_prefix=request.answer_prefix,
        top_k=request.top_k, generate_tokens=request.generate_tokens,
    )
    for item in request.interventions:
        msg.interventions.add(
            layer=item.layer, index=item.index, positions=list(item.positions or ()),
            mode=_INTERVENTION_MODES[item.mode], value=float(item.value), include_generated=item.include_generated,
        )
    return msg


def intervene_request_from_proto(msg: Any) -> Any:
    """Decode ``circuits.v1.InterveneRequest``; top_k 0 means 10. Bad values raise InvalidArgument."""
    from circuits_core.interventions import InterventionRequest, NeuronIntervention

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
        )
    return InterventionRequest(
        prompt=msg.prompt, interventions=tuple(interventions), raw=msg.raw, answer_prefix=msg.answer_prefix,
        top_k=msg.top_k or 10, generate_tokens=msg.generate_tokens,
    )


def intervention_result_to_proto(result: Any) -> Any:
    """Encode a :class:`circuits_core.interventions.InterventionResult` as ``circuits.v1.InterveneResponse``."""
    from circuits_core._proto.circuits.v1 import attribution_pb2

    def entries(items: Iterable[Any]) -> list[Any]:
        return [
            attribution_pb2.TokenProbability(token=t.token, token_id=t.token_id, logit=t.logit, probability=t.probability)
            for t in items
        ]

    return attribution_pb2.InterveneResponse(
        baseline=entries(result.baseline), intervened=entries(result.intervened), tracked=entries(result.tracked),
        generated_text=result.generated_text, baseline_text=result.baseline_text,
        prompt_tokens=list(result.prompt_tokens), position=result.position,
    )


def intervention_result_from_proto(msg: Any, *, interventions: Sequence[Any] = ()) -> Any:
    """Decode ``circuits.v1.InterveneResponse`` (``interventions`` echo the request's)."""
    from circuits_core.interventions import InterventionResult, TokenProbability

    def entries(items: Iterable[Any]) -> tuple[Any, ...]:
        return tuple(
            TokenProbability(token=t.token, token_id=t.token_id, logit=t.logit, probability=t.probability) for t in items
        )

    return InterventionResult(
        prompt_tokens=tuple(msg.prompt_tokens), position=msg.position, baseline=entries(msg.baseline),
        intervened=entries(msg.intervened), tracked=entries(msg.tracked), baseline_text=msg.baseline_text,
        generated_text=msg.generated_text, interventions=tuple(interventions),
    )


# -- aggregator -------------------------------------------------------------------------------
def graph_arrays_from_proto(msg: graph_pb2.Graph, *, source: str = "", graph_id: str | None = None) -> Any:
    """The aggregator's columnar view of a ``circuits.v1.Graph`` (:class:`~circuits_core.aggregator_types.GraphArrays`).

    Edge columns are read straight from the packed EdgeTable into numpy (no per-edge Python
    objects). ``graph_id`` overrides the message's id (files without one). Malformed tables
    raise InvalidArgument.
    """
    import numpy as np

    from circuits_core.aggregator_types import graph_arrays_from_units

    units = msg.units
    nan = math.nan
    neuron = graph_pb2.UNIT_KIND_NEURON
    table = msg.edges
    n_raw = len(table.raw_weight)
    if n_raw and n_raw != len(table.src):
        raise InvalidArgument(f"{source or msg.graph_id or 'graph'}: edge table raw_weight has {n_raw} rows, src {len(table.src)}")
    return graph_arrays_from_units(
        graph_id=msg.graph_id if graph_id is None else graph_id,
        source=source,
        corpus_index=msg.metadata.corpus_index if msg.HasField("metadata") else -1,
        layer=[u.layer for u in units],
        index=[u.index for u in units],
        is_neuron=[u.kind == neuron for u in units],
        activation=[u.activation if u.HasField("activation") else nan for u in units],
        attribution=[u.attribution if u.HasField("attribution") else nan for u in units],
        edge_src=np.array(table.src, dtype=np.int64),
        edge_tgt=np.array(table.tgt, dtype=np.int64),
        edge_weight=np.array(table.weight, dtype=np.float64),
        is_logit=[u.kind == graph_pb2.UNIT_KIND_LOGIT for u in units],
        tokens=[u.token for u in units],
    )


def ingest_ack_to_proto(ack: Any) -> Any:
    """circuits_core.aggregator_types.IngestAck -> circuits.v1.IngestAck."""
    from circuits_core._proto.circuits.v1 import aggregator_pb2

    return aggregator_pb2.IngestAck(
        graph_ids=list(ack.graph_ids),
        duplicates=ack.duplicates,
        graphs_total=ack.graphs_total,
        rejected_graph_ids=list(ack.rejected_graph_ids),
    )


def ingest_ack_from_proto(msg: Any) -> Any:
    """circuits.v1.IngestAck -> circuits_core.aggregator_types.IngestAck."""
    from circuits_core.aggregator_types import IngestAck

    return IngestAck(
        graph_ids=tuple(msg.graph_ids),
        duplicates=msg.duplicates,
        graphs_total=msg.graphs_total,
        rejected_graph_ids=tuple(msg.rejected_graph_ids),
    )


def edge_columns_to_proto(cols: Any) -> Any:
    """circuits_core.aggregator_types.EdgeColumns -> circuits.v1.EdgeBatch (packed columns)."""
    from circuits_core._proto.circuits.v1 import aggregator_pb2

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


def edge_columns_from_proto(msg: Any) -> Any:
    """circuits.v1.EdgeBatch -> circuits_core.aggregator_types.EdgeColumns; ragged columns raise InvalidArgument."""
    import numpy as np

    from circuits_core.aggregator_types import EdgeColumns

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


def aggregator_stats_to_proto(stats: Any) -> Any:
    """circuits_core.aggregator_types.AggregatorStats -> circuits.v1.AggregatorStats."""
    from circuits_core._proto.circuits.v1 import aggregator_pb2

    return aggregator_pb2.AggregatorStats(**{name: getattr(stats, name) for name in _AGG_STATS_FIELDS})


def aggregator_stats_from_proto(msg: Any) -> Any:
    """circuits.v1.AggregatorStats -> circuits_core.aggregator_types.AggregatorStats."""
    from circuits_core.aggregator_types import AggregatorStats

    return AggregatorStats(**{name: getattr(msg, name) for name in _AGG_STATS_FIELDS})

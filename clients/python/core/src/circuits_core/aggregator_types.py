"""Value types of the aggregator, shared by the aggregator service, its client and the CLI.

* :class:`GraphArrays` - the position-collapsed, neuron-only columns of one graph: what the
  aggregator needs from a graph, as numpy arrays (no per-edge Python objects).
* :class:`IngestAck` - what one Ingest acknowledgement says (graphs durably committed).
* :class:`AggregatorStats` - counters of one aggregator (one shard).
* :class:`EdgeColumns` - aggregated edge statistics as columns (GetEdges / export rows).

Plain frozen dataclasses; numpy is imported only by the functions that build arrays.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from circuits_core.errors import InvalidArgument
from circuits_core.schemas import MAX_NEURON_INDEX, MAX_NEURON_LAYER

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from circuits_core.schemas import Graph

#: Largest neuron layer / index the aggregator's packed keys hold (every graph reader checks them).
MAX_LAYER = MAX_NEURON_LAYER
MAX_NEURON = MAX_NEURON_INDEX


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphArrays:
    """One graph reduced to what aggregation counts.

    Units are the graph's neuron nodes (one row per node, so a neuron at three positions has three
    rows); edges are its neuron -> neuron links (embedding and logit endpoints dropped). Missing
    activations/attributions are NaN. ``source`` says where the graph came from (a file name, or
    "grpc"); ``graph_id`` is its exactly-once identity.
    """

    graph_id: str
    source: str = ""
    corpus_index: int = -1
    unit_layer: np.ndarray  # int32 [U]
    unit_neuron: np.ndarray  # int32 [U]
    unit_activation: np.ndarray  # float64 [U], NaN = missing
    unit_attribution: np.ndarray  # float64 [U], NaN = missing
    edge_src_layer: np.ndarray  # int32 [E]
    edge_src_neuron: np.ndarray  # int32 [E]
    edge_tgt_layer: np.ndarray  # int32 [E]
    edge_tgt_neuron: np.ndarray  # int32 [E]
    edge_weight: np.ndarray  # float64 [E]
    #: Neuron -> logit links (kept apart from neuron -> neuron edges): source neuron, vocabulary id
    #: of the logit's token, weight; None = none. ``logit_tokens``: (token id, token string) pairs.
    logit_src_layer: np.ndarray | None = None  # int32 [G]
    logit_src_neuron: np.ndarray | None = None  # int32 [G]
    logit_token_id: np.ndarray | None = None  # int64 [G]
    logit_weight: np.ndarray | None = None  # float64 [G]
    logit_tokens: tuple[tuple[int, str], ...] = ()
    #: The model that made the graph (``Graph.model``) and its shape when the graph says it
    #: (``generation_settings.num_layers`` / ``d_mlp``; 0 = not said). The aggregator records them
    #: at first ingest and refuses graphs of another model or shape.
    model: str = ""
    num_layers: int = 0
    d_mlp: int = 0

    @property
    def n_logit_links(self) -> int:
        return 0 if self.logit_weight is None else int(self.logit_weight.shape[0])

    @property
    def n_edges(self) -> int:
        return int(self.edge_weight.shape[0])

    @property
    def n_units(self) -> int:
        return int(self.unit_layer.shape[0])


def graph_arrays_from_units(
    *,
    graph_id: str,
    source: str,
    corpus_index: int,
    layer: Any,
    index: Any,
    is_neuron: Any,
    activation: Any,
    attribution: Any,
    edge_src: Any,
    edge_tgt: Any,
    edge_weight: Any,
    is_logit: Any = None,
    tokens: Any = None,
    model: str = "",
    extra: Any = None,
) -> GraphArrays:
    """Build GraphArrays from per-unit columns and edges given as unit row numbers.

    Keeps neuron units and the edges whose both endpoints are neurons; checks that edge rows
    exist, column lengths agree, weights are finite, activations and attributions are finite or
    missing (NaN = missing; callers refuse a NaN that was *sent*), layer/neuron numbers fit the
    aggregator's keys (and the model's shape when ``extra`` states it). Bad input raises
    InvalidArgument naming ``source``/``graph_id``. Repeated links and self-loops are kept: each
    link is one observation (see the aggregator store's module doc).

    ``extra``: the graph's metadata extras; ``generation_settings.num_layers`` / ``d_mlp`` give
    the model's shape.
    """
    import numpy as np

    where = source or graph_id or "graph"
    num_layers, d_mlp = model_dims(extra, where)
    layer = np.asarray(layer, dtype=np.int64)
    index = np.asarray(index, dtype=np.int64)
    is_neuron = np.asarray(is_neuron, dtype=bool)
    activation = np.asarray(activation, dtype=np.float64)
    attribution = np.asarray(attribution, dtype=np.float64)
    n_units = layer.shape[0]
    if not (index.shape[0] == is_neuron.shape[0] == activation.shape[0] == attribution.shape[0] == n_units):
        raise InvalidArgument(f"{where}: unit columns differ in length")
    src = np.asarray(edge_src, dtype=np.int64)
    tgt = np.asarray(edge_tgt, dtype=np.int64)
    weight = np.asarray(edge_weight, dtype=np.float64)
    if not (src.shape[0] == tgt.shape[0] == weight.shape[0]):
        raise InvalidArgument(
            f"{where}: edge columns differ in length (src={src.shape[0]}, tgt={tgt.shape[0]}, weight={weight.shape[0]})"
        )
    if src.shape[0]:
        lo = min(int(src.min()), int(tgt.min()))
        hi = max(int(src.max()), int(tgt.max()))
        if lo < 0 or hi >= n_units:
            raise InvalidArgument(f"{where}: an edge refers to unit {hi if hi >= n_units else lo}, but the graph has {n_units} units")
    if not np.isfinite(weight).all():
        raise InvalidArgument(f"{where}: edge weights must be finite")
    for name, values in (("activation", activation), ("attribution", attribution)):
        if np.isinf(values).any():
            raise InvalidArgument(f"{where}: unit {name}s must be finite (got {'+' if values[np.isinf(values)][0] > 0 else '-'}Inf)")
    neuron_layer = layer[is_neuron]
    neuron_index = index[is_neuron]
    if neuron_layer.shape[0]:
        if int(neuron_layer.min()) < 0 or int(neuron_layer.max()) > MAX_LAYER:
            raise InvalidArgument(f"{where}: neuron layers must be in 0..{MAX_LAYER}")
        if int(neuron_index.min()) < 0 or int(neuron_index.max()) > MAX_NEURON:
            raise InvalidArgument(f"{where}: neuron indices must be in 0..{MAX_NEURON}")
        if num_layers and int(neuron_layer.max()) >= num_layers:
            raise InvalidArgument(f"{where}: neuron layer {int(neuron_layer.max())} is beyond the model's {num_layers} layers")
        if d_mlp and int(neuron_index.max()) >= d_mlp:
            raise InvalidArgument(f"{where}: neuron index {int(neuron_index.max())} is beyond the model's MLP width {d_mlp}")
    logit = {}
    if is_logit is not None:
        is_logit = np.asarray(is_logit, dtype=bool)
        if is_logit.shape[0] != n_units:
            raise InvalidArgument(f"{where}: unit columns differ in length")
        to_logit = is_neuron[src] & is_logit[tgt]
        ls, lt = src[to_logit], tgt[to_logit]
        token_ids = index[lt]
        if token_ids.shape[0] and int(token_ids.min()) < 0:
            raise InvalidArgument(f"{where}: logit token ids must be >= 0")
        names = {}
        if tokens is not None:
            for row in np.unique(lt).tolist():
                names[int(index[row])] = str(tokens[row])
        logit = {
            "logit_src_layer": layer[ls].astype(np.int32), "logit_src_neuron": index[ls].astype(np.int32),
            "logit_token_id": token_ids.astype(np.int64), "logit_weight": weight[to_logit],
            "logit_tokens": tuple(sorted(names.items())),
        }  # fmt: skip
    keep = is_neuron[src] & is_neuron[tgt]
    if not keep.all():
        src, tgt, weight = src[keep], tgt[keep], weight[keep]
    layer32, index32 = layer.astype(np.int32), index.astype(np.int32)  # per unit, then gathered per edge
    return GraphArrays(
        **logit,
        graph_id=graph_id,
        source=source,
        corpus_index=int(corpus_index),
        unit_layer=layer32[is_neuron],
        unit_neuron=index32[is_neuron],
        unit_activation=activation[is_neuron],
        unit_attribution=attribution[is_neuron],
        edge_src_layer=layer32[src],
        edge_src_neuron=index32[src],
        edge_tgt_layer=layer32[tgt],
        edge_tgt_neuron=index32[tgt],
        edge_weight=weight,
        model=str(model),
        num_layers=num_layers,
        d_mlp=d_mlp,
    )


def model_dims(extra: Any, where: str = "graph") -> tuple[int, int]:
    """``(num_layers, d_mlp)`` stated by a graph's metadata extras (``generation_settings``); 0 = not stated."""
    from collections.abc import Mapping

    settings = extra.get("generation_settings") if isinstance(extra, Mapping) else None
    if not isinstance(settings, Mapping):
        return 0, 0
    dims = []
    for key in ("num_layers", "d_mlp"):
        value = settings.get(key, 0)
        if value is None:
            value = 0
        if type(value) is not int or value < 0:
            raise InvalidArgument(f"{where}: generation_settings.{key} must be a non-negative integer")
        dims.append(value)
    return dims[0], dims[1]


#: Prefix of content fingerprints (xxh3-128); fingerprints without it are the sha1 ones of
#: states written before (:func:`legacy_graph_fingerprint`).
FINGERPRINT_PREFIX = "xxh3:"


def _fingerprint(g: GraphArrays, h: Any) -> Any:
    for arr in (g.unit_layer, g.unit_neuron, g.unit_activation, g.unit_attribution, g.edge_src_layer,
                g.edge_src_neuron, g.edge_tgt_layer, g.edge_tgt_neuron, g.edge_weight, g.logit_src_layer,
                g.logit_src_neuron, g.logit_token_id, g.logit_weight):  # fmt: skip
        if arr is None:
            h.update(b"-")
        else:
            h.update(arr.shape[0].to_bytes(8, "little"))
            h.update(arr.dtype.str.encode())
            h.update(memoryview(arr).cast("B") if arr.flags.c_contiguous else arr.tobytes())
    h.update(g.model.encode("utf-8"))
    return h


def graph_fingerprint(g: GraphArrays) -> str:
    """Content hash of what aggregation counts from ``g`` (units, edges, logit links; not its
    source or corpus index): a re-sent graph_id with another fingerprint is a conflict.

    xxh3-128 (an identity check, not a security boundary): ~30x faster than the sha1 it replaced
    (4 vs 133 µs for a 10k-edge graph); ``"xxh3:"`` + 32 hex digits."""
    import xxhash

    return FINGERPRINT_PREFIX + _fingerprint(g, xxhash.xxh3_128()).hexdigest()


def legacy_graph_fingerprint(g: GraphArrays) -> str:
    """The sha1 fingerprint (32 hex digits) ledgers kept before :func:`graph_fingerprint`."""
    return _fingerprint(g, hashlib.sha1(usedforsecurity=False)).hexdigest()[:32]


def same_content(stored: str | None, g: GraphArrays, fingerprint: str) -> bool:
    """Whether a ledger's ``stored`` fingerprint of a graph_id matches ``g`` (whose
    :func:`graph_fingerprint` is ``fingerprint``): None (counted before fingerprints were kept)
    matches anything; a sha1 fingerprint of an older state is compared with ``g``'s sha1."""
    if stored is None:
        return True
    if stored.startswith(FINGERPRINT_PREFIX):
        return stored == fingerprint
    return stored == legacy_graph_fingerprint(g)


def graph_arrays_from_graph(graph: Graph, *, source: str = "", graph_id: str | None = None) -> GraphArrays:
    """The aggregator's columns of a domain Graph, straight from its edge columns.

    ``graph_id`` defaults to the graph's id; a graph without one gets the content id of its
    deterministic protobuf encoding (what the gRPC client sends for it, so both paths agree).
    """
    import numpy as np

    from circuits_core.edge_table import unit_key_columns

    if graph_id is None:
        graph_id = graph.graph_id
    if not graph_id:
        from circuits_core import wire

        graph_id = content_graph_id(wire.graph_to_bytes(graph))
    units = graph.units
    n = len(units)
    for u in units:
        for name in ("activation", "attribution"):
            value = getattr(u, name)
            if value is not None and not math.isfinite(value):
                raise InvalidArgument(f"{source or graph_id}: unit {u.node_id}: {name} must be finite, got {value}")
    layer, index, _position = unit_key_columns(units)
    src, tgt = graph.edge_table.endpoint_rows(units)
    nan = float("nan")
    return graph_arrays_from_units(
        graph_id=graph_id,
        source=source,
        corpus_index=graph.metadata.corpus_index,
        layer=layer,
        index=index,
        is_neuron=np.fromiter((u.kind == "neuron" for u in units), dtype=bool, count=n),
        activation=np.fromiter((nan if u.activation is None else u.activation for u in units), dtype=np.float64, count=n),
        attribution=np.fromiter((nan if u.attribution is None else u.attribution for u in units), dtype=np.float64, count=n),
        edge_src=src,
        edge_tgt=tgt,
        edge_weight=graph.edge_table.weight,
        is_logit=np.fromiter((u.kind == "logit" for u in units), dtype=bool, count=n),
        tokens=[u.token for u in units],
        model=graph.model,
        extra=graph.metadata.extra,
    )


def content_graph_id(payload: bytes) -> str:
    """Identity of a graph that carries none: sha256 of its (decompressed) bytes, 32 hex chars.

    Used for legacy JSON files without ``metadata.graph_id`` (the hash of the file's JSON text
    after gzip decompression, so ``g.json`` and ``g.json.gz`` agree) and for graphs sent without
    an id (the hash of the deterministic protobuf serialization).
    """
    return hashlib.sha256(payload).hexdigest()[:32]


def shard_of(graph_id: str, shard_count: int) -> int:
    """The shard that owns ``graph_id``: first 64 bits of sha256(graph_id) modulo ``shard_count``.

    Stable across processes, machines and Python versions (unlike ``hash``).
    """
    if shard_count < 1:
        raise InvalidArgument(f"shard count must be >= 1, got {shard_count}")
    return int(hashlib.sha256(graph_id.encode("utf-8")).hexdigest()[:16], 16) % shard_count


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestAck:
    """Graphs durably committed by one acknowledgement.

    ``graph_ids`` lists every graph of the acknowledged batch that this shard owns (newly counted
    or already present); ``duplicates`` how many of them were already in the ledger;
    ``rejected_graph_ids`` the graphs of the batch another shard owns (not counted here);
    ``conflict_graph_ids`` the graphs whose id was already counted with different content (not
    counted again, not in ``duplicates``; listed in ``graph_ids``, since they are settled).
    """

    graph_ids: tuple[str, ...] = ()
    duplicates: int = 0
    graphs_total: int = 0
    rejected_graph_ids: tuple[str, ...] = ()
    conflict_graph_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestReport:
    """What a client-side ingest achieved."""

    #: Graphs acknowledged as committed (new or duplicate).
    acked: int = 0
    #: Of these, graphs already present in the ledger (counted once, earlier).
    duplicates: int = 0
    #: Graph ids that the server's shard does not own (not counted).
    rejected_graph_ids: tuple[str, ...] = ()
    #: Graph ids already counted with different content (content conflicts; not counted again).
    conflict_graph_ids: tuple[str, ...] = ()
    #: Streams re-opened after the server became unavailable.
    reconnects: int = 0
    #: Graphs sent again after a reconnect (they were not acknowledged before the break).
    resent: int = 0
    #: Graphs committed in the aggregator after the last acknowledgement.
    graphs_total: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregatorStats:
    """Counters of one aggregator (one shard)."""

    graphs_processed: int = 0
    total_edge_observations: int = 0
    distinct_edges: int = 0
    distinct_units: int = 0
    shard_index: int = 0
    shard_count: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeColumns:
    """Aggregated edges as numpy columns (row r of every column is one edge); see exports.EDGE_COLUMNS."""

    src_layer: np.ndarray
    src_neuron: np.ndarray
    tgt_layer: np.ndarray
    tgt_neuron: np.ndarray
    count: np.ndarray
    weight_sum: np.ndarray
    weight_abs_sum: np.ndarray
    weight_sq_sum: np.ndarray
    weight_min: np.ndarray
    weight_max: np.ndarray

    def __len__(self) -> int:
        return int(self.count.shape[0])

    def to_edges(self) -> list[Any]:
        """Rows as :class:`circuits_core.schemas.Edge` with ``weight`` = mean weight, method "relp"."""
        from circuits_core.schemas import Edge

        cols = [getattr(self, f.name).tolist() for f in fields(self)]  # exports.EDGE_COLUMNS order
        return [
            Edge(
                src_layer=sl, src_index=sn, tgt_layer=tl, tgt_index=tn, weight=(s / c if c else 0.0),
                count=c, weight_sum=s, weight_abs_sum=sa, weight_sq_sum=sq, weight_min=mn, weight_max=mx,
                method="relp",
            )
            for sl, sn, tl, tn, c, s, sa, sq, mn, mx in zip(*cols)
        ]  # fmt: skip

"""Graph files: the one owner of every graph file format (reading, writing, framing, validation).

Formats by file name:

* ``*.json`` / ``*.json.gz``: the legacy Neuronpedia/Anthropic viewer JSON (relp-spec §E).
* ``*.pb`` / ``*.pb.gz``: the compact format batch workers write, a serialized
  ``circuits.v1.Graph`` inside a frame (magic, format version, payload length, CRC-32), so a cut
  or damaged file is detected. Unframed files (written before the frame existed) are still
  read; for them a cut at a field boundary is caught by referential checks (the metadata, the
  last field written, must be present; edge rows must name existing units).

gzip is recognised by its magic bytes whatever the name says. Every reader here goes through the
same framing and validation: :func:`read_graph` (a domain :class:`Graph`),
:func:`read_graph_arrays` (the aggregator's columns, without per-edge objects) and
:func:`read_viewer_json` (the viewer's JSON document) accept and reject exactly the same files,
with the same one-line :class:`CorruptInput` naming the file. Edge weights must be finite.
Writes are atomic (temp file + rename), so a killed writer never leaves a half file under the
final name.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from operator import itemgetter, methodcaller
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from circuits_core.edge_table import (
    NO_POSITION,
    EdgeTable,
    UnitKeys,
    check_unit_keys,
    checked_unit_keys,
    key_columns,
)
from circuits_core.errors import CorruptInput, InvalidArgument
from circuits_core.files import atomic_writer
from circuits_core.influence import DEFAULT_NODE_THRESHOLD, InfluenceShares, influence_shares, logit_weights_from_probabilities
from circuits_core.schemas import (
    EMBEDDING_LAYER,
    GENERATOR_NAME,
    GENERATOR_VERSION,
    Graph,
    GraphMetadata,
    Unit,
    UnitLabel,
    slugify,
)
from circuits_core.viewers import logit_clerp, parse_logit_clerp, scan_id, slug_id

if TYPE_CHECKING:  # pragma: no cover
    from circuits_core.aggregator_types import GraphArrays

GRAPH_SUFFIXES = (".json", ".json.gz", ".pb", ".pb.gz")
#: ``circuits validate`` names its results ``<graph-stem>.faithfulness-<ablation>....json`` beside the
#: graph; files with this mark are results about a graph, not graphs.
VALIDATION_MARK = ".faithfulness"
CLERP_LABEL_CHARS = 60

#: Frame of compact graph files: magic, format version, payload length, CRC-32 of the payload.
PB_MAGIC = b"\x89CGRAPH\n"
PB_FORMAT_VERSION = 1
_PB_HEADER = struct.Struct("<8sIQI")


def graph_format(path: str | Path) -> str:
    """'json' or 'pb' from the file name; raises InvalidArgument for other names."""
    name = Path(path).name
    if name.endswith((".json", ".json.gz")):
        return "json"
    if name.endswith((".pb", ".pb.gz")):
        return "pb"
    raise InvalidArgument(f"{path}: not a graph file (expected one of {', '.join(GRAPH_SUFFIXES)})")


def is_graph_file(path: str | Path) -> bool:
    """A graph file by its name (hidden files, a folder's graph-metadata.json index and the
    validation results ``circuits validate`` writes beside a graph are not)."""
    name = Path(path).name
    return (name.endswith(GRAPH_SUFFIXES) and not name.startswith(".") and name != "graph-metadata.json"
            and VALIDATION_MARK not in name)


# ------------------------------------------------------------------------------------------
# Reading: one pipeline (bytes -> gunzip -> unframe/parse -> validate) behind every reader
# ------------------------------------------------------------------------------------------
def read_graph(path: str | Path) -> Graph:
    """Read any graph file into a domain Graph; corrupt files raise CorruptInput naming the file."""
    fmt = graph_format(path)
    payload = _read_payload(path)
    if fmt == "json":
        return graph_from_legacy(_parse_json(payload, path), source=str(path))
    return _decode_pb(_parse_pb(payload, path), path, wire_decode="graph")


def read_graph_arrays(path: str | Path, *, source: str | None = None) -> GraphArrays:
    """Read one graph file into the aggregator's :class:`~circuits_core.aggregator_types.GraphArrays`.

    Accepts and rejects exactly what :func:`read_graph` does, with the same messages.
    ``source`` (default: the path) is recorded in the ledger. A file without a graph id gets
    :func:`~circuits_core.aggregator_types.content_graph_id` of its decompressed bytes (so
    ``g.json`` and ``g.json.gz`` agree).
    """
    from circuits_core.aggregator_types import content_graph_id

    fmt = graph_format(path)
    source = str(path) if source is None else source
    payload = _read_payload(path)
    if fmt == "json":
        data = _parse_json(payload, path)
        return _arrays_from_legacy(data, path=str(path), source=source, default_graph_id=content_graph_id(payload))
    pb = _parse_pb(payload, path)
    return _decode_pb(pb, path, wire_decode="arrays", source=source, default_graph_id=content_graph_id(pb))


def read_viewer_json(path: str | Path) -> dict[str, Any]:
    """The viewer's JSON document of a graph file, validated like :func:`read_graph`.

    Legacy JSON files come back as written (extra fields and supernodes kept); compact files are
    converted with :func:`graph_to_legacy`.
    """
    fmt = graph_format(path)
    payload = _read_payload(path)
    if fmt == "json":
        data = _parse_json(payload, path)
        graph_from_legacy(data, source=str(path))
        return data
    return graph_to_legacy(_decode_pb(_parse_pb(payload, path), path, wire_decode="graph"))


def _read_payload(path: str | Path) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidArgument(f"{path}: no such file") from None
    except OSError as exc:
        raise CorruptInput(f"{path}: cannot read ({exc.strerror or exc})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise CorruptInput(f"{path}: corrupt or truncated gzip ({_one_line(exc)})") from None
    if not raw:
        raise CorruptInput(f"{path}: empty file")
    return raw


def _parse_json(payload: bytes, path: str | Path) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise CorruptInput(f"{path}: not valid JSON ({_one_line(exc)})") from None


def _parse_pb(payload: bytes, path: str | Path) -> bytes:
    """The serialized Graph inside a compact file: unframed and checked, or the old bare form."""
    if not payload.startswith(PB_MAGIC):
        return payload
    if len(payload) < _PB_HEADER.size:
        raise CorruptInput(f"{path}: truncated compact graph (header cut at {len(payload)} bytes)")
    _magic, version, length, crc = _PB_HEADER.unpack_from(payload)
    if version != PB_FORMAT_VERSION:
        raise CorruptInput(f"{path}: compact graph format version {version} is not supported (expected {PB_FORMAT_VERSION})")
    body = payload[_PB_HEADER.size :]
    if len(body) != length:
        what = "truncated" if len(body) < length else "trailing bytes after"
        raise CorruptInput(f"{path}: {what} compact graph ({len(body)} of {length} payload bytes)")
    if zlib.crc32(body) != crc:
        raise CorruptInput(f"{path}: compact graph checksum mismatch (the file is damaged)")
    return body


def frame_pb(serialized: bytes) -> bytes:
    """A serialized ``circuits.v1.Graph`` inside the compact file frame."""
    return _PB_HEADER.pack(PB_MAGIC, PB_FORMAT_VERSION, len(serialized), zlib.crc32(serialized)) + serialized


def _decode_pb(pb: bytes, path: str | Path, *, wire_decode: str, source: str = "", default_graph_id: str = "") -> Any:
    from circuits_core import wire

    try:  # the aggregator's columns are read straight from the bytes where the compiled scan can
        msg = wire.graph_message_from_bytes(pb) if wire_decode == "graph" else wire.graph_request_from_bytes(pb)
    except InvalidArgument as exc:
        raise CorruptInput(f"{path}: not a valid compact graph ({exc})") from None
    if not wire.graph_message_has_metadata(msg):
        # The metadata is the last field written: a file cut at a field boundary parses without it.
        raise CorruptInput(f"{path}: truncated compact graph (no metadata)")
    if wire_decode == "graph":
        return _as_corrupt(path, lambda: wire.graph_from_proto(msg))
    return _as_corrupt(
        path, lambda: wire.graph_arrays_from_proto(msg, source=source, graph_id=msg.graph_id or default_graph_id)
    )


def _as_corrupt(path: str | Path, decode: Any) -> Any:
    try:
        return decode()
    except CorruptInput:
        raise
    except InvalidArgument as exc:
        raise CorruptInput(f"{path}: {exc}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------
def write_graph(graph: Graph, path: str | Path) -> Path:
    """Write a graph in the format its name asks for, atomically; return the path.

    Non-finite edge weights raise InvalidArgument (no reader would accept the file).
    """
    path = Path(path)
    _check_finite_weights(graph.edge_table.weight, str(path))
    if graph_format(path) == "json":
        return write_json(graph_to_legacy(graph), path)
    from circuits_core import wire

    payload = frame_pb(wire.graph_to_bytes(graph))
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    return _write_atomic(payload, path)


def write_json(data: Any, path: str | Path) -> Path:
    """Write JSON atomically (temp file + fsync + rename); gzip when the name ends in .gz."""
    path = Path(path)
    text = json.dumps(data, ensure_ascii=False, allow_nan=True, default=_json_default)
    payload = text.encode("utf-8")
    if path.suffix == ".gz":
        payload = gzip.compress(payload, mtime=0)
    return _write_atomic(payload, path)


def _write_atomic(payload: bytes, path: Path) -> Path:
    with atomic_writer(path) as fh:
        fh.write(payload)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (set, tuple)):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _check_finite_weights(weight: np.ndarray, where: str) -> None:
    bad = np.flatnonzero(~np.isfinite(weight))
    if bad.size:
        n = int(bad[0])
        raise InvalidArgument(f"{where}: edge {n} weight must be finite, got {float(weight[n])}")


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
    src, tgt = graph.edge_table.endpoint_rows(graph.units)
    is_logit = [u.kind == "logit" for u in graph.units]
    return influence_shares(
        n_nodes=len(graph.units), sources=src.tolist(), targets=tgt.tolist(), weights=graph.edge_table.weight.tolist(),
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
    """The Neuronpedia/Anthropic viewer JSON of ``graph`` (validates against the Neuronpedia schema)."""
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

    nodes = []
    seen_logit = False
    for unit, share in zip(graph.units, influence.shares):
        nodes.append(_legacy_node(unit, first_logit=unit.kind == "logit" and not seen_logit, influence=share))
        seen_logit = seen_logit or unit.kind == "logit"
    links = _legacy_links(graph)
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


def _legacy_links(graph: Graph) -> list[dict[str, Any]]:
    table = graph.edge_table
    src, tgt = table.endpoint_rows(graph.units)
    node_ids = [u.node_id for u in graph.units]
    sources = [node_ids[i] for i in src.tolist()]
    targets = [node_ids[i] for i in tgt.tolist()]
    weights = table.weight.tolist()
    if not table.has_raw_weight:
        return [{"source": s, "target": t, "weight": w} for s, t, w in zip(sources, targets, weights)]
    links = []
    for s, t, w, r in zip(sources, targets, weights, table.raw_weight.tolist()):
        link: dict[str, Any] = {"source": s, "target": t, "weight": w}
        if r == r:  # NaN = no raw weight
            link["raw_weight"] = r
        links.append(link)
    return links


# ------------------------------------------------------------------------------------------
# Legacy JSON reader
# ------------------------------------------------------------------------------------------
_SOURCE = itemgetter("source")
_TARGET = itemgetter("target")
_WEIGHT = itemgetter("weight")
_RAW_WEIGHT = methodcaller("get", "raw_weight")
_NUMBER_TYPES = {int, float}
_OPTIONAL_NUMBER_TYPES = {int, float, type(None)}


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
    if type(value) is int:  # the common cases, checked first
        return float(value)
    if type(value) is float:
        if value - value != 0.0:  # NaN or +-Inf (x - x is 0.0 for every finite float)
            raise CorruptInput(f"{where}: field '{key}' must be finite, got {value}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CorruptInput(f"{where}: field '{key}' must be a number or null, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise CorruptInput(f"{where}: field '{key}' must be finite, got {value}")
    return value


_NODE_FIELDS = itemgetter("node_id", "feature", "layer", "ctx_idx", "feature_type", "clerp", "jsNodeId")
_STR_OR_INT = (str, int)


def _node_fields(node: Any, n: int, source: str) -> tuple[Any, ...]:
    """The required fields of a node, type-checked: a quick exact-type test for the usual case,
    and the field-by-field checks (which raise the precise error) whenever that test fails."""
    try:
        fields = _NODE_FIELDS(node)
    except (KeyError, TypeError):
        fields = None
    if fields is not None:
        node_id, feature, layer_field, ctx, ftype, clerp, js = fields
        if (type(node_id) is str and (feature is None or type(feature) is int) and type(layer_field) in _STR_OR_INT
                and type(ctx) is int and type(ftype) is str and type(clerp) is str and type(js) is str):  # fmt: skip
            return fields
    where = f"{source}: nodes[{n}]"
    if not isinstance(node, Mapping):
        raise CorruptInput(f"{where}: must be an object, got {type(node).__name__}")
    node_id = _require(node, "node_id", str, where)
    where = f"{source}: node '{node_id}'"
    return (
        node_id,
        _require(node, "feature", (int, type(None)), where),
        _require(node, "layer", (str, int), where),
        _require(node, "ctx_idx", int, where),
        _require(node, "feature_type", str, where),
        _require(node, "clerp", str, where),
        _require(node, "jsNodeId", str, where),
    )


def _parse_node(node: Any, n: int, source: str, *, as_unit: bool = True) -> Any:
    """One checked node as a Unit, or (``as_unit=False``) as the aggregator's columns
    ``(kind, layer, index, position, activation, attribution, logit token)``; both run every check."""
    node_id, feature, layer_field, ctx, ftype, clerp, _js = _node_fields(node, n, source)
    where = f"{source}: node '{node_id}'"
    position = None if ctx < 0 else ctx
    raw_labels = node.get("labels")
    if raw_labels and (not isinstance(raw_labels, list) or not all(isinstance(lab, Mapping) for lab in raw_labels)):
        raise CorruptInput(f"{where}: field 'labels' must be a list of objects")
    count = node.get("appearance_count", 0) or 0
    if type(count) is not int:
        raise CorruptInput(f"{where}: field 'appearance_count' must be an integer")
    # Since the viewer fix the signed RelP score has its own key and `influence` is the viewers'
    # cumulative share; older files carry the score in `influence`.
    attribution = _optional_number(node, "attribution" if "attribution" in node else "influence", where)
    activation = _optional_number(node, "activation", where)
    if feature is None:
        raise CorruptInput(f"{where}: field 'feature' must be an integer for {ftype} nodes")
    prob = None
    if ftype == "embedding" or layer_field == "E":
        kind, layer = "embedding", EMBEDDING_LAYER
    else:
        try:
            layer = int(layer_field)
        except ValueError:
            raise CorruptInput(f"{where}: layer {layer_field!r} is not an integer") from None
        if ftype == "logit" or node.get("isLogit") is True:
            kind = "logit"
            prob = _optional_number(node, "token_prob", where)
        elif ftype != "mlp_neuron":
            raise CorruptInput(f"{where}: unsupported feature_type {ftype!r} (expected mlp_neuron, embedding, logit)")
        else:
            kind = "neuron"
    if not as_unit:
        token = parse_logit_clerp(clerp)[0] if kind == "logit" else ""
        return kind, layer, feature, position, activation, attribution, token
    labels = tuple(
        UnitLabel(
            text=str(lab.get("text", "")),
            source=str(lab.get("source", "")),
            confidence=str(lab.get("confidence", "")),
            description=str(lab.get("description", "")),
        )
        for lab in raw_labels or ()
    )
    common = {
        "position": position,
        "attribution": attribution,
        "activation": activation,
        "input_label": str(node.get("input_label", "") or ""),
        "cluster": str(node.get("cluster", "") or ""),
        "appearance_count": count,
        "labels": labels,
    }
    if kind == "embedding":
        token = clerp[len("Token: "):] if clerp.startswith("Token: ") else clerp
        return Unit(layer=layer, index=feature, kind="embedding", token=token, **common)
    if kind == "logit":
        token, clerp_prob = parse_logit_clerp(clerp)
        if prob is None:
            prob = clerp_prob
        return Unit(layer=layer, index=feature, kind="logit", token=token, probability=prob, **common)
    label = node.get("label")
    if not isinstance(label, str):
        prefix = f"L{layer}/N{feature}: "
        label = clerp[len(prefix):] if clerp.startswith(prefix) else ""
    token = node.get("token")
    return Unit(layer=layer, index=feature, kind="neuron", label=label, token=token if isinstance(token, str) else "", **common)


def _parse_links(
    links: list[Any], rows: dict[str, int], source: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``(src_row, tgt_row, weight, raw_weight or None)`` of the links, with C-level loops.

    Any problem sends the links through :func:`_check_link` one by one, which raises the
    precise error (the fast path never decides acceptance on its own).
    """
    n = len(links)
    try:
        row_of = rows.__getitem__
        src = np.fromiter(map(row_of, map(_SOURCE, links)), dtype=np.int64, count=n)
        tgt = np.fromiter(map(row_of, map(_TARGET, links)), dtype=np.int64, count=n)
        weights = list(map(_WEIGHT, links))
        # Links of exactly three keys (source, target, weight) carry no raw weight: skip the lookup.
        raws = [] if sum(map(len, links)) == 3 * n else list(map(_RAW_WEIGHT, links))
        raw_types = set(map(type, raws)) if raws else {type(None)}
        # Endpoints need no type check: node ids are str keys, and any other value misses them.
        if not (set(map(type, weights)) <= _NUMBER_TYPES and raw_types <= _OPTIONAL_NUMBER_TYPES):
            raise TypeError("link value types")
    except (KeyError, TypeError, AttributeError):
        for i, link in enumerate(links):
            _check_link(link, i, rows, source)
        raise CorruptInput(f"{source}: malformed links") from None
    weight = np.array(weights, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(weight))
    if bad.size:
        i = int(bad[0])
        raise CorruptInput(f"{source}: links[{i}]: field 'weight' must be finite, got {weights[i]}")
    if raw_types == {type(None)}:
        return src, tgt, weight, None  # no raw weights (NaN columns)
    raw = np.array([math.nan if r is None else r for r in raws] if type(None) in raw_types else raws, dtype=np.float64)
    return src, tgt, weight, raw


def _check_link(link: Any, i: int, rows: dict[str, int], source: str) -> None:
    lw = f"{source}: links[{i}]"
    if not isinstance(link, Mapping):
        raise CorruptInput(f"{lw}: must be an object, got {type(link).__name__}")
    src_id = _require(link, "source", str, lw)
    tgt_id = _require(link, "target", str, lw)
    _require(link, "weight", (int, float), lw)
    if src_id not in rows:
        raise CorruptInput(f"{lw}: source {src_id!r} is not a node of the graph")
    if tgt_id not in rows:
        raise CorruptInput(f"{lw}: target {tgt_id!r} is not a node of the graph")
    _optional_number(link, "raw_weight", lw)


def graph_from_legacy(data: Any, *, source: str = "graph") -> Graph:
    """Parse viewer JSON; malformed input raises CorruptInput naming ``source`` and the field.

    Nodes must have a known ``feature_type`` (mlp_neuron, embedding, logit), distinct node ids
    and distinct (layer, index, position) keys; links must name existing nodes and carry finite
    weights.
    """
    parts = _parse_legacy(data, source)
    return Graph(
        units=parts.units,
        edges=EdgeTable.from_unit_rows(parts.unit_keys, parts.src, parts.tgt, parts.weight, parts.raw_weight),
        prompt=parts.prompt,
        prompt_tokens=parts.prompt_tokens,
        model=str(parts.meta.get("model", "")),
        graph_id=str(parts.meta.get("graph_id", "")),
        metadata=parts.metadata,
    )


def _arrays_from_legacy(data: Any, *, path: str, source: str, default_graph_id: str) -> GraphArrays:
    """The aggregator's columns of viewer JSON: the same parse and checks as graph_from_legacy,
    without Unit objects, and with the links' unit rows used as they are."""
    from circuits_core.aggregator_types import graph_arrays_from_units

    parts = _parse_legacy(data, path, as_units=False)
    columns = parts.unit_columns
    return _as_corrupt(
        path,
        lambda: graph_arrays_from_units(
            graph_id=str(parts.meta.get("graph_id", "")) or default_graph_id,
            source=source,
            corpus_index=parts.metadata.corpus_index,
            layer=parts.unit_keys[0],
            index=parts.unit_keys[1],
            is_neuron=columns["is_neuron"],
            activation=columns["activation"],
            attribution=columns["attribution"],
            edge_src=parts.src,
            edge_tgt=parts.tgt,
            edge_weight=parts.weight,
            is_logit=columns["is_logit"],
            tokens=columns["tokens"],
            model=str(parts.meta.get("model", "")),
            extra=parts.metadata.extra,
        ),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class _LegacyParts:
    """A checked viewer JSON document, before it becomes a Graph (``units``) or aggregator
    arrays (``unit_columns``: is_neuron, is_logit, tokens, activation, attribution)."""

    meta: Mapping[str, Any]
    metadata: GraphMetadata
    prompt: str
    prompt_tokens: tuple[str, ...]
    units: tuple[Unit, ...]
    unit_columns: Mapping[str, np.ndarray]
    unit_keys: UnitKeys
    src: np.ndarray
    tgt: np.ndarray
    weight: np.ndarray
    raw_weight: np.ndarray | None


def _parse_legacy(data: Any, source: str, *, as_units: bool = True) -> _LegacyParts:
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

    parsed = [_parse_node(node, n, source, as_unit=as_units) for n, node in enumerate(nodes)]
    rows: dict[str, int] = {}
    for n, node in enumerate(nodes):
        if node["node_id"] in rows:
            raise CorruptInput(f"{source}: duplicate node_id {node['node_id']!r}")
        rows[node["node_id"]] = n
    units: tuple[Unit, ...] = ()
    columns: dict[str, np.ndarray] = {}
    try:
        if as_units:
            units = tuple(parsed)
            unit_keys = checked_unit_keys(units)
        else:
            unit_keys, columns = _checked_node_columns(parsed)
    except InvalidArgument as exc:
        raise CorruptInput(f"{source}: {exc}") from None
    src, tgt, weight, raw = _parse_links(links, rows, source)
    return _LegacyParts(
        meta=meta, metadata=_legacy_metadata(data, meta), prompt=prompt, prompt_tokens=prompt_tokens, units=units,
        unit_columns=columns, unit_keys=unit_keys, src=src, tgt=tgt, weight=weight, raw_weight=raw,
    )  # fmt: skip


def _checked_node_columns(parsed: list[tuple[Any, ...]]) -> tuple[UnitKeys, dict[str, np.ndarray]]:
    """Key columns (checked as checked_unit_keys does) and aggregator columns of parsed nodes."""
    n = len(parsed)
    kind, layer, index, position, activation, attribution, token = zip(*parsed) if n else ((),) * 7
    nan, none = math.nan, NO_POSITION
    keys = key_columns(layer, index, (none if p is None else p for p in position), n)
    is_neuron = np.array([k == "neuron" for k in kind], dtype=bool).reshape(n)
    check_unit_keys(*keys, is_neuron)
    return keys, {
        "is_neuron": is_neuron,
        "is_logit": np.array([k == "logit" for k in kind], dtype=bool).reshape(n),
        "tokens": np.array(token, dtype=object).reshape(n),
        "activation": np.array([nan if a is None else a for a in activation], dtype=np.float64).reshape(n),
        "attribution": np.array([nan if a is None else a for a in attribution], dtype=np.float64).reshape(n),
    }


def _legacy_metadata(data: Mapping[str, Any], meta: Mapping[str, Any]) -> GraphMetadata:
    settings = dict(meta.get("generation_settings") or {}) if isinstance(meta.get("generation_settings"), Mapping) else {}
    known = set(_META_KEYS) | {"generation_settings", "model", "graph_id", "corpus_index"}
    extra: dict[str, Any] = {k: v for k, v in meta.items() if k not in known}
    _viewer_metadata_from_legacy(meta, extra)
    for key in ("max_n_logits", "node_threshold", "metric_value", "target_position", "nodes_exceeded"):
        settings.pop(key, None)
    if settings:
        extra["generation_settings"] = settings
    info = dict(meta.get("info") or {}) if isinstance(meta.get("info"), Mapping) else {}
    generator = info.pop("generator", None)
    generator = dict(generator) if isinstance(generator, Mapping) else {}
    create_time_ms = info.pop("create_time_ms", 0)
    create_time_ms = create_time_ms if isinstance(create_time_ms, int) and not isinstance(create_time_ms, bool) else 0
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
    return GraphMetadata(
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

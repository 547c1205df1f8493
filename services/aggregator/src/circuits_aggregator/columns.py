"""Graph files -> :class:`circuits_core.aggregator_types.GraphArrays`, fast.

Formats (by name, as :mod:`circuits_core.graphio`): ``*.json`` / ``*.json.gz`` (legacy viewer JSON) and
``*.pb`` / ``*.pb.gz`` (serialized ``circuits.v1.Graph``). gzip is detected by its magic bytes.

Compared with ``circuits_core.graphio.read_graph`` this skips building Unit/Edge objects: JSON links are
mapped to unit rows with C-level ``map`` calls and the protobuf EdgeTable goes straight to numpy.
Unreadable, truncated or malformed files raise :class:`circuits_core.errors.CorruptInput` naming the
file.

Graph identity: ``metadata.graph_id`` (JSON) / ``Graph.graph_id`` (protobuf) when present;
otherwise :func:`circuits_core.aggregator_types.content_graph_id` of the file's decompressed bytes
(sha256, first 32 hex chars), so the same file counts once however often it is offered.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Mapping
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np

from circuits_core.aggregator_types import GraphArrays, content_graph_id, graph_arrays_from_units
from circuits_core.errors import CorruptInput, InvalidArgument
from circuits_core.graphio import graph_format

_SOURCE = itemgetter("source")
_TARGET = itemgetter("target")
_WEIGHT = itemgetter("weight")


def read_payload(path: Path) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic; failures -> CorruptInput."""
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
            raise CorruptInput(f"{path}: corrupt or truncated gzip ({exc})") from None
    if not raw:
        raise CorruptInput(f"{path}: empty file")
    return raw


def graph_arrays_from_legacy(data: Any, *, source: str, default_graph_id: str) -> GraphArrays:
    """Columns of a parsed legacy viewer JSON graph (relp-spec §E).

    Neurons are nodes with ``feature_type == "mlp_neuron"`` (and not ``isLogit``); their key is
    ``(int(layer), feature)``. Embedding, logit and other nodes only serve as link endpoints that
    are then dropped. Missing fields or dangling links raise CorruptInput naming ``source``.
    """
    if not isinstance(data, Mapping):
        raise CorruptInput(f"{source}: top level must be a JSON object, got {type(data).__name__}")
    meta = data.get("metadata")
    nodes = data.get("nodes")
    links = data.get("links")
    if not isinstance(meta, Mapping) or not isinstance(nodes, list) or not isinstance(links, list):
        raise CorruptInput(f"{source}: needs 'metadata' (object), 'nodes' (list) and 'links' (list)")
    n_nodes = len(nodes)
    layer = np.zeros(n_nodes, dtype=np.int64)
    index = np.zeros(n_nodes, dtype=np.int64)
    is_neuron = np.zeros(n_nodes, dtype=bool)
    is_logit = np.zeros(n_nodes, dtype=bool)
    tokens = [""] * n_nodes
    activation = np.full(n_nodes, np.nan)
    attribution = np.full(n_nodes, np.nan)
    rows: dict[str, int] = {}
    for n, node in enumerate(nodes):
        try:
            rows[node["node_id"]] = n
            if node.get("feature_type") == "logit" or node.get("isLogit") is True:
                if isinstance(node.get("feature"), int) and not isinstance(node.get("feature"), bool):
                    index[n] = node["feature"]
                    is_logit[n] = True
                    tokens[n] = logit_token(node.get("clerp"))
                continue
            if node.get("feature_type") != "mlp_neuron":
                continue
            layer[n] = int(node["layer"])
            index[n] = int(node["feature"])
            # the signed RelP score: "attribution" since the viewer fix, "influence" in older files
            act, infl = node.get("activation"), node.get("attribution", node.get("influence"))
            if act is not None:
                activation[n] = float(act)
            if infl is not None:
                attribution[n] = float(infl)
            is_neuron[n] = True
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptInput(f"{source}: nodes[{n}] is malformed ({type(exc).__name__}: {exc})") from None
    if len(rows) != n_nodes:
        raise CorruptInput(f"{source}: duplicate node_id in nodes")
    n_links = len(links)
    row_of = rows.__getitem__
    try:
        src = np.fromiter(map(row_of, map(_SOURCE, links)), dtype=np.int64, count=n_links)
        tgt = np.fromiter(map(row_of, map(_TARGET, links)), dtype=np.int64, count=n_links)
        weight = np.fromiter(map(_WEIGHT, links), dtype=np.float64, count=n_links)
    except KeyError as exc:
        raise CorruptInput(f"{source}: a link has no {exc} field or names a node that does not exist") from None
    except (TypeError, ValueError) as exc:
        raise CorruptInput(f"{source}: malformed link ({exc})") from None
    graph_id = meta.get("graph_id")
    corpus_index = meta.get("corpus_index", -1)
    if not isinstance(corpus_index, int) or isinstance(corpus_index, bool):
        corpus_index = -1
    try:
        return graph_arrays_from_units(
            graph_id=graph_id if isinstance(graph_id, str) and graph_id else default_graph_id,
            source=source,
            corpus_index=corpus_index,
            layer=layer, index=index, is_neuron=is_neuron, activation=activation, attribution=attribution,
            edge_src=src, edge_tgt=tgt, edge_weight=weight, is_logit=is_logit, tokens=tokens,
        )  # fmt: skip
    except InvalidArgument as exc:
        raise CorruptInput(str(exc)) from None


_OUTPUT_CLERP = re.compile(r'^Output "(.*)" \(p=[^)]*\)$', re.DOTALL)
_PROB_SUFFIX = re.compile(r" \(p=[^)]*\)$")


def logit_token(clerp: Any) -> str:
    """The token of a logit node's clerp (``Output "tok" (p=0.1)`` or ``tok (p=0.1)``, relp-spec §E)."""
    if not isinstance(clerp, str):
        return ""
    match = _OUTPUT_CLERP.match(clerp)
    if match:
        return match[1]
    return _PROB_SUFFIX.sub("", clerp.removeprefix("Logit: "))


def read_graph_arrays(path: str | Path, *, source: str | None = None) -> GraphArrays:
    """Read one graph file of any supported format into GraphArrays.

    ``source`` (default: the path) is recorded in the ledger. Truncated or corrupt files raise
    CorruptInput naming the file; a file that is not a graph file raises InvalidArgument.
    """
    path = Path(path)
    source = str(path) if source is None else source
    fmt = graph_format(path)
    payload = read_payload(path)
    if fmt == "json":
        try:
            data = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise CorruptInput(f"{path}: not valid JSON ({exc})") from None
        return graph_arrays_from_legacy(data, source=source, default_graph_id=content_graph_id(payload))
    from google.protobuf.message import DecodeError

    from circuits_core import wire
    from circuits_core._proto.circuits.v1 import graph_pb2

    msg = graph_pb2.Graph()
    try:
        msg.ParseFromString(payload)
    except DecodeError as exc:
        raise CorruptInput(f"{path}: not a valid compact graph ({exc})") from None
    # Metadata is the last field written; a file cut at a field boundary parses without it.
    if not msg.HasField("metadata"):
        raise CorruptInput(f"{path}: truncated compact graph (no metadata)")
    try:
        return wire.graph_arrays_from_proto(msg, source=source, graph_id=msg.graph_id or content_graph_id(payload))
    except InvalidArgument as exc:
        raise CorruptInput(f"{path}: {exc}") from None


def graph_arrays_from_graph(graph: Any, *, source: str = "") -> GraphArrays:
    """Columns of a domain :class:`circuits_core.schemas.Graph` (edges matched to units by node key).

    A graph without ``graph_id`` gets the content id of its deterministic protobuf encoding.
    """
    from circuits_core import wire

    msg = wire.graph_to_proto(graph)
    graph_id = graph.graph_id or content_graph_id(msg.SerializeToString(deterministic=True))
    return wire.graph_arrays_from_proto(msg, source=source, graph_id=graph_id)

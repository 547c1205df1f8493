"""The compiled graph scan (circuits_core._graph_scan) against protobuf's own parse.

The reference is ``wire.graph_message_from_bytes`` (protobuf) followed by the attribute-by-attribute
read (``fast=False``). ``wire.graph_request_from_bytes`` (the scan, falling back to protobuf where
it declines) must give the same columns for every message, and the same refusal for every
malformed one: checked on messages of every shape, on encodings a serializer does not write
(unpacked columns, split fields, unknown fields, groups), on mutated bytes (a seeded fuzz), and
through a real aggregator server whose Ingest decodes with the scan.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from circuits_aggregator.testing import random_graph
from circuits_core import _graph_scan, wire
from circuits_core._proto.circuits.v1 import aggregator_pb2_grpc, graph_pb2
from circuits_core.aggregator_types import graph_fingerprint
from circuits_core.errors import InvalidArgument

pytestmark = pytest.mark.skipif(not _graph_scan.available(), reason="numba not installed")


def _proto(seed: int, **kw) -> graph_pb2.Graph:
    g = random_graph(np.random.default_rng(seed), **{"n_neurons": 60, "n_edges": 300, "pool": 40, **kw})
    return wire.graph_to_proto(g)


def _summary(arrays) -> tuple:
    return (graph_fingerprint(arrays), arrays.graph_id, arrays.corpus_index, arrays.logit_tokens, arrays.model,
            arrays.num_layers, arrays.d_mlp, arrays.n_edges, arrays.n_units)  # fmt: skip


def _outcome(decode, data: bytes, **kw) -> tuple:
    try:
        return ("counted", _summary(wire.graph_arrays_from_proto(decode(data), source="t", **kw)))
    except InvalidArgument as exc:
        return ("refused", str(exc))


def _reference(data: bytes) -> tuple:
    return _outcome(wire.graph_message_from_bytes, data, fast=False)


def _scanned(data: bytes) -> tuple:
    return _outcome(wire.graph_request_from_bytes, data)


# -- hand-made encodings ------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    if wire_type == 2:
        payload = _varint(len(payload)) + payload
    return _varint(number << 3 | wire_type) + payload


def _without_edges(msg: graph_pb2.Graph) -> bytes:
    copy = graph_pb2.Graph()
    copy.CopyFrom(msg)
    copy.ClearField("edges")
    return copy.SerializeToString()


def _packed_table(msg: graph_pb2.Graph, *, split: bool = False, unpacked: bool = False) -> bytes:
    table = msg.edges
    src, tgt = list(table.src), list(table.tgt)
    weight = np.asarray(table.weight, dtype="<f8")
    out = b""
    for number, values in ((1, src), (2, tgt)):
        if unpacked:
            out += b"".join(_field(number, 0, _varint(v)) for v in values)
        elif split:
            half = len(values) // 2
            out += _field(number, 2, b"".join(map(_varint, values[:half])))
            out += _field(number, 2, b"".join(map(_varint, values[half:])))
        else:
            out += _field(number, 2, b"".join(map(_varint, values)))
    return out + _field(3, 2, weight.tobytes())


@pytest.mark.parametrize("seed", range(4))
def test_scan_reads_what_protobuf_reads(seed):
    msg = _proto(seed)
    msg.units[1].ClearField("position")
    msg.units[2].ClearField("activation")
    msg.units[3].ClearField("attribution")
    msg.units[4].index = 2_000_000
    msg.units[5].label = "ünïcode label ✓"
    msg.units[6].cluster = "1.2.3"
    msg.units[-1].token = " Paris ünï 🗼"
    msg.edges.raw_weight.extend([0.5] * len(msg.edges.src))
    data = msg.SerializeToString()
    request = wire.graph_request_from_bytes(data)
    assert isinstance(request, wire.ScannedGraph)
    assert wire.graph_sizes(request) == wire.graph_sizes(msg) == (len(msg.units), len(msg.edges.src))
    assert request.header.graph_id == msg.graph_id and request.header.metadata == msg.metadata
    assert list(request.header.prompt_tokens) == list(msg.prompt_tokens) and not request.header.units
    assert _scanned(data) == _reference(data)
    assert _scanned(data)[0] == "counted"
    assert _scanned(data)[1][3] and _scanned(data)[1][3][0][1] == " Paris ünï 🗼"


def test_empty_and_edgeless_graphs():
    for msg in (graph_pb2.Graph(graph_id="g"), _proto(9, n_edges=0)):
        data = msg.SerializeToString()
        assert _scanned(data) == _reference(data)


@pytest.mark.parametrize("shape", ["labels", "unpacked", "split", "two_tables", "group"])
def test_encodings_the_scan_declines_are_parsed_by_protobuf(shape):
    msg = _proto(5)
    if shape == "labels":  # unit labels: nested messages the scan does not read
        msg.units[3].labels.add(text="capital cities", score_detection=0.5)
        data = msg.SerializeToString()
    elif shape in ("unpacked", "split"):  # legal encodings of repeated scalars a serializer does not write
        data = _without_edges(msg) + _field(6, 2, _packed_table(msg, unpacked=shape == "unpacked", split=shape == "split"))
    elif shape == "two_tables":  # protobuf merges a repeated message field
        full = _packed_table(msg)
        weights = _field(3, 2, np.asarray(msg.edges.weight, dtype="<f8").tobytes())
        data = _without_edges(msg) + _field(6, 2, full[: len(full) - len(weights)]) + _field(6, 2, weights)
    else:  # an unknown group field (wire types 3/4) at the top level
        data = msg.SerializeToString() + _varint(99 << 3 | 3) + _varint(99 << 3 | 4)
    request = wire.graph_request_from_bytes(data)
    assert not isinstance(request, wire.ScannedGraph)
    assert _scanned(data) == _reference(data)
    if shape != "group":
        assert _scanned(data)[1][0] == _reference(msg.SerializeToString())[1][0]  # same content counted


def test_unknown_fields_are_skipped_like_protobuf():
    msg = _proto(6)
    unknown = _field(40, 0, _varint(7)) + _field(41, 2, b"\xff\xfe") + _field(42, 1, b"\x00" * 8)
    unit = msg.units[2].SerializeToString() + unknown
    data = msg.SerializeToString() + unknown + _field(5, 2, unit)
    assert isinstance(wire.graph_request_from_bytes(data), wire.ScannedGraph)
    assert _scanned(data) == _reference(data)


@pytest.mark.parametrize("bad", ["utf8_token", "utf8_label", "surrogate", "overlong", "big_uint32", "odd_doubles",
                                 "cut"])  # fmt: skip
def test_malformed_bytes_get_protobufs_refusal(bad):
    msg = _proto(7)
    marker = "\u00e9\u00e9MARK"
    if bad == "utf8_token":
        msg.units[-1].token = marker
    elif bad in ("utf8_label", "surrogate", "overlong"):
        msg.units[4].label = marker
    data = msg.SerializeToString()
    spoiled = {"utf8_token": b"\xc3\x28", "utf8_label": b"\xe2\x82", "surrogate": b"\xed\xa0", "overlong": b"\xc0\xaf"}
    if bad in spoiled:
        at = data.index(marker.encode())
        data = data[:at] + spoiled[bad] + data[at + 2:]
    elif bad == "big_uint32":  # a uint32 varint over 32 bits: protobuf truncates it; the scan lets it
        table = _field(1, 2, _varint(1 << 33) + b"".join(map(_varint, list(msg.edges.src)[1:])))
        table += _field(2, 2, b"".join(map(_varint, msg.edges.tgt))) + _field(3, 2, np.asarray(msg.edges.weight, "<f8").tobytes())
        data = _without_edges(msg) + _field(6, 2, table)
    elif bad == "odd_doubles":
        table = _field(1, 2, b"\x00") + _field(2, 2, b"\x00") + _field(3, 2, b"\x00" * 12)
        data = _without_edges(msg) + _field(6, 2, table)
    else:
        data = data[: len(data) // 2]
    assert not isinstance(_try(wire.graph_request_from_bytes, data), wire.ScannedGraph)
    assert _scanned(data) == _reference(data)


def _try(decode, data):
    try:
        return decode(data)
    except InvalidArgument as exc:
        return exc


def test_mutated_bytes_fuzz():
    """Seeded mutations of valid messages: the scan path never accepts what protobuf refuses, never
    refuses what it accepts, and reads the same columns."""
    rng = np.random.default_rng(2026)
    outcomes = {"counted": 0, "refused": 0}
    for seed in range(6):
        msg = _proto(seed, n_neurons=20, n_edges=60)
        msg.units[-1].token = " tök"
        data = bytearray(msg.SerializeToString())
        for _ in range(150):
            mutated = bytearray(data)
            how = rng.integers(0, 5)
            at = int(rng.integers(0, len(mutated)))
            if how == 0:
                mutated[at] = int(rng.integers(0, 256))
            elif how == 1:
                mutated[at] ^= 1 << int(rng.integers(0, 8))
            elif how == 2:
                del mutated[at: at + int(rng.integers(1, 4))]
            elif how == 3:
                mutated[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 4))).astype(np.uint8))
            else:
                mutated = mutated[:at]
            want = _reference(bytes(mutated))
            assert _scanned(bytes(mutated)) == want, (seed, how, at)
            outcomes[want[0]] += 1
    assert outcomes["counted"] > 50 and outcomes["refused"] > 50  # both sides exercised


def test_kernel_compiled_equals_plain_python():
    from circuits_core import _graph_scan_kernel as k

    buf = np.frombuffer(_proto(8).SerializeToString(), dtype=np.uint8)
    compiled, plain = k.scan_graph(buf), k.scan_graph.py_func(buf)
    assert compiled[0] == plain[0] > 0
    for a, b in zip(compiled[1:], plain[1:]):
        np.testing.assert_array_equal(a, b)


def test_server_ingest_decodes_with_the_scan_and_keeps_its_checks(served_store, brute):
    """Through a real server: scanned graphs count like protobuf-parsed ones (an unpacked edge table,
    sent as raw bytes, takes the protobuf path and counts the same); the request guard's size and
    string limits still refuse."""
    from circuits_aggregator.server import AggregatorServerSettings, build_server
    from circuits_aggregator.store import AggregateStore
    from circuits_server.serving import ServerSettings

    store, server, client = served_store
    rng = np.random.default_rng(31)
    graphs = [random_graph(rng) for _ in range(5)]
    msgs = [wire.graph_to_proto(g) for g in graphs]
    raw = [m.SerializeToString() for m in msgs[:4]]
    raw.append(_without_edges(msgs[4]) + _field(6, 2, _packed_table(msgs[4], unpacked=True)))
    channel = grpc.insecure_channel(server.address)
    ingest = channel.stream_stream("/circuits.v1.AggregatorService/Ingest", request_serializer=None,
                                   response_deserializer=None)  # fmt: skip
    list(ingest(iter(raw), timeout=30))
    assert client.stats().graphs_processed == 5
    edges = [dict(zip(("src_layer", "src_neuron", "tgt_layer", "tgt_neuron", "count", "weight_sum", "weight_abs_sum",
                       "weight_sq_sum", "weight_min", "weight_max"), row))
             for cols in client.iter_edge_columns() for row in zip(*(getattr(cols, c).tolist() for c in (
                 "src_layer", "src_neuron", "tgt_layer", "tgt_neuron", "count", "weight_sum", "weight_abs_sum",
                 "weight_sq_sum", "weight_min", "weight_max")))]  # fmt: skip
    ref_edges, _ = brute.brute_force(graphs)
    assert {(r["src_layer"], r["src_neuron"], r["tgt_layer"], r["tgt_neuron"]): r["count"] for r in edges} == {
        k: v[0] for k, v in ref_edges.items()
    }

    bad_id = wire.graph_to_proto(random_graph(rng, graph_id="bad\x01id"))
    with pytest.raises(grpc.RpcError) as err:
        list(ingest(iter([bad_id.SerializeToString()]), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "graph_id" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(ingest(iter([b"\x0a\xff"]), timeout=30))  # graph_id's length runs past the end
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "decoded" in err.value.details()
    channel.close()

    limited = build_server(
        AggregatorServerSettings(server=ServerSettings(port=0, max_nodes_per_graph=10, max_edges_per_graph=1000)),
        store=AggregateStore(),
    ).start()
    try:
        with grpc.insecure_channel(limited.address) as ch:
            call = ch.stream_stream("/circuits.v1.AggregatorService/Ingest", request_serializer=None,
                                    response_deserializer=None)  # fmt: skip
            with pytest.raises(grpc.RpcError) as err:
                list(call(iter([msgs[0].SerializeToString()]), timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_nodes_per_graph=10" in err.value.details()
    finally:
        limited.stop(0)


# -- the compiled column pass (wire._scanned_graph_arrays) -------------------------------------
def _columns_taken(data: bytes) -> bool:
    """Whether the compiled column pass accepted the scanned graph (else the reference path ran)."""
    request = wire.graph_request_from_bytes(data)
    if not isinstance(request, wire.ScannedGraph):
        return False
    return wire._scanned_graph_arrays(request.header, request._columns, "t", None) is not None


def _semantic(bad: str) -> bytes:
    msg = _proto(11)
    kinds = [u.kind for u in msg.units]
    neuron = kinds.index(graph_pb2.UNIT_KIND_NEURON)
    logit = kinds.index(graph_pb2.UNIT_KIND_LOGIT)
    if bad == "duplicate_key":
        other = kinds.index(graph_pb2.UNIT_KIND_NEURON, neuron + 1)
        for name in ("layer", "index", "position"):
            setattr(msg.units[other], name, getattr(msg.units[neuron], name))
    elif bad == "duplicate_without_position":
        other = kinds.index(graph_pb2.UNIT_KIND_NEURON, neuron + 1)
        msg.units[other].layer, msg.units[other].index = msg.units[neuron].layer, msg.units[neuron].index
        msg.units[neuron].ClearField("position")
        msg.units[other].ClearField("position")
    elif bad == "neuron_layer":
        msg.units[neuron].layer = 1024
    elif bad == "negative_neuron":
        msg.units[neuron].index = -3
    elif bad == "beyond_num_layers":
        msg.metadata.extra_json = '{"generation_settings": {"num_layers": 2, "d_mlp": 0}}'
    elif bad == "beyond_d_mlp":
        msg.metadata.extra_json = '{"generation_settings": {"num_layers": 0, "d_mlp": 3}}'
    elif bad == "bad_dims":
        msg.metadata.extra_json = '{"generation_settings": {"num_layers": -1}}'
    elif bad == "unknown_kind":
        msg.units[3].kind = 7
    elif bad == "unset_kind":
        msg.units[3].kind = graph_pb2.UNIT_KIND_UNSPECIFIED
    elif bad in ("inf_activation", "nan_attribution", "inf_probability"):
        field = {"inf_activation": "activation", "nan_attribution": "attribution", "inf_probability": "probability"}[bad]
        setattr(msg.units[neuron], field, float("nan") if bad.startswith("nan") else float("inf"))
    elif bad == "nan_weight":
        msg.edges.weight[5] = float("nan")
    elif bad == "edge_out_of_range":
        msg.edges.tgt[4] = len(msg.units)
    elif bad == "negative_token":
        msg.units[logit].index = -5
        msg.edges.src.append(neuron)
        msg.edges.tgt.append(logit)
        msg.edges.weight.append(0.25)
    elif bad == "raw_weight_length":
        msg.edges.raw_weight.extend([1.0, 2.0])
    return msg.SerializeToString()


_SEMANTIC = ["duplicate_key", "duplicate_without_position", "neuron_layer", "negative_neuron", "beyond_num_layers",
             "beyond_d_mlp", "bad_dims", "unknown_kind", "unset_kind", "inf_activation", "nan_attribution",
             "inf_probability", "nan_weight", "edge_out_of_range", "negative_token", "raw_weight_length"]  # fmt: skip


@pytest.mark.parametrize("bad", _SEMANTIC)
def test_column_pass_refers_every_bad_graph_to_the_reference(bad):
    """Each check the reference reader makes: the compiled pass declines the graph, and the
    refusal is the reference's own message."""
    data = _semantic(bad)
    assert not _columns_taken(data)
    outcome = _scanned(data)
    assert outcome == _reference(data)
    assert outcome[0] == "refused", outcome


def test_column_pass_takes_valid_graphs_with_logits_and_stated_shapes():
    msg = _proto(12)
    msg.metadata.extra_json = '{"generation_settings": {"num_layers": 16, "d_mlp": 2000000}}'
    kinds = [u.kind for u in msg.units]
    neuron, logit = kinds.index(graph_pb2.UNIT_KIND_NEURON), kinds.index(graph_pb2.UNIT_KIND_LOGIT)
    msg.units[neuron].ClearField("activation")  # absent values are NaN in the columns
    for _ in range(3):  # repeated links to one logit: one token name
        msg.edges.src.append(neuron)
        msg.edges.tgt.append(logit)
        msg.edges.weight.append(-0.5)
    data = msg.SerializeToString()
    assert _columns_taken(data)
    assert _scanned(data) == _reference(data) and _scanned(data)[0] == "counted"
    fast = wire.graph_arrays_from_proto(wire.graph_request_from_bytes(data), source="t")
    slow = wire.graph_arrays_from_proto(wire.graph_message_from_bytes(data), source="t", fast=False)
    for name in fast.__dataclass_fields__:
        a, b = getattr(fast, name), getattr(slow, name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), name
        else:
            assert a == b, name
    assert fast.n_logit_links >= 3 and np.isnan(fast.unit_activation).any()


def test_column_kernel_compiled_equals_plain_python():
    from circuits_core import _graph_scan_kernel as k

    scanned = _graph_scan.scan(_proto(13).SerializeToString())
    args = (scanned.layer, scanned.index, scanned.kind, scanned.position, scanned.has_position,
            scanned.has_activation, scanned.has_attribution, scanned.activation, scanned.attribution,
            scanned.probability, scanned.src, scanned.tgt, scanned.weight, 0, 0, 1023, 2097151)  # fmt: skip
    compiled, plain = k.graph_columns(*args), k.graph_columns.py_func(*args)
    assert compiled[0] and plain[0]
    for a, b in zip(compiled[1:], plain[1:]):
        np.testing.assert_array_equal(a, b)
    dup = list(args)
    dup[1] = np.zeros_like(scanned.index)  # every unit of a layer at index 0, same position: duplicates
    dup[0] = np.zeros_like(scanned.layer)
    dup[3] = np.zeros_like(scanned.position)
    assert not k.graph_columns(*dup)[0] and not k.graph_columns.py_func(*dup)[0]

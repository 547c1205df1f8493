"""Graph edges as columns: construction, rows on demand, lookups, and the paths that must agree."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from circuits import Edge, Graph, Unit
from circuits_core import wire
from circuits_core.aggregator_types import graph_arrays_from_graph
from circuits_core.edge_table import NO_POSITION, EdgeTable, check_unit_keys, unit_key_columns
from circuits_core.errors import InvalidArgument
from circuits_aggregator.testing import random_graph


def _units() -> tuple[Unit, ...]:
    return (
        Unit(layer=-1, index=5, position=0, kind="embedding", token="a"),
        Unit(layer=0, index=3, position=0),
        Unit(layer=0, index=3, position=1),
        Unit(layer=1, index=9, position=1, kind="logit", token="b"),
        Unit(layer=2, index=4),  # no position
    )


def _rows() -> list[Edge]:
    u = _units()
    pairs = [(0, 1, 0.5, None), (1, 2, -1.5, 0.25), (2, 3, 2.0, -3.0), (4, 3, 0.125, None)]
    return [
        Edge(src_layer=u[s].layer, src_index=u[s].index, src_position=u[s].position,
             tgt_layer=u[t].layer, tgt_index=u[t].index, tgt_position=u[t].position, weight=w, raw_weight=r)
        for s, t, w, r in pairs
    ]  # fmt: skip


def test_rows_in_rows_out_and_positions_and_raw_weights_map_to_sentinels() -> None:
    table = EdgeTable.from_edges(_rows())
    assert table.rows() == tuple(_rows())
    assert table.src_position.tolist() == [0, 0, 1, NO_POSITION] and np.isnan(table.raw_weight[[0, 3]]).all()
    assert table.has_raw_weight and not EdgeTable.from_edges(_rows()[:1]).has_raw_weight
    graph = Graph(units=_units(), edges=_rows())
    assert graph.edges == tuple(_rows()) and len(graph.edge_table) == 4
    assert Graph(units=_units(), edges=table) == graph  # columns or rows, same graph
    assert hash(Graph(units=_units(), edges=table)) == hash(graph)


def test_columns_are_copied_checked_and_read_only() -> None:
    src = np.array([0, 1])
    table = EdgeTable(src_layer=src, src_index=[1, 2], src_position=[0, 0], tgt_layer=[1, 1], tgt_index=[2, 3],
                      tgt_position=[0, 0], weight=[0.5, 0.25])  # fmt: skip
    src[0] = 99
    assert table.src_layer.tolist() == [0, 1] and np.isnan(table.raw_weight).all()
    with pytest.raises(ValueError):
        table.weight[0] = 1.0
    with pytest.raises(InvalidArgument, match="differ in length"):
        EdgeTable(src_layer=[0], src_index=[1], src_position=[0], tgt_layer=[1], tgt_index=[2], tgt_position=[0], weight=[1.0, 2.0])
    with pytest.raises(InvalidArgument, match="integers"):
        EdgeTable(src_layer=[0.5], src_index=[1], src_position=[0], tgt_layer=[1], tgt_index=[2], tgt_position=[0], weight=[1.0])


def test_endpoint_rows_find_units_and_name_what_is_missing() -> None:
    units = _units()
    src, tgt = EdgeTable.from_edges(_rows()).endpoint_rows(units)
    assert src.tolist() == [0, 1, 2, 4] and tgt.tolist() == [1, 2, 3, 3]
    with pytest.raises(InvalidArgument, match=r"edge 3 source \(2, 4, None\) is not a unit"):
        EdgeTable.from_edges(_rows()).endpoint_rows(units[:4])
    with pytest.raises(InvalidArgument, match="duplicate unit"):
        EdgeTable.from_edges(_rows()).endpoint_rows(units + (units[1],))


def test_endpoint_lookup_without_bit_packing_agrees() -> None:
    """Keys too wide for one int64 take the dense path; it must find the same rows."""
    big = 1 << 40
    units = (Unit(layer=0, index=big, position=0), Unit(layer=1, index=5, position=1 << 30), Unit(layer=-1, index=3, kind="embedding"))
    edges = [Edge(src_layer=0, src_index=big, src_position=0, tgt_layer=1, tgt_index=5, tgt_position=1 << 30, weight=1.0),
             Edge(src_layer=-1, src_index=3, tgt_layer=0, tgt_index=big, tgt_position=0, weight=2.0)]  # fmt: skip
    src, tgt = EdgeTable.from_edges(edges).endpoint_rows(units)
    assert src.tolist() == [0, 2] and tgt.tolist() == [1, 0]


def test_unit_key_checks() -> None:
    layer, index, position = unit_key_columns(_units())
    check_unit_keys(layer, index, position, np.array([False, True, True, False, True]))
    with pytest.raises(InvalidArgument, match="appears twice"):
        check_unit_keys(np.array([0, 0]), np.array([1, 1]), np.array([2, 2]), np.array([True, True]))
    with pytest.raises(InvalidArgument, match="neuron layer 1024 is outside"):
        check_unit_keys(np.array([1024]), np.array([1]), np.array([0]), np.array([True]))
    check_unit_keys(np.array([-1, 1024]), np.array([1, 1]), np.array([0, 0]), np.array([False, False]))  # not neurons


def test_repr_is_one_short_line() -> None:
    rng = np.random.default_rng(0)
    graph = random_graph(rng, n_neurons=400, n_edges=20_000, graph_id="abc")
    text = repr(graph)
    assert "\n" not in text and len(text) < 250
    assert "edges=20000" in text and "graph_id='abc'" in text and "neurons" in text


def test_replace_keeps_edges_and_accepts_new_ones() -> None:
    graph = Graph(units=_units(), edges=_rows(), prompt="p")
    assert dataclasses.replace(graph, prompt="q").edge_table == graph.edge_table
    assert dataclasses.replace(graph, edges=_rows()[:2]).edges == tuple(_rows()[:2])
    labelled = graph.with_labels({(0, 3): "out"}, input_labels={(0, 3): "in"})
    assert [(u.label, u.input_label) for u in labelled.units if u.key == (0, 3)] == [("out", "in")] * 2
    assert labelled.edge_table == graph.edge_table


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_edges=st.integers(0, 60), graph_id=st.sampled_from(["", "g1"]))
def test_graph_to_aggregator_arrays_equals_the_protobuf_path(seed: int, n_edges: int, graph_id: str) -> None:
    """The in-process aggregator goes Graph -> arrays directly; the gRPC path goes through the
    message. Both must give the same arrays (and the same content id for a graph without one)."""
    graph = random_graph(np.random.default_rng(seed), n_edges=n_edges, graph_id=graph_id)
    direct = graph_arrays_from_graph(graph, source="s")
    msg = wire.graph_to_proto(graph)
    from circuits_core.aggregator_types import content_graph_id

    via_proto = wire.graph_arrays_from_proto(msg, source="s", graph_id=graph_id or content_graph_id(msg.SerializeToString(deterministic=True)))
    for f in dataclasses.fields(direct):
        a, b = getattr(direct, f.name), getattr(via_proto, f.name)
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), f.name
        else:
            assert a == b, f.name


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.integers(0, 2**32 - 1), max_size=200), seed=st.integers(0, 1000))
def test_packed_columns_are_the_bytes_protobuf_writes(values: list[int], seed: int) -> None:
    """wire packs numpy columns itself; the bytes must be protobuf's own (content ids depend on them)."""
    from circuits_core._proto.circuits.v1 import graph_pb2

    weights = np.random.default_rng(seed).normal(size=len(values))
    ours = wire._packed_varints(1, np.array(values, dtype=np.int64)) + wire._packed_doubles(3, weights)
    assert ours == graph_pb2.EdgeTable(src=values, weight=weights.tolist()).SerializeToString()
    graph = random_graph(np.random.default_rng(seed), n_edges=len(values) % 50)
    src, tgt = graph.edge_table.endpoint_rows(graph.units)
    reference = graph_pb2.EdgeTable(src=src.tolist(), tgt=tgt.tolist(), weight=graph.edge_table.weight.tolist())
    assert wire.graph_to_proto(graph).edges.SerializeToString() == reference.SerializeToString()

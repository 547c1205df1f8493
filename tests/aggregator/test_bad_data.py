"""Bad data never reaches the statistics (issue 25 item 4), through the real server and client.

* NaN / +-Inf activations, attributions and probabilities are refused (INVALID_ARGUMENT on Ingest,
  a reported skip in directory aggregation); nothing of the graph is counted.
* A re-sent graph_id with different content is a conflict: reported in the ack's
  conflict_graph_ids (not as a duplicate), logged, and the first content stays counted.
* The state records its model and shape at first ingest and refuses other models, shapes and
  neurons outside the shape with INVALID_ARGUMENT, also after a restart.
* Repeated links and self-loops are defined: every link is one observation (checked against the
  brute-force reference); a duplicate unit is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import grpc
import numpy as np
import pytest

from circuits_core import wire
from circuits_core._proto.circuits.v1 import aggregator_pb2_grpc
from circuits_core.aggregator_types import (
    FINGERPRINT_PREFIX,
    graph_arrays_from_graph,
    graph_fingerprint,
    legacy_graph_fingerprint,
)
from circuits_core.errors import InvalidArgument
from circuits_core.graphio import write_graph
from circuits_core.schemas import Edge, Graph, GraphMetadata, Unit
from circuits_aggregator.directory import aggregate_directory
from circuits_aggregator.store import AggregateStore
from circuits_aggregator.testing import random_graph


def _graph(gid: str, *, act: float | None = 0.5, attr: float | None = 0.25, weight: float = 1.5, model: str = "m",
           dims: tuple[int, int] | None = None, neuron: int = 3) -> Graph:  # fmt: skip
    units = (
        Unit(layer=0, index=neuron, position=0, activation=act, attribution=attr),
        Unit(layer=1, index=2, position=1, activation=1.0, attribution=0.5),
    )
    edges = (Edge(src_layer=0, src_index=neuron, src_position=0, tgt_layer=1, tgt_index=2, tgt_position=1, weight=weight),)
    extra = {"generation_settings": {"num_layers": dims[0], "d_mlp": dims[1]}} if dims else {}
    return Graph(units=units, edges=edges, prompt="p", prompt_tokens=("a", "b"), model=model, graph_id=gid,
                 metadata=GraphMetadata(extra=extra))  # fmt: skip


def _stub(server):
    return aggregator_pb2_grpc.AggregatorServiceStub(grpc.insecure_channel(server.address))


@pytest.mark.parametrize("field", ["activation", "attribution", "probability"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_unit_values_are_refused_on_ingest(served_store, field, value) -> None:
    _store, server, client = served_store
    client.ingest([_graph("good")])
    msg = wire.graph_to_proto(_graph("bad"))
    setattr(msg.units[0], field, value)
    with pytest.raises(grpc.RpcError) as err:
        list(_stub(server).Ingest(iter([msg]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "finite" in err.value.details() and field in err.value.details()
    stats = client.stats()
    assert stats.graphs_processed == 1 and stats.total_edge_observations == 1


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused_from_python_graphs_and_files(tmp_path, value) -> None:
    with pytest.raises(InvalidArgument, match="finite"):
        graph_arrays_from_graph(_graph("x", act=value))
    with pytest.raises(InvalidArgument, match="finite"):
        graph_arrays_from_graph(_graph("x", attr=value))
    # A viewer JSON file with a non-finite activation is reported and skipped, the others count.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_graph(_graph("ok-1"), corpus / "a.json")
    write_graph(_graph("bad"), corpus / "b.json")
    doc = json.loads((corpus / "b.json").read_text())
    doc["nodes"][0]["activation"] = value  # json writes NaN / Infinity / -Infinity
    (corpus / "b.json").write_text(json.dumps(doc))
    with AggregateStore(tmp_path / "s.duckdb") as store:
        report = aggregate_directory(store, corpus, progress=False)
        assert report.ingested == 1 and [name for name, _ in report.corrupt] == ["b.json"]
        assert "finite" in report.corrupt[0][1]
        units = store.unit_table().to_pylist()
        assert all(math.isfinite(r["act_sum"]) and math.isfinite(r["attr_sum"]) for r in units)


def test_resent_graph_id_with_other_content_is_a_conflict(served_store, caplog) -> None:
    store, _server, client = served_store
    first = _graph("g-1", weight=1.5)
    assert client.ingest([first]).acked == 1
    with caplog.at_level(logging.WARNING, logger="circuits.aggregator"):
        report = client.ingest([_graph("g-1", weight=-7.0)])
    assert report.conflict_graph_ids == ("g-1",) and report.duplicates == 0
    assert any("g-1" in r.getMessage() and "conflict" in r.getMessage() for r in caplog.records)
    same = client.ingest([first])
    assert same.duplicates == 1 and same.conflict_graph_ids == ()
    # The first content stays counted, once.
    (edge,) = client.get_edges()
    assert edge.count == 1 and edge.weight_sum == 1.5
    # Within one batch too: the second copy with other content is a conflict, not a duplicate.
    ack = store.ingest([graph_arrays_from_graph(_graph("g-2")), graph_arrays_from_graph(_graph("g-2", weight=9.0))])
    assert ack.conflict_graph_ids == ("g-2",) and ack.duplicates == 0


def test_sha1_fingerprints_of_older_states_still_tell_duplicates_from_conflicts(tmp_path) -> None:
    """A state written before xxh3 fingerprints keeps sha1 ones in its ledger: a re-sent graph is
    compared with its sha1 there (same content: duplicate; other content: conflict)."""
    first, second = graph_arrays_from_graph(_graph("old-1", weight=1.5)), graph_arrays_from_graph(_graph("old-2", weight=2.5))
    with AggregateStore(tmp_path / "state.duckdb") as store:
        store.ingest([first, second])
        prints = dict(store._con.execute("SELECT graph_id, content_sha FROM ledger").fetchall())
        assert prints["old-1"] == graph_fingerprint(first) and prints["old-1"].startswith(FINGERPRINT_PREFIX)
        # What an older version wrote (the format of its ledger), and one graph from before fingerprints.
        store._con.execute("UPDATE ledger SET content_sha = ? WHERE graph_id = 'old-1'", [legacy_graph_fingerprint(first)])
        store._con.execute("UPDATE ledger SET content_sha = NULL WHERE graph_id = 'old-2'")
    assert len(legacy_graph_fingerprint(first)) == 32 and legacy_graph_fingerprint(first) != legacy_graph_fingerprint(second)
    with AggregateStore(tmp_path / "state.duckdb") as store:
        ack = store.ingest([first, second])
        assert ack.duplicates == 2 and ack.conflict_graph_ids == ()
        ack = store.ingest([graph_arrays_from_graph(_graph("old-1", weight=-7.0))])
        assert ack.conflict_graph_ids == ("old-1",) and ack.duplicates == 0
        assert store.graphs_total == 2


def test_model_and_shape_are_recorded_at_first_ingest(served_store, tmp_path) -> None:
    store, server, client = served_store
    client.ingest([_graph("a", dims=(4, 64))])
    assert store.identity == {"model": "m", "num_layers": "4", "d_mlp": "64"}
    refused = {
        "another model": _graph("b", model="other"),
        "another width": _graph("c", dims=(4, 128)),
        "a neuron beyond the width": _graph("d", neuron=64),  # states no shape: the recorded one applies
        "a neuron beyond its own stated width": _graph("e", dims=(4, 64), neuron=100),
    }
    for why, graph in refused.items():
        with pytest.raises(grpc.RpcError) as err:
            list(_stub(server).Ingest(iter([wire.graph_to_proto(graph)]), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, why
    client.ingest([_graph("f", neuron=63)])
    assert client.stats().graphs_processed == 2
    # The identity is durable: a reopened state still refuses another model.
    path = store.path
    server.stop(0)
    store.close()
    with AggregateStore(path) as again:
        assert again.identity == {"model": "m", "num_layers": "4", "d_mlp": "64"}
        with pytest.raises(InvalidArgument, match="model"):
            again.ingest([graph_arrays_from_graph(_graph("g", model="other"))])
        assert again.graphs_total == 2


def test_engine_graphs_state_their_shape(make_attributor) -> None:
    attributor = make_attributor("llama")
    graph = attributor.trace("the capital of france is paris")
    arrays = graph_arrays_from_graph(graph)
    info = attributor.model_info()
    assert (arrays.model, arrays.num_layers, arrays.d_mlp) == (info.model, info.num_layers, info.d_mlp)
    assert arrays.num_layers > 0 and arrays.d_mlp > 0


def test_repeated_links_and_self_loops_count_once_each(served_store, brute) -> None:
    _store, _server, client = served_store
    units = (
        Unit(layer=0, index=5, position=0, activation=1.0),
        Unit(layer=0, index=5, position=2, activation=2.0),  # the same neuron at another position
        Unit(layer=1, index=7, position=2, activation=3.0),
    )
    link = Edge(src_layer=0, src_index=5, src_position=0, tgt_layer=1, tgt_index=7, tgt_position=2, weight=0.5)
    loop = Edge(src_layer=0, src_index=5, src_position=0, tgt_layer=0, tgt_index=5, tgt_position=2, weight=0.25)
    graph = Graph(units=units, edges=(link, dataclasses.replace(link, weight=0.75), loop), prompt="p",
                  prompt_tokens=("a",), model="m", graph_id="defined", metadata=GraphMetadata())  # fmt: skip
    client.ingest([graph])
    got = {(e.src_layer, e.src_index, e.tgt_layer, e.tgt_index): (e.count, e.weight_sum) for e in client.get_edges()}
    assert got == {(0, 5, 1, 7): (2, 1.25), (0, 5, 0, 5): (1, 0.25)}
    ref_edges, _ = brute.brute_force([graph])
    assert {k: (v[0], v[1]) for k, v in ref_edges.items()} == got
    # A duplicate unit (same layer, neuron and position) is refused.
    msg = wire.graph_to_proto(random_graph(np.random.default_rng(5)))
    msg.units.append(msg.units[0])
    with pytest.raises(InvalidArgument, match="twice"):
        client.ingest([msg])

"""Every RPC through a real server on port 0 with the real client; bad requests -> INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from circuits_core import wire
from circuits_core._proto.circuits.v1 import aggregator_pb2, aggregator_pb2_grpc
from circuits_core.errors import InvalidArgument
from circuits_aggregator.testing import random_graph


def test_ingest_stats_get_edges_export(served_store, tmp_path, brute) -> None:
    store, server, client = served_store
    rng = np.random.default_rng(21)
    corpus = [random_graph(rng) for _ in range(300)]
    acks = []
    report = client.ingest(corpus, max_in_flight=40, on_ack=acks.append)
    assert report.acked == 300 and report.duplicates == 0 and report.graphs_total == 300
    assert len(acks) > 1 and all(len(a.graph_ids) <= 32 for a in acks)  # micro-batched
    again = client.ingest(corpus[:50] + [g for g in corpus[:5]])
    assert again.duplicates == 55 and again.graphs_total == 300

    stats = client.stats()
    ref_edges, ref_units = brute.brute_force(corpus)
    assert stats.graphs_processed == 300
    assert stats.total_edge_observations == sum(v[0] for v in ref_edges.values())
    assert (stats.distinct_edges, stats.distinct_units) == (len(ref_edges), len(ref_units))

    edges = client.get_edges(min_count=3)
    assert {(e.src_layer, e.src_index, e.tgt_layer, e.tgt_index): e.count for e in edges} == {
        k: v[0] for k, v in ref_edges.items() if v[0] >= 3
    }
    assert len(client.get_edges(min_count=1, limit=7)) == 7
    batches = list(client.iter_edge_columns(min_count=1, batch_size=100))
    assert sum(len(b) for b in batches) == len(ref_edges) and max(len(b) for b in batches) <= 100

    files = client.export(tmp_path / "export")
    assert sorted(p.rsplit("/", 1)[-1] for p in files) == ["edges.parquet", "ledger.parquet", "logits.parquet", "units.parquet"]
    edge_rows, unit_rows, ledger = brute.export_rows(tmp_path / "export")
    brute.assert_matches(edge_rows, unit_rows, corpus)
    assert len(ledger) == 300


def test_client_fills_in_missing_graph_ids(served_store) -> None:
    _store, _server, client = served_store
    rng = np.random.default_rng(22)
    g = random_graph(rng, graph_id="")
    assert client.ingest([g, g]).duplicates == 1
    assert client.stats().graphs_processed == 1


def test_bad_requests_are_invalid_argument(served_store) -> None:
    store, server, client = served_store
    rng = np.random.default_rng(23)
    good = [random_graph(rng) for _ in range(3)]
    stub = aggregator_pb2_grpc.AggregatorServiceStub(grpc.insecure_channel(server.address))

    # A message without graph_id (raw stub: the client would fill it in).
    bad = wire.graph_to_proto(random_graph(rng, graph_id=""))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Ingest(iter([bad]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "graph_id" in err.value.details()

    # An edge pointing past the units: graphs before it still count, the bad one does not.
    broken = wire.graph_to_proto(random_graph(rng))
    broken.edges.src.append(10_000)
    broken.edges.tgt.append(0)
    broken.edges.weight.append(1.0)
    with pytest.raises(InvalidArgument, match="unit"):
        client.ingest([*good, broken])
    assert client.stats().graphs_processed == 3

    for request in (
        aggregator_pb2.GetEdgesRequest(min_count=-1),
        aggregator_pb2.GetEdgesRequest(limit=-5),
    ):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.GetEdges(request, timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.Export(aggregator_pb2.ExportRequest(directory=""), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgument):
        client.export("/proc/no/such/place")


def test_sharded_server_rejects_graphs_it_does_not_own(tmp_path) -> None:
    from circuits_core.aggregator_types import shard_of
    from circuits_sdk.aggregator import AggregatorClient
    from circuits_aggregator.server import AggregatorServerSettings, build_server
    from circuits_aggregator.store import AggregateStore, StoreSettings

    store = AggregateStore(tmp_path / "s1.duckdb", StoreSettings(shard_index=1, shard_count=2))
    server = build_server(AggregatorServerSettings(), store=store).start()
    server.set_serving(True)
    try:
        with AggregatorClient(server.address) as client:
            corpus = [random_graph(np.random.default_rng(24 + i)) for i in range(40)]
            report = client.ingest(corpus)
            owned = [g.graph_id for g in corpus if shard_of(g.graph_id, 2) == 1]
            assert 0 < len(owned) < 40
            assert report.acked == len(owned)
            assert sorted(report.rejected_graph_ids) == sorted(g.graph_id for g in corpus if g.graph_id not in owned)
            stats = client.stats()
            assert (stats.graphs_processed, stats.shard_index, stats.shard_count) == (len(owned), 1, 2)
    finally:
        server.stop(0)

"""LIMITS: documented defaults (docs/limits.md == circuits_core.limits), settable, and enforced where
they exist: over-limit requests get INVALID_ARGUMENT / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED
with a message naming the limit. (The attribution queue bound is drilled in test_drill_load.py.)
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import grpc
import pytest
from circuits_core.errors import InvalidArgument, ResourceExhausted
from circuits_core.limits import (
    DEFAULT_LIMITS,
    Limits,
    add_limit_arguments,
    flag,
    limits_from_args,
    markdown_table,
)
from drill_support import ENFORCED_LIMITS as ENFORCED

DOCS = Path(__file__).resolve().parents[2] / "docs" / "limits.md"


def test_docs_table_is_generated_from_the_limits() -> None:
    text = DOCS.read_text(encoding="utf-8")
    start, end = text.index("<!-- limits-table:start -->"), text.index("<!-- limits-table:end -->")
    assert text[start:end].split("\n", 1)[1].strip() == markdown_table().strip(), \
        "docs/limits.md is stale: paste circuits_core.limits.markdown_table()"
    for f in dataclasses.fields(Limits):
        assert f"`{f.name}`" in text[end:], f"docs/limits.md does not say where {f.name} is enforced"


def test_defaults_are_the_ones_the_components_use() -> None:
    """Until every service reads circuits_core.limits, the same numbers must live in the old places."""
    from circuits_server.serving import (
        DEFAULT_MAX_EDGES_PER_GRAPH,
        DEFAULT_MAX_MESSAGE_BYTES,
        DEFAULT_MAX_NODES_PER_GRAPH,
        ServerSettings,  # fmt: skip
    )
    from circuits_core.tracing import MAX_PROMPT_CHARS
    from circuits_atlas.database import QueryLimits
    from circuits_attribution.server import AttributionSettings

    assert DEFAULT_LIMITS.max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES == ServerSettings().max_message_bytes
    assert DEFAULT_LIMITS.max_prompt_chars == MAX_PROMPT_CHARS
    assert (DEFAULT_LIMITS.max_nodes_per_graph, DEFAULT_LIMITS.max_edges_per_graph, DEFAULT_LIMITS.max_stream_messages) == (
        DEFAULT_MAX_NODES_PER_GRAPH, DEFAULT_MAX_EDGES_PER_GRAPH, ServerSettings().max_stream_messages)
    atlas = QueryLimits()
    assert (DEFAULT_LIMITS.max_results, DEFAULT_LIMITS.query_timeout_s, DEFAULT_LIMITS.max_query_chars) == (
        atlas.max_results, atlas.query_timeout_s, atlas.max_query_chars)
    assert DEFAULT_LIMITS.max_queue == AttributionSettings().max_queue


def test_limits_are_settable_and_checks_name_the_limit() -> None:
    parser = argparse.ArgumentParser()
    add_limit_arguments(parser, ["max_nodes_per_graph", "query_timeout_s", "max_results"])
    limits = limits_from_args(parser.parse_args(["--max-nodes-per-graph", "10", "--query-timeout", "0.5"]))
    assert (limits.max_nodes_per_graph, limits.query_timeout_s, limits.max_results) == (10, 0.5, 1000)
    limits.check("max_nodes_per_graph", 10, "graph g has", unit="units")  # at the limit: fine
    with pytest.raises(ResourceExhausted, match=r"graph g has 11 units, over the limit max_nodes_per_graph=10 "
                                                r"\(--max-nodes-per-graph\)"):  # fmt: skip
        limits.check("max_nodes_per_graph", 11, "graph g has", unit="units")
    Limits(max_stream_messages=0).check("max_stream_messages", 10**9, "stream has")  # 0 = unlimited
    assert (limits.clamp("max_results", 0), limits.clamp("max_results", 5), limits.clamp("max_results", 10**6)) == (1000, 5, 1000)
    assert flag("max_message_bytes") == "--max-message-bytes" and flag("query_timeout_s") == "--query-timeout"
    with pytest.raises(InvalidArgument, match="max_queue"):
        Limits(max_queue=-1)
    with pytest.raises(InvalidArgument, match="max_message_bytes"):
        Limits(max_message_bytes=10)


def test_message_size_limit_gives_resource_exhausted(small_atlas) -> None:
    from circuits_core._proto.circuits.v1 import atlas_pb2, atlas_pb2_grpc
    from circuits_server.serving import ServerSettings
    from circuits_atlas.server import AtlasSettings, build_server

    server = build_server(AtlasSettings(duckdb_path=str(small_atlas),
                                        server=ServerSettings(port=0, max_message_bytes=4096))).start()  # fmt: skip
    server.set_serving(True)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = atlas_pb2_grpc.AtlasServiceStub(channel)
            stub.SearchUnits(atlas_pb2.SearchUnitsRequest(text="enzyme", limit=2), timeout=10)  # small: fine
            with pytest.raises(grpc.RpcError) as info:
                stub.SearchUnits(atlas_pb2.SearchUnitsRequest(text="x" * 8000), timeout=10)
    finally:
        server.stop(0.5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in info.value.details() and "4096" in info.value.details()
    ENFORCED.append("max_message_bytes")


def test_graph_size_and_stream_length_limits(tmp_path) -> None:
    """Generic guards of every server (circuits_server.serving): graphs too large and streams too long are
    refused with RESOURCE_EXHAUSTED naming the limit; a refused graph is not counted."""
    import numpy as np
    from circuits_core import wire
    from circuits_sdk.aggregator import AggregatorClient
    from circuits_server.serving import ServerSettings
    from circuits_aggregator import AggregateStore
    from circuits_aggregator.server import AggregatorServerSettings, build_server
    from circuits_aggregator.testing import random_graph

    rng = np.random.default_rng(8)
    small = [random_graph(rng, n_neurons=2, n_edges=3, graph_id=f"small-{i}") for i in range(5)]
    big = random_graph(rng, n_neurons=12, n_edges=3, graph_id="big")
    many_edges = random_graph(rng, n_neurons=2, n_edges=9, graph_id="many-edges")
    assert all(len(g.units) <= 4 and len(g.edges) == 3 for g in small) and len(big.units) > 4
    store = AggregateStore(tmp_path / "state.duckdb")
    settings = ServerSettings(port=0, max_stream_messages=3, max_nodes_per_graph=4, max_edges_per_graph=8)
    server = build_server(AggregatorServerSettings(server=settings), store=store).start()
    server.set_serving(True)
    try:
        with AggregatorClient(server.address, reconnect_timeout=5) as client:
            with pytest.raises(ResourceExhausted, match=r"has 1[0-9] units, over the limit max_nodes_per_graph=4 "
                                                        r"\(--max-nodes-per-graph\)"):  # fmt: skip
                client.ingest([wire.graph_to_proto(big)])
            with pytest.raises(ResourceExhausted, match=r"has 9 edges, over the limit max_edges_per_graph=8"):
                client.ingest([wire.graph_to_proto(many_edges)])
            assert store.stats().graphs_processed == 0
            assert client.ingest(small[:3]).acked == 3  # exactly at the stream limit: fine
            with pytest.raises(ResourceExhausted, match=r"more than 3 messages, over the limit max_stream_messages=3"):
                client.ingest(small, max_in_flight=1)
            assert client.ingest(small[3:]).acked == 2  # a new stream goes on
            assert store.stats().graphs_processed == 5
    finally:
        server.stop(0.5)
    ENFORCED.extend(["max_nodes_per_graph", "max_edges_per_graph", "max_stream_messages"])


def test_prompt_length_limits(tiny_engine) -> None:
    from circuits_sdk.attribution import AttributionClient
    from circuits_server.serving import ServerSettings
    from circuits_attribution.server import AttributionSettings, build_server

    server = build_server(AttributionSettings(server=ServerSettings(port=0), model="tiny"), tiny_engine).start()
    try:
        with AttributionClient(server.address, timeout=60) as client:
            with pytest.raises(InvalidArgument, match="limit of 200000"):
                client.trace("x" * (DEFAULT_LIMITS.max_prompt_chars + 1))
            with pytest.raises(InvalidArgument, match="context of 64 tokens"):
                client.trace(" ".join(["red"] * 100))
            assert client.trace("the capital of france is").units  # the server still works
    finally:
        server.stop(0.5)
    ENFORCED.extend(["max_prompt_chars", "max_prompt_tokens (model context)"])


def test_atlas_result_rows_query_chars_and_query_time(small_atlas) -> None:
    from circuits_core.errors import DeadlineExceeded
    from circuits_atlas.database import CircuitDatabase, QueryLimits

    with CircuitDatabase(small_atlas, limits=QueryLimits(max_results=5, max_query_chars=20)) as db:
        assert len(db.search("detector", 100)) == 5
        assert len(db.search("detector", 3)) == 3
        busiest = db.search("detector", 5)[0].unit
        assert len(db.get_edges_for_unit(busiest.layer, busiest.index, direction="downstream", limit=10**6)) <= 5
        with pytest.raises(InvalidArgument, match="longer than 20 characters"):
            db.search("x" * 21)
        reference = [(h.unit.layer, h.unit.index) for h in db.search("enzyme", 5)]
    # A 1 µs budget: every query either finishes or is stopped with a message naming the time limit,
    # and an interrupt never leaks into the next query's answer.
    outcomes = {"ok": 0, "stopped": 0}
    with CircuitDatabase(small_atlas, limits=QueryLimits(query_timeout_s=1e-6, max_results=5)) as db:
        for _ in range(300):
            try:
                got = [(h.unit.layer, h.unit.index) for h in db.search("enzyme", 5)]
            except DeadlineExceeded as exc:
                assert "longer than 1e-06 s" in str(exc)
                outcomes["stopped"] += 1
            else:
                assert got == reference
                outcomes["ok"] += 1
            if outcomes["stopped"] >= 3 and outcomes["ok"] >= 3:
                break
    # Whether a 1 µs timer fires inside a query is a race; the deterministic stop of a long query is
    # tested in tests/atlas. Here: answers are right whenever a query finishes.
    assert outcomes["ok"] >= 1, outcomes
    ENFORCED.extend(["max_results", "max_query_chars", "query_timeout_s"])


def test_edges_per_batch_and_units_per_request_flags_on_real_servers(spawn, tmp_path) -> None:
    """--max-edges-per-batch (aggregator GetEdges) and --max-units-per-request (labeler GetLabels,
    LabelUnits) set on the command line of real server processes."""
    import numpy as np
    import yaml
    from circuits_aggregator.testing import random_graph
    from circuits_core import wire
    from circuits_labeler.evidence import write_evidence_parquet
    from circuits_sdk.aggregator import AggregatorClient
    from circuits_sdk.labeler import LabelerClient

    agg = spawn("circuits_aggregator", "--state", str(tmp_path / "agg" / "state.duckdb"), "--max-edges-per-batch", "5",
                name="aggregator-batch").start(timeout=120)  # fmt: skip
    rng = np.random.default_rng(9)
    with AggregatorClient(agg.address) as client:
        client.ingest([wire.graph_to_proto(random_graph(rng, graph_id=f"b{i}")) for i in range(4)])
        distinct = client.stats().distinct_edges
        sizes = [len(batch.count) for batch in client.iter_edge_columns(batch_size=1_000_000)]
    assert distinct > 5 and sum(sizes) == distinct and max(sizes) == 5, (distinct, sizes)
    ENFORCED.append("max_edges_per_batch")

    key = tmp_path / "key"
    key.write_text("sk-drill-not-a-real-key\n")
    evidence = write_evidence_parquet(tmp_path / "export", edges=[(0, n, 1, n, 3, 0.2) for n in range(6)],
                                      units=[(layer, n, 3) for layer in range(2) for n in range(6)])  # fmt: skip
    config = tmp_path / "label.yaml"
    config.write_text(yaml.safe_dump({"labeling": {
        "backend": "anthropic", "model": "stand-in", "base_url": "http://127.0.0.1:9", "api_key_file": str(key),
        "evidence_path": str(evidence), "projections_path": "", "cache_path": str(tmp_path / "cache.jsonl"),
        "labels_path": str(tmp_path / "labels.jsonl"),
    }}))  # fmt: skip
    labeler = spawn("circuits_labeler", "--config", str(config), "--max-units-per-request", "3",
                    name="labeler-units").start(timeout=120)  # fmt: skip
    with LabelerClient(labeler.address) as client:
        assert client.get_labels([(0, n) for n in range(3)]) == []  # at the limit: fine (nothing labelled yet)
        with pytest.raises(ResourceExhausted, match=r"GetLabels request has 4 units, over the limit max_units_per_request=3 "
                                                    r"\(--max-units-per-request\)"):  # fmt: skip
            client.get_labels([(0, n) for n in range(4)])
        with pytest.raises(ResourceExhausted, match="LabelUnits request has 4 units, over the limit max_units_per_request=3"):
            client.label_units([(0, n) for n in range(4)], label_pass="output")
    ENFORCED.append("max_units_per_request")

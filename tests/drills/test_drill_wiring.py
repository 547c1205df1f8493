"""WIRING: client auth options reach the channel, CLI --token-file/--tls-ca, and the request-limit
hooks of the aggregator (GetEdges batch clamp, Export root), labeler (unit count, GetLabels clamp)
and attribution (Trace max_nodes cap)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from drill_support import READ_TOKEN

from circuits_core.errors import InvalidArgument, ResourceExhausted, Unauthenticated
from circuits_core.limits import Limits


@pytest.fixture
def token_atlas(small_atlas, tokens_file):
    from circuits_server.serving import ServerSettings
    from circuits_atlas.server import AtlasSettings, build_server

    server = build_server(AtlasSettings(duckdb_path=str(small_atlas),
                                        server=ServerSettings(port=0, auth_tokens_file=str(tokens_file)))).start()  # fmt: skip
    server.set_serving(True)
    try:
        yield server
    finally:
        server.stop(0.5)


def test_atlas_client_sends_token_only_when_given(token_atlas) -> None:
    from circuits_sdk.atlas import AtlasClient

    with AtlasClient(token_atlas.address, timeout=20) as client, pytest.raises(Unauthenticated):
        client.stats()
    with AtlasClient(token_atlas.address, timeout=20, token="not-the-token") as client, pytest.raises(Unauthenticated):
        client.stats()
    with AtlasClient(token_atlas.address, timeout=20, token=READ_TOKEN) as client:
        assert client.stats() is not None


def test_query_cli_reads_token_file_or_env(token_atlas, tmp_path, monkeypatch, capsys) -> None:
    from circuits.cli import query

    parser = argparse.ArgumentParser()
    query.add_arguments(parser)
    monkeypatch.delenv("CIRCUITS_TOKEN", raising=False)
    with pytest.raises(Unauthenticated):
        query.run(parser.parse_args(["--remote", token_atlas.address, "enzyme"]))
    token_file = tmp_path / "token"
    token_file.write_text(f"  {READ_TOKEN}\n")
    assert query.run(parser.parse_args(["--remote", token_atlas.address, "--token-file", str(token_file), "enzyme"])) == 0
    monkeypatch.setenv("CIRCUITS_TOKEN", READ_TOKEN)
    assert query.run(parser.parse_args(["--remote", token_atlas.address, "enzyme"])) == 0
    with pytest.raises(InvalidArgument, match="token-file"):
        query.run(parser.parse_args(["--remote", token_atlas.address, "--token-file", str(tmp_path / "none"), "x"]))


def test_every_remote_command_has_auth_flags() -> None:
    from circuits.cli import analyze, graph, intervene, query

    for module in (query, graph, intervene, analyze):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        args = parser.parse_args(["--token-file", "t", "--tls-ca", "ca.pem", "x"])
        assert (args.token_file, args.tls_ca) == ("t", "ca.pem"), module.__name__


def test_clients_accept_auth_keywords() -> None:
    from circuits_sdk.aggregator import AggregatorClient
    from circuits_sdk.attribution import AttributionClient
    from circuits_sdk.labeler import LabelerClient

    for cls in (AggregatorClient, AttributionClient, LabelerClient):
        client = cls("127.0.0.1:1", token="t", tls_ca_file="", tls_cert_file="", tls_key_file="")
        client.close()
    with pytest.raises(InvalidArgument, match="TLS file"):
        LabelerClient("127.0.0.1:1", tls_ca_file="/no/such/ca.pem")


def _filled_store(path: Path):
    from circuits_aggregator import AggregateStore
    from circuits_core.aggregator_types import graph_arrays_from_graph
    from circuits_aggregator.testing import random_graph

    store = AggregateStore(path)
    rng = np.random.default_rng(7)
    store.ingest([graph_arrays_from_graph(random_graph(rng, graph_id=f"g{i}")) for i in range(3)])
    return store


def test_aggregator_get_edges_batch_is_clamped_and_export_stays_in_root(tmp_path) -> None:
    from circuits_core import wire
    from circuits_core._proto.circuits.v1 import aggregator_pb2
    from circuits_aggregator.servicer import AggregatorServicer

    store = _filled_store(tmp_path / "state" / "agg.duckdb")
    try:
        servicer = AggregatorServicer(store, limits=Limits(max_edges_per_batch=5))
        sizes = [len(wire.edge_columns_from_proto(m).count)
                 for m in servicer.GetEdges(aggregator_pb2.GetEdgesRequest(batch_size=1_000_000), None)]  # fmt: skip
        assert sum(sizes) == store.stats().distinct_edges > 5 and max(sizes) == 5
        assert servicer.export_root == (tmp_path / "state").resolve()
        for outside in (tmp_path / "elsewhere", tmp_path / "state" / ".." / "escape", "/tmp"):
            with pytest.raises(InvalidArgument, match="export root"):
                servicer.Export(aggregator_pb2.ExportRequest(directory=str(outside)), None)
        reply = servicer.Export(aggregator_pb2.ExportRequest(directory=str(tmp_path / "state" / "out")), None)
        assert reply.files and all(Path(f).resolve().is_relative_to(tmp_path / "state") for f in reply.files)
        custom = AggregatorServicer(store, export_root=tmp_path / "exports")
        assert custom.Export(aggregator_pb2.ExportRequest(directory=str(tmp_path / "exports" / "e")), None).files
    finally:
        store.close()


class _RecordingLabels:
    """Stands in for LabelerService: records what the servicer passes on."""

    def __init__(self) -> None:
        self.limits: list[int] = []

    def get_labels(self, keys, *, limit: int = 0):
        self.limits.append(limit)
        return []

    def label_units(self, keys, *, label_pass: str, allow_without_evidence: bool = False):
        return [], []


def test_labeler_unit_cap_and_get_labels_clamp() -> None:
    from circuits_core._proto.circuits.v1 import labeler_pb2
    from circuits_labeler.servicer import LabelerServicer

    service = _RecordingLabels()
    servicer = LabelerServicer(service, limits=Limits(max_units_per_request=3, max_results=50))  # type: ignore[arg-type]
    refs = [labeler_pb2.UnitRef(layer=0, index=i) for i in range(4)]
    for method, request in ((servicer.LabelUnits, labeler_pb2.LabelUnitsRequest(units=refs)),
                            (servicer.GetLabels, labeler_pb2.GetLabelsRequest(units=refs))):  # fmt: skip
        with pytest.raises(ResourceExhausted, match="max_units_per_request=3"):
            method(request, None)
    for asked, passed in ((0, 50), (10, 10), (10_000, 50)):
        servicer.GetLabels(labeler_pb2.GetLabelsRequest(units=refs[:3], limit=asked), None)
        assert service.limits[-1] == passed


def test_attribution_trace_max_nodes_over_limit_is_refused() -> None:
    from circuits_core.tracing import TraceRequest
    from circuits_attribution.service import AttributionRunner

    runner = AttributionRunner(max_nodes_per_graph=100)
    with pytest.raises(InvalidArgument, match="max_nodes_per_graph=100"):
        runner.trace(TraceRequest(prompt="hello", max_nodes=101))
    default_runner = AttributionRunner()
    with pytest.raises(InvalidArgument, match="max_nodes_per_graph"):
        default_runner.trace(TraceRequest(prompt="hello", max_nodes=Limits().max_nodes_per_graph + 1))

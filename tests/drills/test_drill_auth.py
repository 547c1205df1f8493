"""AUTH: calls without a token, with a wrong token, or with too small a scope are refused.

Scopes (circuits_server.serving.DEFAULT_METHOD_SCOPES): the atlas is read-only (every query needs
``read``); aggregator Ingest needs ``write`` and Export (it writes files on the server) ``admin``;
attribution Trace/TraceBatch/Intervene/GetActivations and labeler LabelUnits/RunProgressive/Investigate
need ``write``.
Health checks stay open for probes. A refused write changes nothing.
"""

from __future__ import annotations

import grpc
import pytest
from drill_support import (
    ADMIN_TOKEN,
    READ_TOKEN,
    WRITE_TOKEN,
    WRONG_TOKEN,
    record_drill,
    service_flags,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

REFUSALS = {"UNAUTHENTICATED", "PERMISSION_DENIED"}
TOKENS = {"none": "", "wrong": WRONG_TOKEN, "read": READ_TOKEN, "write": WRITE_TOKEN, "admin": ADMIN_TOKEN}
ROWS: list[tuple[str, str, str, str]] = []


def call(address: str, token: str, path: str, request: bytes = b"", *, streaming: str = "uu") -> str:
    """Status name of one raw call with the given bearer token (empty: none)."""
    from circuits_sdk._channel import open_channel

    with open_channel(address, token=token) as channel:
        try:
            if streaming == "uu":
                channel.unary_unary(path)(request, timeout=20)
            elif streaming == "us":
                list(channel.unary_stream(path)(request, timeout=20))
            else:
                list(channel.stream_stream(path)(iter([request]), timeout=20))
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name


def expect(service: str, address: str, method: str, request: bytes, allowed: set[str], *, streaming: str = "uu") -> None:
    """Only the tokens whose names are in ``allowed`` get through; the others are refused."""
    for name, token in TOKENS.items():
        code = call(address, token, f"/circuits.v1.{service}/{method}", request, streaming=streaming)
        ROWS.append((service, method, name, code))
        if name in allowed:
            assert code not in REFUSALS, f"{service}.{method} with the {name} token: {code}"
        else:
            want = "UNAUTHENTICATED" if name in ("none", "wrong") else "PERMISSION_DENIED"
            assert code == want, f"{service}.{method} with the {name} token: {code}, expected {want}"


def _health_open(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_atlas_is_read_only_for_every_token(small_atlas, tokens_file) -> None:
    from circuits_core._proto.circuits.v1 import atlas_pb2
    from circuits_server.serving import ServerSettings
    from circuits_atlas.server import AtlasSettings, build_server

    server = build_server(AtlasSettings(duckdb_path=str(small_atlas),
                                        server=ServerSettings(port=0, auth_tokens_file=str(tokens_file)))).start()  # fmt: skip
    server.set_serving(True)
    try:
        _health_open(server.address)
        everyone = {"read", "write", "admin"}
        expect("AtlasService", server.address, "Stats", atlas_pb2.AtlasStatsRequest().SerializeToString(), everyone)
        expect("AtlasService", server.address, "SearchUnits",
               atlas_pb2.SearchUnitsRequest(text="enzyme", limit=3).SerializeToString(), everyone)  # fmt: skip
        expect("AtlasService", server.address, "GetUnit",
               atlas_pb2.GetUnitRequest(layer=0, index=1).SerializeToString(), everyone)  # fmt: skip
    finally:
        server.stop(0.5)


def test_aggregator_ingest_needs_write_and_export_needs_admin(tmp_path, tokens_file) -> None:
    import numpy as np
    from circuits_core import wire
    from circuits_core._proto.circuits.v1 import aggregator_pb2
    from circuits_server.serving import ServerSettings
    from circuits_aggregator import AggregateStore
    from circuits_aggregator.server import AggregatorServerSettings, build_server
    from circuits_aggregator.testing import random_graph

    store = AggregateStore(tmp_path / "state.duckdb")
    server = build_server(AggregatorServerSettings(server=ServerSettings(port=0, auth_tokens_file=str(tokens_file))),
                          store=store).start()  # fmt: skip
    server.set_serving(True)
    try:
        _health_open(server.address)
        expect("AggregatorService", server.address, "Stats", b"", {"read", "write", "admin"})
        expect("AggregatorService", server.address, "GetEdges", b"", {"read", "write", "admin"}, streaming="us")
        graph = wire.graph_to_proto(random_graph(np.random.default_rng(1), graph_id="auth-drill")).SerializeToString()
        expect("AggregatorService", server.address, "Ingest", graph, {"write", "admin"}, streaming="ss")
        assert store.stats().graphs_processed == 1  # the refused ingests counted nothing; both allowed ones: once
        export = aggregator_pb2.ExportRequest(directory=str(tmp_path / "export")).SerializeToString()
        expect("AggregatorService", server.address, "Export", export, {"admin"})
    finally:
        server.stop(0.5)


def test_attribution_trace_needs_write(tiny_engine, tokens_file) -> None:
    from circuits_core import wire
    from circuits_core._proto.circuits.v1 import attribution_pb2
    from circuits_server.serving import ServerSettings
    from circuits_core.tracing import TraceRequest
    from circuits_attribution.server import AttributionSettings, build_server

    server = build_server(AttributionSettings(server=ServerSettings(port=0, auth_tokens_file=str(tokens_file)),
                                              model="tiny"), tiny_engine).start()  # fmt: skip
    try:
        _health_open(server.address)
        expect("AttributionService", server.address, "GetModelInfo",
               attribution_pb2.GetModelInfoRequest().SerializeToString(), {"read", "write", "admin"})  # fmt: skip
        trace = wire.trace_request_to_proto(TraceRequest(prompt="the capital of france is")).SerializeToString()
        expect("AttributionService", server.address, "Trace", trace, {"write", "admin"})
        from circuits_core.activations import ActivationRequest

        reads = wire.activation_request_to_proto(ActivationRequest(prompts=("the cat",), neurons=((1, 2),)))
        expect("AttributionService", server.address, "GetActivations", reads.SerializeToString(), {"write", "admin"})
    finally:
        server.stop(0.5)


@pytest.mark.parametrize("module", ["circuits_atlas", "circuits_aggregator", "circuits_attribution", "circuits_labeler"])
def test_service_command_line_accepts_shared_security_flags(module) -> None:
    """Every `python -m circuits_<service>` takes the shared server flags (circuits_server.serving.add_server_arguments)."""
    wanted = {"--tls-cert", "--tls-key", "--tls-client-ca", "--insecure", "--auth-tokens-file", "--port-file",
              "--max-message-bytes"}  # fmt: skip
    missing = sorted(wanted - service_flags(module))
    assert not missing, f"{module}.__main__ lacks {', '.join(missing)}: wire circuits_server.serving.add_server_arguments"


def test_zz_auth_summary() -> None:
    if not ROWS:
        pytest.skip("no auth drill ran in this session")
    refused = sum(1 for *_, code in ROWS if code in REFUSALS)
    record_drill("auth: tokens none/wrong/read/write/admin", requests=len(ROWS), errors=0,
                 note=f"{refused} refused as expected, {len(ROWS) - refused} allowed")  # fmt: skip

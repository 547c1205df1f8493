"""TLS, mutual TLS, bearer-token scopes and secret redaction of the shared server plumbing
(the ``pki`` fixture: tests/conftest.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from circuits_core._proto.circuits.v1 import atlas_pb2, atlas_pb2_grpc, graph_pb2
from circuits_sdk._channel import call_unary, open_channel
from circuits_core.errors import InvalidArgument, PermissionDenied, Unauthenticated
from circuits_server.serving import ServerSettings, build_grpc_server, load_tokens, register_secret

READ_TOKEN = "read-token-0123456789abcdef"
WRITE_TOKEN = "write-token-0123456789abcdef"


class _Atlas(atlas_pb2_grpc.AtlasServiceServicer):
    def GetUnit(self, request, context):
        return graph_pb2.Unit(layer=request.layer, index=request.index, kind=graph_pb2.UNIT_KIND_NEURON)

    def Stats(self, request, context):  # treated as a "write" method in these tests
        return atlas_pb2.AtlasStats(neurons=1)


def _serve(**settings):
    return build_grpc_server(
        settings=ServerSettings(port=0, grace_seconds=0.5, **settings),
        service_names=["circuits.v1.AtlasService"],
        add_servicers=lambda s: atlas_pb2_grpc.add_AtlasServiceServicer_to_server(_Atlas(), s),
        method_scopes={"Stats": "write"},
    ).start()


def test_tls_and_mutual_tls(pki) -> None:
    server = _serve(tls_cert_file=str(pki["server.pem"]), tls_key_file=str(pki["server.key"]),
                    tls_client_ca_file=str(pki["ca.pem"]))
    try:
        request = atlas_pb2.GetUnitRequest(layer=1, index=2)
        with open_channel(server.address, tls_ca_file=str(pki["ca.pem"]), tls_cert_file=str(pki["client.pem"]),
                          tls_key_file=str(pki["client.key"])) as channel:
            assert call_unary(atlas_pb2_grpc.AtlasServiceStub(channel).GetUnit, request).index == 2
        with open_channel(server.address, tls_ca_file=str(pki["ca.pem"])) as channel:  # no client cert
            with pytest.raises(Exception):
                call_unary(atlas_pb2_grpc.AtlasServiceStub(channel).GetUnit, request, timeout=5)
        with open_channel(server.address) as channel:  # plaintext client against a TLS server
            with pytest.raises(Exception):
                call_unary(atlas_pb2_grpc.AtlasServiceStub(channel).GetUnit, request, timeout=5)
    finally:
        server.stop()


def test_bearer_tokens_and_scopes(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# comment\n{READ_TOKEN} read\n{WRITE_TOKEN} read,write\n")
    server = _serve(auth_tokens_file=str(tokens))
    server.set_serving()
    request = atlas_pb2.GetUnitRequest(layer=1, index=2)
    try:
        with open_channel(server.address) as channel:
            stub = atlas_pb2_grpc.AtlasServiceStub(channel)
            with pytest.raises(Unauthenticated, match="missing or invalid bearer token"):
                call_unary(stub.GetUnit, request)
            # health stays reachable for probes without a token
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        with open_channel(server.address, token="wrong-token-0123456789") as channel:
            with pytest.raises(Unauthenticated) as err:
                call_unary(atlas_pb2_grpc.AtlasServiceStub(channel).GetUnit, request)
            assert "wrong" not in str(err.value)
        with open_channel(server.address, token=READ_TOKEN) as channel:
            stub = atlas_pb2_grpc.AtlasServiceStub(channel)
            assert call_unary(stub.GetUnit, request).index == 2
            with pytest.raises(PermissionDenied, match="'write' scope"):
                call_unary(stub.Stats, atlas_pb2.AtlasStatsRequest())
        with open_channel(server.address, token=WRITE_TOKEN) as channel:
            assert call_unary(atlas_pb2_grpc.AtlasServiceStub(channel).Stats, atlas_pb2.AtlasStatsRequest()).neurons == 1
    finally:
        server.stop()


def test_bad_token_file_errors_do_not_echo_tokens(tmp_path: Path) -> None:
    bad = tmp_path / "tokens"
    bad.write_text("short read\n")
    with pytest.raises(InvalidArgument) as err:
        load_tokens(str(bad))
    assert "short" not in str(err.value) and "tokens:1" in str(err.value)


def test_registered_secrets_are_redacted_from_logs(caplog) -> None:
    secret = "sk-ant-0123456789-very-secret"
    register_secret(secret)
    logger = logging.getLogger("circuits.test")
    logger.addFilter(__import__("circuits_server.serving", fromlist=["REDACTOR"]).REDACTOR)
    with caplog.at_level(logging.INFO):
        logger.info("calling the API with key %s", secret)
    assert secret not in caplog.text and "***" in caplog.text


def test_client_credentials_never_show_the_token(tmp_path: Path) -> None:
    from circuits_sdk.credentials import ClientCredentials, read_token_file

    credentials = ClientCredentials(token=WRITE_TOKEN, tls_ca_file="ca.pem")
    assert WRITE_TOKEN not in repr(credentials) and "ca.pem" in repr(credentials)
    assert credentials.client_kwargs()["token"] == WRITE_TOKEN and not credentials.empty and ClientCredentials().empty
    (tmp_path / "token").write_text(f"  {WRITE_TOKEN}\n")
    assert read_token_file(str(tmp_path / "token")) == WRITE_TOKEN
    (tmp_path / "bom").write_bytes(b"\xef\xbb\xbf" + WRITE_TOKEN.encode() + b"\r\n")
    assert read_token_file(str(tmp_path / "bom")) == WRITE_TOKEN
    (tmp_path / "line").write_text(f"{WRITE_TOKEN} write\n")
    with pytest.raises(InvalidArgument, match="one token") as info:
        read_token_file(str(tmp_path / "line"), flag="--x-token-file")
    assert WRITE_TOKEN not in str(info.value) and "--x-token-file" in str(info.value)
    (tmp_path / "binary").write_bytes(b"\xff\xfe" + WRITE_TOKEN.encode())
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        read_token_file(str(tmp_path / "binary"))

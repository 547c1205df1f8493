"""The shared server plumbing through a real server on port 0: health, reflection, error mapping."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from circuits_core._proto.circuits.v1 import atlas_pb2, atlas_pb2_grpc, graph_pb2
from circuits_sdk._channel import call_unary, open_channel
from circuits_core.errors import InvalidArgument, NotFound
from circuits_server.serving import ServerSettings, build_grpc_server


class _Atlas(atlas_pb2_grpc.AtlasServiceServicer):
    """Minimal servicer raising domain errors, to exercise the interceptor."""

    def GetUnit(self, request, context):
        if request.layer < 0:
            raise InvalidArgument("layer must be >= 0")
        if request.index > 10:
            raise NotFound(f"unit L{request.layer}/N{request.index} not in atlas")
        if request.index == 7:
            raise RuntimeError("secret internal detail")
        return graph_pb2.Unit(layer=request.layer, index=request.index, kind=graph_pb2.UNIT_KIND_NEURON)


@pytest.fixture
def server():
    handle = build_grpc_server(
        settings=ServerSettings(port=0, metrics_port=0, grace_seconds=1),
        service_names=["circuits.v1.AtlasService"],
        add_servicers=lambda s: atlas_pb2_grpc.add_AtlasServiceServicer_to_server(_Atlas(), s),
    ).start()
    yield handle
    handle.stop()


def _health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_flips_and_errors_map_to_codes(server) -> None:
    with open_channel(server.address) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        server.set_serving()
        assert _health(channel, "circuits.v1.AtlasService") == health_pb2.HealthCheckResponse.SERVING
        stub = atlas_pb2_grpc.AtlasServiceStub(channel)
        assert call_unary(stub.GetUnit, atlas_pb2.GetUnitRequest(layer=1, index=2)).index == 2
        with pytest.raises(InvalidArgument, match="layer must be >= 0"):
            call_unary(stub.GetUnit, atlas_pb2.GetUnitRequest(layer=-1, index=2))
        with pytest.raises(NotFound, match="L1/N11"):
            call_unary(stub.GetUnit, atlas_pb2.GetUnitRequest(layer=1, index=11))
        with pytest.raises(grpc.RpcError) as err:
            stub.GetUnit(atlas_pb2.GetUnitRequest(layer=1, index=7), timeout=5)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in err.value.details()


def test_reflection_lists_services(server) -> None:
    with open_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"circuits.v1.AtlasService", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint_counts_rpcs(server) -> None:
    import urllib.request

    server.set_serving()
    with open_channel(server.address) as channel:
        stub = atlas_pb2_grpc.AtlasServiceStub(channel)
        for _ in range(3):
            stub.GetUnit(atlas_pb2.GetUnitRequest(layer=1, index=1), timeout=5)
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics.port}/metrics", timeout=5).read().decode()
    assert 'circuits_rpc_requests_total{code="OK",method="GetUnit",service="AtlasService"} 3.0' in body


def test_shutdown_reports_not_serving(server) -> None:
    server.set_serving()
    server.stop(grace=0.5)
    assert server.health is not None
    with open_channel(server.address) as channel, pytest.raises(grpc.RpcError):
        _health(channel)

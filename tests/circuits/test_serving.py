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

    def SearchUnits(self, request, context):
        return atlas_pb2.SearchUnitsResponse(scores=[float(len(request.text))])


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


def test_every_call_is_checked_and_counted_under_its_own_code(server) -> None:
    """The interceptors build a method's wrapped handler once and reuse it: calls of one method
    that succeed, fail or send bad requests, interleaved, are each counted under their own code
    and each checked."""
    import urllib.request

    server.set_serving()
    codes = []
    with open_channel(server.address) as channel:
        stub = atlas_pb2_grpc.AtlasServiceStub(channel)
        raw = channel.unary_unary("/circuits.v1.AtlasService/SearchUnits")
        for index in (1, 11, 2, 11, 3):  # OK, NOT_FOUND, OK, NOT_FOUND, OK
            try:
                stub.GetUnit(atlas_pb2.GetUnitRequest(layer=1, index=index), timeout=5)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        assert codes == ["OK", "NOT_FOUND", "OK", "NOT_FOUND", "OK"]
        for _ in range(2):
            assert list(stub.SearchUnits(atlas_pb2.SearchUnitsRequest(text="abc"), timeout=5).scores) == [3.0]
            with pytest.raises(grpc.RpcError) as err:
                stub.SearchUnits(atlas_pb2.SearchUnitsRequest(text="a\x00b"), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NUL" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                raw(b"\xff\xff\xff", timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "could not be decoded" in err.value.details()
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics.port}/metrics", timeout=5).read().decode()
    for line in ('circuits_rpc_requests_total{code="OK",method="GetUnit",service="AtlasService"} 3.0',
                 'circuits_rpc_requests_total{code="NOT_FOUND",method="GetUnit",service="AtlasService"} 2.0',
                 'circuits_rpc_latency_seconds_count{method="GetUnit",service="AtlasService"} 5.0',
                 'circuits_rpc_requests_total{code="OK",method="SearchUnits",service="AtlasService"} 2.0',
                 'circuits_rpc_requests_total{code="INVALID_ARGUMENT",method="SearchUnits",service="AtlasService"} 4.0'):  # fmt: skip
        assert line in body


def test_wrapped_handlers_follow_the_inner_handler() -> None:
    from circuits_server.serving import _WrappedHandlers

    built = []

    def build(method, inner):
        built.append((method, inner))
        return ("wrapped", method, inner)

    cache = _WrappedHandlers(size=2)
    a, b, c = object(), object(), object()
    assert cache.get("/s/A", a, build) == ("wrapped", "/s/A", a)
    assert cache.get("/s/A", a, build) == ("wrapped", "/s/A", a) and len(built) == 1  # reused
    assert cache.get("/s/B", a, build) == ("wrapped", "/s/B", a) and len(built) == 2  # per method
    assert cache.get("/s/A", b, build) == ("wrapped", "/s/A", b) and len(built) == 3  # another inner handler
    assert cache.get("/s/A", b, build) == ("wrapped", "/s/A", b) and len(built) == 4  # full: built per call
    assert cache.get("/s/A", c, build)[2] is c


def test_shutdown_reports_not_serving(server) -> None:
    server.set_serving()
    server.stop(grace=0.5)
    assert server.health is not None
    with open_channel(server.address) as channel, pytest.raises(grpc.RpcError):
        _health(channel)

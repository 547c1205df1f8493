"""The Intervene RPC through a real gRPC server on port 0: same numbers as in-process, clear
INVALID_ARGUMENT for bad neuron ids, and the engine is left without hooks (later traces unchanged)."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from circuits_core import wire
from circuits_core._proto.circuits.v1 import attribution_pb2_grpc
from circuits_core.interventions import InterventionRequest, parse_neuron_spec

from circuits_attribution.testing import PROMPT, build_model


@pytest.fixture(scope="module")
def server_and_engine(tokenizer):
    from circuits_server.serving import ServerSettings
    from circuits_attribution import RelPAttributor, RelPConfig
    from circuits_attribution.server import AttributionSettings, build_server

    engine = RelPAttributor(build_model("llama", seed=7), tokenizer, RelPConfig(raw=True, model_name="tiny"))
    server = build_server(AttributionSettings(server=ServerSettings(port=0), model="tiny"), engine).start()
    channel = grpc.insecure_channel(server.address)
    try:
        yield attribution_pb2_grpc.AttributionServiceStub(channel), engine, server.address
    finally:
        channel.close()
        server.stop(0.5)


def test_intervene_rpc_matches_in_process(server_and_engine):
    from circuits_attribution.interventions import Intervener

    stub, engine, _ = server_and_engine
    request = InterventionRequest(
        prompt="the capital of france is", raw=True, top_k=5, generate_tokens=4,
        interventions=(parse_neuron_spec("3:5:all=set:8"), parse_neuron_spec("1:2:-1=scale:-2")),
    )
    reply = stub.Intervene(wire.intervene_request_to_proto(request), timeout=30)
    got = wire.intervention_result_from_proto(reply, interventions=request.interventions)
    twin = build_model("llama", seed=7)
    want = Intervener(twin, engine.tokenizer, model_name="tiny").run(
        request.prompt, request.interventions, raw=True, top_k=5, generate_tokens=4
    )
    assert got == want
    assert wire.intervene_request_from_proto(wire.intervene_request_to_proto(request)) == request
    # no hooks left on the served model: a trace equals one on an untouched twin
    from circuits_attribution import RelPAttributor

    after = engine.trace(PROMPT, compute_edges=False)
    fresh = RelPAttributor(twin, engine.tokenizer, engine.config).trace(PROMPT, compute_edges=False)
    assert [(u.node_key, u.attribution) for u in after.units] == [(u.node_key, u.attribution) for u in fresh.units]


def test_client_and_engine_are_the_same_intervener(server_and_engine):
    """AttributionClient (gRPC) and RelPAttributor (in process) implement the Intervener interface alike."""
    from circuits_core.capabilities import Intervener
    from circuits_sdk.attribution import AttributionClient

    _, engine, address = server_and_engine
    request = InterventionRequest(prompt="the capital of france is", raw=True, top_k=3,
                                  interventions=(parse_neuron_spec("2:7=zero"),))
    with AttributionClient(address) as client:
        assert isinstance(client, Intervener) and isinstance(engine, Intervener)
        assert client.intervene(request) == engine.intervene(request)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [("4:0=zero", "layer 4 is out of range"), ("0:96=zero", "neuron index 96 is out of range"),
     ("0:1:9=zero", "position 9 is outside the prompt")],
)
def test_intervene_rpc_bad_ids_are_invalid_argument(server_and_engine, spec, fragment):
    stub, _, _ = server_and_engine
    request = InterventionRequest(prompt="the capital of france is", raw=True, interventions=(parse_neuron_spec(spec),))
    with pytest.raises(grpc.RpcError) as info:
        stub.Intervene(wire.intervene_request_to_proto(request), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()


def test_intervene_rpc_unspecified_mode_is_invalid_argument(server_and_engine):
    stub, _, _ = server_and_engine
    request = InterventionRequest(prompt="the capital of france is", raw=True,
                                  interventions=(parse_neuron_spec("0:1=zero"),))
    msg = wire.intervene_request_to_proto(request)
    msg.interventions[0].mode = 0
    with pytest.raises(grpc.RpcError) as info:
        stub.Intervene(msg, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mode is unspecified" in info.value.details()
    assert dataclasses.is_dataclass(request)


def test_intervene_cli_remote(server_and_engine, capsys):
    from circuits.cli import main

    _, _, address = server_and_engine
    rc = main(["intervene", "the capital of france is", "--raw", "--remote", address, "--neuron", "3:5=set:8", "--top-k", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "interventions: 3:5=set:8" in out and "predicting position 5" in out
    rc = main(["intervene", "the capital of france is", "--raw", "--remote", address, "--neuron", "3:500=zero"])
    assert rc == 2 and "neuron index 500 is out of range" in capsys.readouterr().err

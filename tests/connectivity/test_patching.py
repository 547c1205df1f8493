"""Activation patching against brute-force hooks on a tiny float64 model: per-neuron and whole-set
noising/denoising effects, the batched runs equal one run per patch, RelP predictions checked
against the explicit linearized model, rank correlation, the Patch RPC through a real server, and
bad input."""

from __future__ import annotations

import math

import grpc
import pytest
import torch

from circuits_attribution.patching import Patcher, capture_activations, patched_effects
from circuits_attribution.testing import LinearOracle, build_model
from circuits_core.errors import InvalidArgument
from circuits_core.interventions import NeuronIntervention
from circuits_core.patching import PatchNeuron, PatchRequest, parse_patch_neuron, rank_correlation

CLEAN = "the capital of france is"
CORRUPT = "the capital of rome is"
TARGETS = ("paris", "london")


def metric_with_hooks(model, ids, replacements, pos_id, neg_id):
    """Reference: a forward whose down_proj inputs get ``replacements[(layer, position, index)]``."""
    handles = []
    for layer_index, layer in enumerate(model.model.layers):
        mine = {k: v for k, v in replacements.items() if k[0] == layer_index}
        if not mine:
            continue

        def hook(_m, args, mine=mine):
            x = args[0].clone()
            for (_, p, i), value in mine.items():
                x[0, p, i] = value
            return (x,)

        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return float(logits[pos_id] - logits[neg_id])


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = build_model("llama", seed=5)
    patcher = Patcher(model, tokenizer, model_name="tiny", batch_size=5)
    return model, patcher


def test_effects_match_brute_force(setup, tokenizer):
    model, patcher = setup
    neurons = (PatchNeuron(layer=3, index=7, position=5), PatchNeuron(layer=1, index=40, position=-2),
               PatchNeuron(layer=2, index=3), PatchNeuron(layer=0, index=90, position=4))
    request = PatchRequest(clean=CLEAN, corrupt=CORRUPT, neurons=neurons, target_tokens=TARGETS, raw=True)
    result = patcher.run(request)
    ids_c = patcher._attributor(request).encode_prompt(CLEAN)
    ids_x = patcher._attributor(request).encode_prompt(CORRUPT)
    T = len(ids_c)
    acts_c, _ = capture_activations(model, ids_c)
    acts_x, _ = capture_activations(model, ids_x)
    vocab = tokenizer.get_vocab()
    pos_id, neg_id = vocab["paris"], vocab["london"]
    assert (result.positive_token_id, result.negative_token_id) == (pos_id, neg_id)
    m_clean = metric_with_hooks(model, ids_c, {}, pos_id, neg_id)
    m_corrupt = metric_with_hooks(model, ids_x, {}, pos_id, neg_id)
    assert result.clean_metric == pytest.approx(m_clean, abs=1e-12)
    assert result.corrupt_metric == pytest.approx(m_corrupt, abs=1e-12)
    all_noise, all_denoise = {}, {}
    for neuron, effect in zip(neurons, result.neurons):
        positions = range(T) if neuron.position is None else [neuron.position % T]
        noise = {(neuron.layer, p, neuron.index): float(acts_x[neuron.layer, p, neuron.index]) for p in positions}
        denoise = {(neuron.layer, p, neuron.index): float(acts_c[neuron.layer, p, neuron.index]) for p in positions}
        all_noise.update(noise)
        all_denoise.update(denoise)
        assert effect.noising == pytest.approx(metric_with_hooks(model, ids_c, noise, pos_id, neg_id) - m_clean, abs=1e-10)
        assert effect.denoising == pytest.approx(metric_with_hooks(model, ids_x, denoise, pos_id, neg_id) - m_corrupt, abs=1e-10)
        assert effect.position == (None if neuron.position is None else neuron.position % T)
    assert result.set_noising == pytest.approx(metric_with_hooks(model, ids_c, all_noise, pos_id, neg_id) - m_clean, abs=1e-10)
    assert result.set_denoising == pytest.approx(metric_with_hooks(model, ids_x, all_denoise, pos_id, neg_id) - m_corrupt, abs=1e-10)
    assert math.isnan(result.neurons[2].clean_activation)  # all-position patch: no single activation


def test_predictions_are_relp_first_order_effects(setup, tokenizer):
    """predicted = d~m/dh (h_corrupt - h_clean); check d~m/dh against the explicit linearized
    model (relp-spec §J oracle): zeroing a neuron there changes m by exactly -RelP."""
    model, patcher = setup
    neurons = (PatchNeuron(layer=2, index=11, position=5), PatchNeuron(layer=1, index=60, position=3),
               PatchNeuron(layer=0, index=5, position=5))
    request = PatchRequest(clean=CLEAN, corrupt=CORRUPT, neurons=neurons, target_tokens=TARGETS, raw=True)
    result = patcher.run(request)
    ids = patcher._attributor(request).encode_prompt(CLEAN)
    ids_x = patcher._attributor(request).encode_prompt(CORRUPT)
    oracle = LinearOracle(model, ids, len(ids) - 1)
    vocab = tokenizer.get_vocab()
    pos_id, neg_id = vocab["paris"], vocab["london"]
    base = oracle.run()
    m0 = float(base.logits[pos_id] - base.logits[neg_id])
    acts_c, _ = capture_activations(model, ids)
    acts_x, _ = capture_activations(model, ids_x)
    for neuron, effect in zip(neurons, result.neurons):
        zeroed = oracle.run(zero_neurons=[(neuron.layer, neuron.position, neuron.index)])
        relp = m0 - float(zeroed.logits[pos_id] - zeroed.logits[neg_id])
        assert effect.relp == pytest.approx(relp, rel=1e-8, abs=1e-12)
        h = float(acts_c[neuron.layer, neuron.position, neuron.index])
        dh = float(acts_x[neuron.layer, neuron.position, neuron.index]) - h
        assert effect.predicted == pytest.approx(relp / h * dh, rel=1e-8, abs=1e-12)
    assert result.set_predicted == pytest.approx(sum(e.predicted for e in result.neurons), rel=1e-12)


def test_default_neurons_are_the_top_relp_and_batched_runs_equal_single_runs(setup):
    model, patcher = setup
    request = PatchRequest(clean=CLEAN, corrupt=CORRUPT, top=12, target_tokens=TARGETS, raw=True)
    result = patcher.run(request)
    assert len(result.neurons) == 12
    relps = [abs(e.relp) for e in result.neurons]
    assert relps == sorted(relps, reverse=True)
    # the 12 largest |RelP| of all (layer, position, neuron) entries
    attributor = patcher._attributor(request)
    ids = attributor.encode_prompt(CLEAN)
    direction = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    direction[result.positive_token_id], direction[result.negative_token_id] = 1.0, -1.0
    scores = attributor.node_scores(ids, direction=direction).scores
    assert relps[-1] >= float(scores.abs().flatten().sort(descending=True).values[11]) - 1e-12
    # batched patch runs == one neuron_interventions run per patch
    ids_x = attributor.encode_prompt(CORRUPT)
    acts_x, _ = capture_activations(model, ids_x)
    rows = [[(e.layer, e.position, e.index, float(acts_x[e.layer, e.position, e.index]))] for e in result.neurons]
    batched = patched_effects(model, ids, rows, result.positive_token_id, result.negative_token_id, batch_size=4)
    for row, value, effect in zip(rows, batched, result.neurons):
        (layer, p, i, v), = row
        single = patcher._run_metric(ids, [NeuronIntervention(layer=layer, index=i, mode="set", value=v, positions=(p,))],
                                     result.positive_token_id, result.negative_token_id) - result.clean_metric
        assert value == pytest.approx(single, abs=1e-10)
        assert effect.noising == pytest.approx(single, abs=1e-10)
    assert -1.0 <= result.rank_correlation <= 1.0
    # default neurons start at the first differing token; all of them enter the correlation
    assert result.first_difference == 4 and all(e.position >= 4 for e in result.neurons)
    assert result.compared == 12
    assert result.rank_correlation == pytest.approx(
        rank_correlation([e.predicted for e in result.neurons], [e.noising for e in result.neurons]))


def test_neurons_before_the_first_difference_change_nothing_and_are_not_compared(setup):
    _, patcher = setup
    early = tuple(PatchNeuron(layer=l, index=i, position=p) for l, i, p in ((0, 3, 1), (2, 8, 3), (3, 1, 0)))
    late = tuple(PatchNeuron(layer=l, index=i, position=p) for l, i, p in ((1, 5, 4), (2, 9, 5), (3, 2, 5), (0, 7, 4)))
    result = patcher.run(PatchRequest(clean=CLEAN, corrupt=CORRUPT, neurons=early + late, target_tokens=TARGETS, raw=True))
    assert result.compared == 4
    for effect in result.neurons[:3]:
        assert effect.noising == 0.0 and effect.denoising == 0.0 and effect.predicted == 0.0
        assert effect.clean_activation == effect.corrupt_activation
    late_only = result.neurons[3:]
    assert result.rank_correlation == pytest.approx(
        rank_correlation([e.predicted for e in late_only], [e.noising for e in late_only]))


def test_rank_correlation():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share the average rank: x ranks 1,2.5,2.5,4; y ranks 1..4 -> rho = 0.9486...
    assert rank_correlation([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(rank_correlation([1, 2], [2, 1]))
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))
    assert rank_correlation([1, float("nan"), 2, 3], [5, 0, 6, 7]) == pytest.approx(1.0)


def test_bad_input(setup):
    _, patcher = setup
    with pytest.raises(InvalidArgument, match="same length"):
        patcher.run(PatchRequest(clean=CLEAN, corrupt="the capital of the big city is", target_tokens=TARGETS, raw=True))
    with pytest.raises(InvalidArgument, match="out of range"):
        patcher.run(PatchRequest(clean=CLEAN, corrupt=CORRUPT, neurons=(PatchNeuron(layer=9, index=0),), target_tokens=TARGETS, raw=True))
    with pytest.raises(InvalidArgument, match="outside the prompt"):
        patcher.run(PatchRequest(clean=CLEAN, corrupt=CORRUPT, neurons=(PatchNeuron(layer=1, index=0, position=40),),
                                 target_tokens=TARGETS, raw=True))
    with pytest.raises(InvalidArgument, match="same token"):
        patcher.run(PatchRequest(clean=CLEAN, corrupt=CORRUPT, target_tokens=("paris", "paris"), raw=True))
    with pytest.raises(InvalidArgument, match="not a single token"):
        patcher.run(PatchRequest(clean=CLEAN, corrupt=CORRUPT, target_tokens=("paris london",), raw=True))
    with pytest.raises(InvalidArgument, match="nothing to patch"):
        patcher.run(PatchRequest(clean=CLEAN, corrupt=CLEAN, raw=True))
    logits = torch.zeros(97, dtype=torch.float64)
    logits[9] = 1.0
    request = PatchRequest(clean=CLEAN, corrupt=CORRUPT, raw=True)
    with pytest.raises(InvalidArgument, match="--target-tokens"):  # both prompts predict the same token
        patcher._metric_tokens(patcher._attributor(request), request, logits, logits.clone())
    with pytest.raises(InvalidArgument, match="expected LAYER:INDEX"):
        parse_patch_neuron("3-4")
    with pytest.raises(InvalidArgument, match="empty"):
        PatchRequest(clean=" ", corrupt=CORRUPT)
    with pytest.raises(InvalidArgument, match="top"):
        PatchRequest(clean=CLEAN, corrupt=CORRUPT, top=0)
    with pytest.raises(InvalidArgument, match="top"):
        PatchRequest(clean=CLEAN, corrupt=CORRUPT, top=2**31 - 1)
    with pytest.raises(InvalidArgument, match="limit"):
        PatchRequest(clean=CLEAN, corrupt=CORRUPT, neurons=tuple(PatchNeuron(layer=0, index=i) for i in range(2001)))
    with pytest.raises(InvalidArgument, match="twice"):
        PatchRequest(clean=CLEAN, corrupt=CORRUPT, neurons=(PatchNeuron(layer=1, index=2),) * 2)
    assert parse_patch_neuron("12:345:-1") == PatchNeuron(layer=12, index=345, position=-1)
    assert parse_patch_neuron("12:345").describe() == "12:345"


@pytest.fixture(scope="module")
def patch_server(tokenizer):
    from circuits_attribution import RelPAttributor, RelPConfig
    from circuits_attribution.server import AttributionSettings, build_server
    from circuits_server.serving import ServerSettings

    engine = RelPAttributor(build_model("llama", seed=5), tokenizer, RelPConfig(raw=True, model_name="tiny"))
    server = build_server(AttributionSettings(server=ServerSettings(port=0), model="tiny"), engine).start()
    try:
        yield server.address
    finally:
        server.stop(0.5)


def test_patch_rpc_matches_in_process(patch_server, setup):
    from circuits_core import wire
    from circuits_sdk.attribution import AttributionClient

    _, patcher = setup
    request = PatchRequest(clean=CLEAN, corrupt=CORRUPT, top=6, target_tokens=TARGETS, raw=True,
                           neurons=(PatchNeuron(layer=2, index=3), PatchNeuron(layer=1, index=4, position=-1)))
    assert wire.patch_request_from_proto(wire.patch_request_to_proto(request)) == request
    with AttributionClient(patch_server, timeout=60) as client:
        remote = client.patch(request)
    local = patcher.run(request)
    assert remote.metric == local.metric and remote.clean_tokens == local.clean_tokens
    for a, b in zip(remote.neurons, local.neurons):
        assert (a.layer, a.index, a.position) == (b.layer, b.index, b.position)
        for name in ("relp", "predicted", "noising", "denoising"):
            assert getattr(a, name) == pytest.approx(getattr(b, name), abs=1e-9)
    assert remote.set_noising == pytest.approx(local.set_noising, abs=1e-9)
    with AttributionClient(patch_server, timeout=60) as client:
        with pytest.raises(InvalidArgument, match="same length"):
            client.patch(PatchRequest(clean=CLEAN, corrupt="a b c d e f g h", target_tokens=TARGETS, raw=True))
    from circuits_core._proto.circuits.v1 import attribution_pb2, attribution_pb2_grpc

    with grpc.insecure_channel(patch_server) as channel:
        stub = attribution_pb2_grpc.AttributionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Patch(attribution_pb2.PatchRequest(clean_prompt="", corrupt_prompt="x"), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cli(tiny_model_dir, tokenizer, make_attributor, tmp_path, capsys):
    import json

    from circuits.cli import main as cli_main

    common = ["patch", "--model", str(tiny_model_dir), "--dtype", "float64", "--raw", "--clean", CLEAN, "--corrupt", CORRUPT]
    out = tmp_path / "patch.json"
    assert cli_main([*common, "--target-tokens", *TARGETS, "--top", "6", "--json", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "metric m = logit('paris') - logit('london')" in shown and "rank correlation" in shown
    data = json.loads(out.read_text())
    assert len(data["neurons"]) == 6 and data["positive_token"] == "paris"
    graph_path = make_attributor("llama", tau=0.0).trace(CLEAN).save(tmp_path / "clean.json")
    assert cli_main([*common, "--target-tokens", *TARGETS, "--graph", str(graph_path), "--top", "4", "--show", "2"]) == 0
    shown = capsys.readouterr().out
    assert "4 neurons patched" in shown and "2 more" in shown
    other_graph = make_attributor("llama", tau=0.0).trace(CORRUPT).save(tmp_path / "corrupt.json")
    for argv, message in (
        ([*common, "--graph", str(other_graph)], "not the --clean prompt"),
        ([*common, "--graph", str(graph_path), "--neurons", "1:2"], "cannot be combined"),
        ([c for c in common if c != "--raw"] + ["--graph", str(graph_path)], "traced with --raw"),
        ([*common, "--neurons", "1:x"], "expected LAYER:INDEX"),
        ([*common, "--top", "0"], "--top"),
        ([*common, "--graph", str(tmp_path / "missing.json")], "no such file"),
        (["patch", "--model", str(tiny_model_dir), "--raw", "--clean", CLEAN, "--corrupt", "the big red city is here now",
          "--target-tokens", *TARGETS], "same length"),
        (["patch", "--model", str(tiny_model_dir), "--raw", "--clean", CLEAN, "--corrupt", CORRUPT, "--neurons", "7:1"],
         "out of range"),
    ):
        assert cli_main(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading weights")]
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err

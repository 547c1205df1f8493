"""Neuron interventions on the real model: exactness against an independent reference, clear
errors for bad ids, no leaking hooks, and the on-disk cache of neuron means."""

from __future__ import annotations

import contextlib

import pytest
import torch

from circuits_core.errors import InvalidArgument
from circuits_core.interventions import NeuronIntervention, parse_neuron_spec

from circuits_attribution.testing import PROMPT, build_model

IDS = [1, 5, 6, 7, 8, 9, 10]  # "<bos> the capital of france is paris" in the fixture tokenizer


# ------------------------------------------------------------------------------ reference
@contextlib.contextmanager
def reference_mlp_patch(model, changes, *, prompt_length, means=None, offset_box=None):
    """Independent reference: replace whole MLP forwards by an explicit re-implementation
    ``down(act(gate(x)) * up(x))`` that edits h in place. ``changes``: list of
    (layer, index, mode, value, absolute positions or None for every prompt position, include_generated).
    ``offset_box`` ([int]) gives the absolute position of the first token (KV-cached decoding)."""
    saved = []
    for layer_index, layer in enumerate(model.model.layers):
        mine = [c for c in changes if c[0] == layer_index]
        if not mine:
            continue
        mlp = layer.mlp

        def forward(x, mlp=mlp, mine=mine, layer_index=layer_index):
            h = mlp.act_fn(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
            h = h.clone()
            offset = offset_box[0] if offset_box else 0
            for t in range(h.shape[1]):
                absolute = offset + t
                for _, index, mode, value, positions, include_generated in mine:
                    hit = (absolute < prompt_length) if positions is None else (absolute in positions)
                    hit = hit or (include_generated and absolute >= prompt_length)
                    if not hit:
                        continue
                    if mode == "zero":
                        h[:, t, index] = 0.0
                    elif mode == "set":
                        h[:, t, index] = value
                    elif mode == "scale":
                        h[:, t, index] = h[:, t, index] * value
                    elif mode == "mean":
                        h[:, t, index] = means[layer_index, index]
            return h @ mlp.down_proj.weight.T

        saved.append(mlp)
        mlp.forward = forward
    try:
        yield
    finally:
        for mlp in saved:
            del mlp.forward


def reference_logits(model, ids, changes, means=None):
    with torch.no_grad(), reference_mlp_patch(model, changes, prompt_length=len(ids), means=means):
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


def reference_generate(model, ids, changes, n, means=None):
    """Greedy decoding without a KV cache: a full forward per step (positions are absolute)."""
    seq = list(ids)
    with torch.no_grad(), reference_mlp_patch(model, changes, prompt_length=len(ids), means=means):
        for _ in range(n):
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            seq.append(int(logits.argmax()))
            if seq[-1] == 4:  # eos of the fixture config
                break
    return seq[len(ids):]


@pytest.fixture
def intervener(make_model, tokenizer):
    from circuits_attribution.interventions import Intervener

    model = make_model("llama")
    means = torch.randn(4, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return Intervener(model, tokenizer, model_name="tiny-llama", means=means)


# ------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("12:345=zero", NeuronIntervention(layer=12, index=345, mode="zero")),
        ("3:17:4,5=set:1.5", NeuronIntervention(layer=3, index=17, mode="set", value=1.5, positions=(4, 5))),
        ("20:9:-1=scale:2", NeuronIntervention(layer=20, index=9, mode="scale", value=2.0, positions=(-1,))),
        ("7:100:all=mean", NeuronIntervention(layer=7, index=100, mode="mean", include_generated=True)),
        ("7:100:prompt=mean", NeuronIntervention(layer=7, index=100, mode="mean")),
        ("1:2:0,generated=set:-3", NeuronIntervention(layer=1, index=2, mode="set", value=-3.0, positions=(0,),
                                                      include_generated=True)),
    ],
)
def test_parse_neuron_spec_round_trips(spec, expected):
    parsed = parse_neuron_spec(spec)
    assert parsed == expected
    assert parse_neuron_spec(parsed.describe()) == parsed


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("12-345=zero", "expected LAYER:INDEX"),
        ("1:2=boom", "bad mode"),
        ("1:2=scale:x", "bad scale value"),
        ("1:2=zero:3", "takes no value"),
        ("1:2:a,b=zero", "bad positions"),
        ("1:2=set:nan", "finite"),
    ],
)
def test_parse_neuron_spec_errors_are_clear(spec, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        parse_neuron_spec(spec)


# ------------------------------------------------------------------------------ exactness
CASES = [
    [("3:5=set:3.5", (3, 5, "set", 3.5, None, False))],
    [("1:40:2,-1=scale:-2", (1, 40, "scale", -2.0, (2, 6), False))],
    [("0:7:0,3=zero", (0, 7, "zero", 0.0, (0, 3), False)), ("2:90=zero", (2, 90, "zero", 0.0, None, False))],
    [("2:11:-2=mean", (2, 11, "mean", 0.0, (5,), False))],
    # two changes of one neuron apply in order: scale then set at one position, scale elsewhere
    [("1:3=scale:4", (1, 3, "scale", 4.0, None, False)), ("1:3:4=set:-1", (1, 3, "set", -1.0, (4,), False))],
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: " ".join(s for s, _ in c))
def test_intervened_logits_match_independent_reference(intervener, case):
    interventions = [parse_neuron_spec(spec) for spec, _ in case]
    changes = [change for _, change in case]
    got = intervener.logits(IDS, interventions)
    want = reference_logits(intervener.model, IDS, changes, means=intervener.means())
    clean = intervener.logits(IDS)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert (got - clean).abs().max() > 1e-6  # the intervention did something


def test_run_reports_baseline_and_intervened_top_tokens(intervener):
    interventions = [parse_neuron_spec("3:5=set:6"), parse_neuron_spec("2:20:-1=scale:-3")]
    result = intervener.run(None, interventions, input_ids=IDS, top_k=4)
    clean = torch.softmax(intervener.logits(IDS)[-1], -1)
    new = torch.softmax(reference_logits(intervener.model, IDS, [(3, 5, "set", 6.0, None, False),
                                                                  (2, 20, "scale", -3.0, (6,), False)])[-1], -1)
    assert result.position == len(IDS) - 1
    assert [t.token_id for t in result.baseline] == clean.topk(4).indices.tolist()
    assert [t.token_id for t in result.intervened] == new.topk(4).indices.tolist()
    for entry in result.tracked:
        assert entry.probability == pytest.approx(float(new[entry.token_id]), abs=1e-12)
    assert result.baseline[0].probability == pytest.approx(float(clean.max()), abs=1e-12)


@pytest.mark.parametrize("include_generated", [False, True])
def test_steered_generation_matches_uncached_reference(intervener, include_generated):
    spec = "3:5:all=set:8" if include_generated else "3:5=set:8"
    interventions = [parse_neuron_spec(spec), parse_neuron_spec("2:33:-1=scale:5")]
    changes = [(3, 5, "set", 8.0, None, include_generated), (2, 33, "scale", 5.0, (6,), False)]
    n = 8
    got = intervener.generate(IDS, interventions, n)
    want = reference_generate(intervener.model, IDS, changes, n)
    assert got == want
    assert intervener.generate(IDS, (), n) == reference_generate(intervener.model, IDS, [], n)


def test_generation_on_generated_tokens_differs_from_prompt_only(intervener):
    # With the change also applied to generated tokens the continuation must differ from the
    # prompt-only one for a strong enough intervention (this guards the 'all' code path).
    prompt_only = intervener.generate(IDS, [parse_neuron_spec("3:5=set:30")], 8)
    everywhere = intervener.generate(IDS, [parse_neuron_spec("3:5:all=set:30")], 8)
    assert prompt_only != everywhere


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("intervention", "fragment"),
    [
        (NeuronIntervention(layer=4, index=0), r"layer 4 is out of range \(model has layers 0..3\)"),
        (NeuronIntervention(layer=-1, index=0), "layer -1 is out of range"),
        (NeuronIntervention(layer=0, index=96), r"neuron index 96 is out of range \(layers have neurons 0..95\)"),
        (NeuronIntervention(layer=0, index=-2), "neuron index -2 is out of range"),
        (NeuronIntervention(layer=0, index=1, positions=(7,)), r"position 7 is outside the prompt \(7 tokens"),
        (NeuronIntervention(layer=0, index=1, positions=(-8,)), "position -8 is outside the prompt"),
    ],
)
def test_bad_neuron_ids_raise_invalid_argument(intervener, intervention, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        intervener.run(None, [intervention], input_ids=IDS)
    with pytest.raises(InvalidArgument, match=fragment):
        intervener.logits(IDS, [intervention])
    assert not _hooks_present(intervener.model)


def test_mean_mode_without_means_is_a_clear_error(make_model):
    from circuits_attribution.interventions import neuron_interventions

    with pytest.raises(InvalidArgument, match="mean ablation needs neuron means"):
        with neuron_interventions(make_model("llama"), [NeuronIntervention(layer=0, index=0, mode="mean")], prompt_length=3):
            pass


# ------------------------------------------------------------------------------ no leaks
def _hooks_present(model) -> bool:
    """Our hooks live on down_proj (transformers itself may keep output-capturing hooks elsewhere)."""
    return any(layer.mlp.down_proj._forward_pre_hooks or layer.mlp.down_proj._forward_hooks
               for layer in model.model.layers)


def test_interventions_never_leak_into_later_forwards_or_traces(tokenizer):
    from circuits_attribution import RelPAttributor, RelPConfig
    from circuits_attribution.interventions import Intervener, neuron_interventions

    model = build_model("llama", seed=11)
    fresh = build_model("llama", seed=11)
    intervener = Intervener(model, tokenizer, means=torch.ones(4, 96, dtype=torch.float64))
    specs = [parse_neuron_spec(s) for s in ("3:5:all=set:8", "1:2=mean", "0:0:1=scale:3")]
    intervener.run(None, specs, input_ids=IDS, generate_tokens=4)
    # an exception inside the context must still remove the hooks
    with pytest.raises(RuntimeError, match="boom"):
        with neuron_interventions(model, specs[:1], prompt_length=len(IDS)) as state:
            model(input_ids=torch.tensor([IDS]), use_cache=False)
            assert state.calls > 0
            raise RuntimeError("boom")
    assert not _hooks_present(model)
    with torch.no_grad():
        after = model(input_ids=torch.tensor([IDS]), use_cache=False).logits
        reference = fresh(input_ids=torch.tensor([IDS]), use_cache=False).logits
    assert torch.equal(after, reference)
    config = RelPConfig(raw=True, model_name="tiny-llama", tau=0.0)
    graph_after = RelPAttributor(model, tokenizer, config).trace(PROMPT, compute_edges=False)
    graph_fresh = RelPAttributor(fresh, tokenizer, config).trace(PROMPT, compute_edges=False)
    assert [(u.node_key, u.attribution) for u in graph_after.units] == [
        (u.node_key, u.attribution) for u in graph_fresh.units
    ]


# ------------------------------------------------------------------------------ means cache
def test_neuron_means_are_cached_on_disk_and_match_brute_force(tokenizer, tmp_path, monkeypatch):
    import circuits_attribution.interventions as iv

    monkeypatch.setenv("CIRCUITS_HOME", str(tmp_path))
    model = build_model("llama", seed=5)
    prompts = ("the capital of france is paris", "one two three four", "red green blue cat dog")
    means = iv.neuron_means(model, tokenizer, prompts=prompts, name="tiny")
    path = iv.means_cache_path(model, name="tiny", prompts=prompts)
    assert path.is_file() and path.parent == tmp_path / "means"

    # brute force: collect every token's h (skipping <bos>) with a forward hook on down_proj
    collected = {i: [] for i in range(4)}
    handles = [layer.mlp.down_proj.register_forward_hook(lambda m, inp, out, i=i: collected[i].append(inp[0][0, 1:]))
               for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for prompt in prompts:
                model(input_ids=torch.tensor([tokenizer(prompt)["input_ids"]]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    brute = torch.stack([torch.cat(collected[i]).mean(0) for i in range(4)])
    assert torch.allclose(means, brute, rtol=0, atol=1e-12)

    def fail(*args, **kwargs):
        raise AssertionError("means were recomputed instead of loaded from the cache")

    monkeypatch.setattr(iv, "compute_neuron_means", fail)
    assert torch.equal(iv.neuron_means(model, tokenizer, prompts=prompts, name="tiny"), means)
    other = build_model("llama", seed=6)
    assert iv.means_cache_path(other, name="tiny", prompts=prompts) != path
    assert iv.means_cache_path(model, name="tiny").name == f"{iv.model_fingerprint(model, name='tiny')}.pt"

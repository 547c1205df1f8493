"""Linearization: forward invariance (§J.1), layer-cut conservation (§J.3), clean restore."""

from __future__ import annotations

import copy

import pytest
import torch

from circuits_attribution.linearize import Linearization

ARCHS = ("llama", "qwen3", "olmo2", "olmo3")
IDS = [1, 5, 6, 7, 8, 9, 10]


def _embeds(model):
    return model.get_input_embeddings()(torch.tensor([IDS])).detach().requires_grad_(True)


def _capture_neurons(model):
    captured = {}
    handles = [
        layer.mlp.down_proj.register_forward_hook(lambda m, i, o, idx=idx: captured.__setitem__(idx, i[0].detach().clone()))
        for idx, layer in enumerate(model.model.layers)
    ]
    return captured, handles


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_forward_is_bit_identical(make_model, arch, dtype):
    model = copy.deepcopy(make_model(arch)).to(dtype)
    embeds = _embeds(model)
    plain_neurons, handles = _capture_neurons(model)
    plain = model(inputs_embeds=embeds, use_cache=False).logits
    for h in handles:
        h.remove()
    for rule, detach in (("relp", False), ("relp", True), ("stop_grad_gate", False), ("none", True)):
        with Linearization(model, mlp_rule=rule, detach_neurons=detach, record_residuals=True) as lin:
            logits = model(inputs_embeds=embeds, use_cache=False).logits
            assert torch.equal(logits, plain), (arch, dtype, rule)
            for idx, h in enumerate(lin.neurons):
                assert torch.equal(h[0].detach(), plain_neurons[idx][0]), (arch, dtype, rule, idx)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rule", ["relp", "stop_grad_gate"])
def test_layer_cut_conservation(make_model, arch, rule):
    """sum r^l * dm/dr^l = m for every layer; sum S^l = sum v*dm/dv = sum m_l*dm/dm_l."""
    model = make_model(arch)
    embeds = _embeds(model)
    with Linearization(model, mlp_rule=rule, record_residuals=True) as lin:
        logits = model(inputs_embeds=embeds, use_cache=False).logits[0, -1]
        m = logits.topk(3).values.sum() - logits[11]
        L = len(lin.neurons)
        tensors = [*lin.residuals, *lin.mlp_inputs, *lin.neurons, *lin.mlp_outputs]
        assert all(t is not None for t in tensors)
        grads = torch.autograd.grad(m, tensors)
    m = m.item()
    tol = 1e-10 * max(1.0, abs(m))
    residual_sums = [(r * g).sum().item() for r, g in zip(tensors[: L + 1], grads[: L + 1])]
    for l, total in enumerate(residual_sums):
        assert total == pytest.approx(m, abs=tol), f"residual cut before layer {l}"
    for l in range(L):
        into_mlp = (tensors[L + 1 + l] * grads[L + 1 + l]).sum().item()
        at_neurons = (tensors[2 * L + 1 + l] * grads[2 * L + 1 + l]).sum().item()
        out_of_mlp = (tensors[3 * L + 1 + l] * grads[3 * L + 1 + l]).sum().item()
        assert at_neurons == pytest.approx(into_mlp, abs=tol), l
        assert out_of_mlp == pytest.approx(at_neurons, abs=tol), l
        # a layer that carries no relevance would make this test vacuous
        assert abs(at_neurons) > 1e-6


def test_without_half_rule_the_mlp_double_counts(make_model):
    """The half rule is what makes the MLP conserve: the plain product rule passes 2x (§A.2)."""
    from circuits_attribution import linearize

    model = make_model("llama")
    embeds = _embeds(model)
    with Linearization(model, mlp_rule="relp") as lin:
        logits = model(inputs_embeds=embeds, use_cache=False).logits[0, -1]
        g = torch.autograd.grad(logits[3], [lin.mlp_inputs[2], lin.neurons[2]])
        relp_in = (lin.mlp_inputs[2] * g[0]).sum().item()
        relp_at = (lin.neurons[2] * g[1]).sum().item()
    assert relp_in == pytest.approx(relp_at, rel=1e-10)
    assert linearize.MLP_RULES == ("relp", "stop_grad_gate", "none")


def test_patches_are_restored_even_on_error(make_model):
    model = make_model("olmo2")
    modules = list(model.modules())
    before = {id(m): ("forward" in m.__dict__, len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules}
    with pytest.raises(RuntimeError, match="boom"):
        with Linearization(model, detach_neurons=True, record_residuals=True):
            assert any("forward" in m.__dict__ for m in modules)
            raise RuntimeError("boom")
    after = {id(m): ("forward" in m.__dict__, len(m._forward_hooks), len(m._forward_pre_hooks)) for m in modules}
    assert before == after
    # every RMSNorm of OLMo (incl. post_feedforward_layernorm, q_norm, k_norm) is patched
    with Linearization(model):
        patched = {type(m).__name__ for m in modules if "forward" in m.__dict__}
        norms = [m for m in modules if type(m).__name__.endswith("RMSNorm")]
        assert all("forward" in m.__dict__ for m in norms) and len(norms) == 4 * 4 + 1
    assert "Olmo2RMSNorm" in patched


def test_frozen_norm_factor_is_w_times_rho(make_model):
    """The frozen factor y/x equals w * rho(x) of relp-spec §A.2 (up to HF's float32 rounding)."""
    model = make_model("llama")
    norm = model.model.layers[1].input_layernorm
    x = torch.randn(7, 64, dtype=torch.float64)
    y = norm(x)
    rho = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    assert torch.allclose(y / x, norm.weight * rho, rtol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "olmo3"])
def test_fused_attention_kernels_get_the_same_linearization(make_model, arch):
    """With sdpa the pattern is recomputed for the backward: forward stays bit-identical and the
    gradients match the eager model's (up to eager's float32 softmax)."""
    eager, sdpa = make_model(arch), make_model(arch, attn="sdpa")
    embeds = _embeds(eager)
    plain = sdpa(inputs_embeds=embeds, use_cache=False).logits
    grads = []
    for model in (eager, sdpa):
        with Linearization(model) as lin:
            logits = model(inputs_embeds=embeds, use_cache=False).logits
            if model is sdpa:
                assert torch.equal(logits, plain)
            m = logits[0, -1].topk(4).values.sum()
            grads.append(torch.autograd.grad(m, [embeds, *lin.neurons]))
            if model is sdpa:
                assert (embeds * grads[-1][0]).sum().item() == pytest.approx(m.item(), rel=1e-9)
    # eager rounds its softmax to float32, sdpa keeps float64: patterns agree to ~1e-8
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()

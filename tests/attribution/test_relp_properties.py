"""Exact properties of RelP nodes and edges on tiny float64 models (relp-spec §J.2, 4-7).

Ablations are evaluated on `LinearOracle` (conftest), an explicit re-implementation of the
linearized model that shares no code with the engine.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch


ARCHS = ("llama", "qwen3", "olmo2", "olmo3")
REL = 1e-9


def _close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= REL * max(1.0, abs(scale))


def _edge_dict(table) -> dict[tuple, tuple[float, float]]:
    return {
        (int(a), int(b), int(c), int(d), int(e), int(f)): (float(r), float(w))
        for a, b, c, d, e, f, r, w in zip(
            table.src_layer, table.src_index, table.src_position,
            table.tgt_layer, table.tgt_index, table.tgt_position, table.raw, table.flow,
        )
    }


# ------------------------------------------------------------------ §J.2 completeness
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["topk", "target_tokens", "contrastive", "direction"])
def test_completeness_embeddings(make_attributor, arch, mode):
    attributor = make_attributor(arch)
    ids = attributor.encode_prompt("the capital of france is paris")
    assert len(ids) == 7
    cfg = attributor.config
    direction = None
    if mode == "target_tokens":
        cfg = dataclasses.replace(cfg, target_tokens=("rome", "paris", "dog"))
    elif mode == "contrastive":
        cfg = dataclasses.replace(cfg, contrastive=("paris", "london"))
    elif mode == "direction":
        direction = torch.randn(97, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ns = attributor.node_scores(ids, cfg, direction=direction)
    total = ns.embedding_scores.sum().item()
    assert abs(ns.metric_value) > 1e-3
    assert _close(total, ns.metric_value, ns.metric_value), (total, ns.metric_value)
    # the metric is what the mode says
    logits = ns.logits
    expected = {
        "topk": lambda: logits.topk(5).values.sum(),
        "target_tokens": lambda: logits[[attributor.resolve_token(t) for t in ("rome", "paris", "dog")]].sum(),
        "contrastive": lambda: logits[attributor.resolve_token("paris")] - logits[attributor.resolve_token("london")],
        "direction": lambda: (logits * direction).sum(),
    }[mode]().item()
    assert _close(ns.metric_value, expected, expected)


@pytest.mark.parametrize("rule", ["relp", "stop_grad_gate"])
def test_layer_totals_equal_metric_for_both_rules(make_attributor, rule):
    """§J.8: relp and stop_grad_gate give the same metric and complete embedding totals, but
    different per-neuron splits."""
    relp = make_attributor("llama", mlp_rule="relp")
    other = make_attributor("llama", mlp_rule=rule)
    ids = relp.encode_prompt("the capital of france is paris")
    a, b = relp.node_scores(ids), other.node_scores(ids)
    assert _close(b.embedding_scores.sum().item(), b.metric_value, b.metric_value)
    assert a.metric_value == b.metric_value
    if rule != "relp":
        assert not torch.allclose(a.scores, b.scores)


# ------------------------------------------------------------------ §J.4 direct-edge completeness
@pytest.mark.parametrize("arch", ARCHS)
def test_direct_edge_completeness(make_attributor, all_neurons, arch):
    attributor = make_attributor(arch, tau=0.0, top_k_per_layer=5, edge_threshold=0.0)
    ids = attributor.encode_prompt("the capital of france is paris")
    ns = attributor.node_scores(ids)
    selection = attributor.select_nodes(ns)
    assert len(selection) == 20
    table = attributor.compute_edges(ns, selection, sources=all_neurons(ns))
    L = attributor.n_layers
    targets = [("logit", L, ns.target_position, t) for t in ns.metric.token_ids] + [
        ("neuron", int(l), int(p), int(i)) for l, p, i in zip(selection.layers, selection.positions, selection.indices)
    ]
    for kind, layer, pos, idx in targets:
        rows = (table.tgt_layer == layer) & (table.tgt_position == pos) & (table.tgt_index == idx)
        raw_sum, flow_sum = table.raw[rows].sum(), table.flow[rows].sum()
        if kind == "logit":
            value = ns.logits[idx].item()
            coef = dict(zip(ns.metric.token_ids, ns.metric.coefficients))[idx]
            relp = coef * value
        else:
            value = ns.activations[layer, pos, idx].item()
            relp = ns.scores[layer, pos, idx].item()
            assert not ((table.src_layer[rows] >= layer).any()), "same-or-higher layer source"
        assert (table.src_position[rows] <= pos).all()
        assert _close(raw_sum, value, value), (kind, layer, pos, idx, raw_sum, value)
        assert _close(flow_sum, relp, relp), (kind, layer, pos, idx, flow_sum, relp)


# ------------------------------------------------------------------ §J.5 ablation == attribution
@pytest.mark.parametrize("arch", ARCHS)
def test_node_ablation_equals_attribution(make_attributor, oracle_cls, arch):
    attributor = make_attributor(arch)
    ids = attributor.encode_prompt("the capital of france is paris")
    ns = attributor.node_scores(ids)
    oracle = oracle_cls(attributor.model, ids, ns.target_position)
    coefs = torch.tensor(ns.metric.coefficients, dtype=torch.float64)
    tok = list(ns.metric.token_ids)

    def metric(run):
        return (run.logits[tok] * coefs).sum().item()

    clean = metric(oracle.run())
    assert _close(clean, ns.metric_value, clean)
    flat = ns.scores.reshape(-1).abs()
    F = ns.scores.shape[-1]
    T = ns.scores.shape[1]
    picks = flat.topk(6).indices.tolist() + torch.randint(0, flat.numel(), (4,), generator=torch.Generator().manual_seed(1)).tolist()
    for flat_index in picks:
        l, rest = divmod(flat_index, T * F)
        p, i = divmod(rest, F)
        delta = metric(oracle.run(zero_neurons=[(l, p, i)])) - clean
        assert _close(delta, -ns.scores[l, p, i].item(), clean), (l, p, i)
    for p in range(T):
        delta = metric(oracle.run(zero_embeddings=[p])) - clean
        assert _close(delta, -ns.embedding_scores[p].item(), clean), p


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("effect", ["direct", "total"])
def test_edge_ablation_equals_attribution(make_attributor, oracle_cls, arch, effect):
    attributor = make_attributor(arch, tau=0.0, top_k_per_layer=4, edge_threshold=0.0, edge_effect=effect)
    ids = attributor.encode_prompt("the capital of france is paris")
    ns = attributor.node_scores(ids)
    selection = attributor.select_nodes(ns)
    edges = _edge_dict(attributor.compute_edges(ns, selection))
    oracle = oracle_cls(attributor.model, ids, ns.target_position)
    clean = oracle.run()
    L = attributor.n_layers
    nodes = list(zip(selection.layers.tolist(), selection.positions.tolist(), selection.indices.tolist()))
    targets = [(L, ns.target_position, t) for t in ns.metric.token_ids] + nodes
    checked = 0
    for tl, tp, ti in targets:
        def value(run):
            return run.logits[ti].item() if tl == L else run.neurons[tl][tp, ti].item()

        base = value(clean)
        for sl, sp, si in nodes:
            if not (sl < tl and sp <= tp):
                continue
            hold = range(sl + 1, tl) if effect == "direct" else ()
            expected = -(value(oracle.run(zero_neurons=[(sl, sp, si)], hold_layers=hold)) - base)
            got = edges.get((sl, si, sp, tl, ti, tp), (0.0, 0.0))[0]
            assert _close(got, expected, base), ((sl, sp, si), (tl, tp, ti), got, expected)
            checked += abs(expected) > 1e-8
        if effect == "direct":
            for p in range(tp + 1):
                hold = range(0, tl) if tl < L else range(0, L)
                expected = -(value(oracle.run(zero_embeddings=[p], hold_layers=hold)) - base)
                got = edges.get((-1, ids[p], p, tl, ti, tp), (0.0, 0.0))[0]
                assert _close(got, expected, base), ("E", p, (tl, tp, ti), got, expected)
    assert checked > 20  # the check must not be vacuous


# ------------------------------------------------------------------ §J.6 structural zeros
@pytest.mark.parametrize("arch", ["llama", "olmo3"])
def test_structural_zeros(make_attributor, oracle_cls, arch):
    attributor = make_attributor(arch, target_position=3, tau=0.0, top_k_per_layer=6, edge_threshold=0.0)
    ids = attributor.encode_prompt("the capital of france is paris")
    ns = attributor.node_scores(ids)
    assert ns.target_position == 3
    assert torch.count_nonzero(ns.scores[:, 4:, :]) == 0
    assert torch.count_nonzero(ns.embedding_scores[4:]) == 0
    assert torch.count_nonzero(ns.scores[:, :4, :]) > 0
    table = attributor.compute_edges(ns, attributor.select_nodes(ns))
    assert len(table) > 0
    assert (table.src_position <= table.tgt_position).all()
    assert (table.src_layer < table.tgt_layer).all()
    # model property (oracle): a later position or a same-layer neuron never moves h_t
    oracle = oracle_cls(attributor.model, ids, ns.target_position)
    clean = oracle.run()
    later = oracle.run(zero_neurons=[(1, 5, i) for i in range(96)])
    for layer in (2, 3):
        assert torch.equal(later.neurons[layer][:5], clean.neurons[layer][:5])
        assert not torch.equal(later.neurons[layer][5:], clean.neurons[layer][5:])
    same_layer = oracle.run(zero_neurons=[(2, 2, 7)])
    untouched = torch.ones(7, 96, dtype=torch.bool)
    untouched[2, 7] = False
    assert torch.equal(same_layer.neurons[2][untouched], clean.neurons[2][untouched])


# ------------------------------------------------------------------ §J.7 chunking invariance
@pytest.mark.parametrize("arch", ["llama", "olmo2"])
def test_chunking_invariance(make_attributor, arch):
    attributor = make_attributor(arch, tau=0.0, top_k_per_layer=8, edge_threshold=0.0)
    ids = attributor.encode_prompt("the capital of france is paris")
    ns = attributor.node_scores(ids)
    selection = attributor.select_nodes(ns)
    reference = _edge_dict(attributor.compute_edges(ns, selection, batched=False))
    assert len(reference) > 100
    for chunk in (1, 3, 16):
        got = _edge_dict(attributor.compute_edges(ns, selection, chunk_size=chunk))
        assert got.keys() == reference.keys(), chunk
        worst = max(abs(got[k][0] - reference[k][0]) + abs(got[k][1] - reference[k][1]) for k in got)
        assert worst <= 1e-13, (chunk, worst)


def test_detached_leaf_equals_zero_grad_hooks(make_attributor):
    """Direct edges via detached leaves equal total-effect backprop with MLP gradients zeroed."""
    from circuits_attribution.linearize import Linearization

    attributor = make_attributor("qwen3", tau=0.0, top_k_per_layer=6, edge_threshold=0.0)
    ids = attributor.encode_prompt("the capital of france is paris")
    ns = attributor.node_scores(ids)
    selection = attributor.select_nodes(ns)
    edges = _edge_dict(attributor.compute_edges(ns, selection))
    model = attributor.model
    embeds = model.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
    checked = 0
    with Linearization(model) as lin:
        model(inputs_embeds=embeds, use_cache=False)
        neurons = list(lin.neurons)
        for tl, tp, ti in zip(selection.layers.tolist(), selection.positions.tolist(), selection.indices.tolist()):
            for sl in range(tl):
                handles = [neurons[k].register_hook(torch.zeros_like) for k in range(sl + 1, tl)]
                (grad,) = torch.autograd.grad(neurons[tl][0, tp, ti], [neurons[sl]], retain_graph=True)
                for handle in handles:
                    handle.remove()
                mask = (selection.layers == sl) & (selection.positions <= tp)
                for sp, si in zip(selection.positions[mask].tolist(), selection.indices[mask].tolist()):
                    expected = (grad[0, sp, si] * neurons[sl][0, sp, si]).item()
                    got = edges.get((sl, si, sp, tl, ti, tp), (0.0, 0.0))[0]
                    assert abs(got - expected) <= 1e-12 * max(1.0, abs(expected))
                    checked += 1
    assert checked > 10


def test_flow_is_raw_scaled_by_target_relevance(make_attributor):
    attributor = make_attributor("llama", tau=0.0, top_k_per_layer=5)
    ids = attributor.encode_prompt("the capital of france is paris")
    ns = attributor.node_scores(ids)
    table = attributor.compute_edges(ns, attributor.select_nodes(ns))
    neuron_rows = np.flatnonzero(table.tgt_layer < attributor.n_layers)
    assert len(neuron_rows) > 0
    for row in neuron_rows[:50]:
        l, p, i = table.tgt_layer[row], table.tgt_position[row], table.tgt_index[row]
        h, s = ns.activations[l, p, i].item(), ns.scores[l, p, i].item()
        assert table.flow[row] == pytest.approx(table.raw[row] / h * s, rel=1e-12)


def test_edge_chunk_adapts_to_out_of_memory(make_attributor, monkeypatch):
    """Both edge passes (one prompt: _TapEdgePass; a batch: _EdgePass) halve their chunk on OOM."""
    attributor = make_attributor("llama", tau=0.0, top_k_per_layer=5, edge_threshold=0.0)
    ids = attributor.encode_prompt("the capital of france is paris")
    other = attributor.encode_prompt("the capital of italy")
    ns, ns2 = attributor.node_scores(ids), attributor.node_scores(other)
    selection, selection2 = attributor.select_nodes(ns), attributor.select_nodes(ns2)
    reference = _edge_dict(attributor.compute_edges(ns, selection, chunk_size=16))
    batch_reference = [_edge_dict(t) for t in attributor.compute_edges_batch([ns, ns2], [selection, selection2], chunk_size=16)]
    from circuits_attribution.attributor import _EdgePass, _TapEdgePass

    for cls in (_TapEdgePass, _EdgePass):
        original = cls.raw_edges

        def limited(self, start, stop, original=original):
            if stop - start > 4:  # more than 4 targets "do not fit"
                raise torch.OutOfMemoryError("simulated")
            return original(self, start, stop)

        monkeypatch.setattr(cls, "raw_edges", limited)
    got = _edge_dict(attributor.compute_edges(ns, selection, chunk_size=16))
    assert attributor.last_timings.edge_chunk_size == 4
    assert got.keys() == reference.keys()
    assert max(abs(got[k][0] - reference[k][0]) for k in got) <= 1e-13
    batch_got = [_edge_dict(t) for t in attributor.compute_edges_batch([ns, ns2], [selection, selection2], chunk_size=16)]
    assert attributor.last_timings.edge_chunk_size == 4
    for got, reference in zip(batch_got, batch_reference):
        assert got.keys() == reference.keys() and len(got) > 0
        assert max(abs(got[k][0] - reference[k][0]) for k in got) <= 1e-13


@pytest.mark.parametrize("dtype, rel", [("float32", 1e-4), ("bfloat16", 5e-2)])
def test_lower_precision_traces(make_model, tokenizer, dtype, rel):
    import copy

    from circuits_attribution import RelPAttributor, RelPConfig

    model = copy.deepcopy(make_model("qwen3"))
    attributor = RelPAttributor(model, tokenizer, RelPConfig(raw=True, dtype=dtype, tau=0.01))
    assert str(attributor.dtype) == f"torch.{dtype}"
    graph = attributor.trace("the capital of france is paris")
    assert graph.neurons and graph.edges
    embedding_total = sum(u.attribution for u in graph.units if u.kind == "embedding")
    m = graph.metadata.metric_value
    assert abs(embedding_total - m) <= rel * abs(m)


@pytest.mark.gpu
def test_cuda_matches_cpu(make_model, tokenizer):
    import copy

    from circuits_attribution import RelPAttributor, RelPConfig

    cpu = RelPAttributor(make_model("llama"), tokenizer, RelPConfig(raw=True, tau=0.01))
    gpu = RelPAttributor(copy.deepcopy(make_model("llama")), tokenizer, RelPConfig(raw=True, tau=0.01, device="cuda"))
    a, b = cpu.trace("the capital of france is paris"), gpu.trace("the capital of france is paris")
    assert [u.node_key for u in a.units] == [u.node_key for u in b.units]
    assert len(a.edges) == len(b.edges)

"""Weight-based connectivity against brute-force per-neuron loops on tiny float64 models of each
architecture: output and input projections through the models' own modules, weight-graph edges
with the polarity rules, output-projection similarity, and blocked top-k merges equal to global top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from circuits_attribution.connectivity import (
    input_projection_layer,
    output_projection_layer,
    similarity_layer,
    weight_graph_layer,
)

ARCHS = ("llama", "qwen3", "olmo2")


def direct_logit_effect(model, layer: int, neuron: int, *, final_norm: bool) -> torch.Tensor:
    """o_i through the modules: lm_head applied to down_proj of a one-hot neuron activation."""
    mlp = model.model.layers[layer].mlp
    one_hot = torch.zeros(mlp.down_proj.in_features, dtype=torch.float64)
    one_hot[neuron] = 1.0
    with torch.no_grad():
        out = mlp.down_proj(one_hot)  # [D]
        if final_norm:
            out = out * model.model.norm.weight
        return model.lm_head(out)  # [V]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("final_norm", [False, True])
def test_output_projection_matches_per_neuron_modules(make_model, arch, final_norm):
    model = make_model(arch)
    k = 7
    for layer in range(model.config.num_hidden_layers):
        proj = output_projection_layer(model, layer, top_k=k, include_final_norm=final_norm, neuron_block=5)
        for neuron in range(model.config.intermediate_size):
            full = direct_logit_effect(model, layer, neuron, final_norm=final_norm)
            top, bottom = torch.topk(full, k), torch.topk(-full, k)
            assert proj.top_ids[neuron].tolist() == top.indices.tolist()
            assert proj.bottom_ids[neuron].tolist() == bottom.indices.tolist()
            torch.testing.assert_close(proj.top_values[neuron], top.values, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(proj.bottom_values[neuron], -bottom.values, rtol=1e-12, atol=1e-12)
            assert proj.logit_effect[neuron].item() == pytest.approx(full.abs().max().item(), rel=1e-12)
            column = model.model.layers[layer].mlp.down_proj.weight[:, neuron]
            assert proj.output_norm[neuron].item() == pytest.approx(float(np.linalg.norm(column.numpy())), rel=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
def test_input_projection_matches_mlp_on_raw_embeddings(make_model, arch):
    """act(W_E W_gate^T) * (W_E W_up^T) is what layer l's MLP computes from raw embeddings: capture
    the down_proj input of mlp(embeddings) for the whole vocabulary and rank per neuron."""
    model = make_model(arch)
    k = 6
    vocab = model.config.vocab_size
    embeddings = model.get_input_embeddings()(torch.arange(vocab))  # [V, D]
    for layer_index, layer in enumerate(model.model.layers):
        captured = {}
        handle = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.__setitem__("h", a[0].clone()))
        try:
            with torch.no_grad():
                layer.mlp(embeddings)
        finally:
            handle.remove()
        h = captured["h"]  # [V, F]
        values, ids = input_projection_layer(model, layer_index, top_k=k, neuron_block=11)
        for neuron in range(h.shape[1]):
            column = h[:, neuron].tolist()
            expected = sorted(range(vocab), key=lambda v: -column[v])[:k]
            assert ids[neuron].tolist() == expected
            assert values[neuron].tolist() == pytest.approx([column[v] for v in expected], rel=1e-12, abs=1e-15)


def brute_force_weight_edges(model, target_layer: int, per_polarity: int) -> dict[int, dict[int, list[tuple]]]:
    """Per target neuron and polarity: [(strength, src_layer, src_neuron, c_up, c_gate)], from the
    modules (up_proj/gate_proj applied to down_proj of one-hot source activations), rules applied by hand."""
    layers = model.model.layers
    F = model.config.intermediate_size
    eye = torch.eye(F, dtype=torch.float64)
    out: dict[int, dict[int, list[tuple]]] = {}
    with torch.no_grad():
        columns = {l: layers[l].mlp.down_proj(eye) for l in range(target_layer)}  # [F_src, D]
        c_up = {l: layers[target_layer].mlp.up_proj(columns[l]) for l in columns}  # [F_src, F_tgt]
        c_gate = {l: layers[target_layer].mlp.gate_proj(columns[l]) for l in columns}
    for target in range(F):
        excite, inhibit = [], []
        for l in range(target_layer):
            for m in range(F):
                u, g = float(c_up[l][m, target]), float(c_gate[l][m, target])
                if u > 0 and g > 0:
                    excite.append((abs(u) + abs(g), l, m, u, g))
                elif u < 0 and g < 0:
                    inhibit.append((-(abs(u) + abs(g)), l, m, u, g))
        excite.sort(key=lambda e: -e[0])
        inhibit.sort(key=lambda e: e[0])
        out[target] = {1: excite[:per_polarity], -1: inhibit[:per_polarity]}
    return out


def edges_by_target(cols) -> dict[int, dict[int, list[tuple]]]:
    out: dict[int, dict[int, list[tuple]]] = {}
    for i in range(len(cols["strength"])):
        t, pol = int(cols["tgt_neuron"][i]), int(cols["polarity"][i])
        out.setdefault(t, {1: [], -1: []})[pol].append(
            (float(cols["strength"][i]), int(cols["src_layer"][i]), int(cols["src_neuron"][i]),
             float(cols["c_up"][i]), float(cols["c_gate"][i]))
        )
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_graph_matches_brute_force(make_model, arch):
    model = make_model(arch)
    k = 9
    for target_layer in range(model.config.num_hidden_layers):
        cols = weight_graph_layer(model, target_layer, per_polarity=k, neuron_block=13, block_memory_mb=1)
        if target_layer == 0:
            assert len(cols["strength"]) == 0
            continue
        assert (cols["tgt_layer"] == target_layer).all() and (cols["src_layer"] < target_layer).all()
        got = edges_by_target(cols)
        expected = brute_force_weight_edges(model, target_layer, k)
        for target, by_pol in expected.items():
            for pol in (1, -1):
                mine = got.get(target, {1: [], -1: []})[pol]
                ref = by_pol[pol]
                assert [(e[1], e[2]) for e in mine] == [(e[1], e[2]) for e in ref], (target_layer, target, pol)
                assert [e[0] for e in mine] == pytest.approx([e[0] for e in ref], rel=1e-12)
                assert [e[3] for e in mine] == pytest.approx([e[3] for e in ref], rel=1e-12)
                assert [e[4] for e in mine] == pytest.approx([e[4] for e in ref], rel=1e-12)


def test_polarity_rules_on_constructed_weights(make_model):
    """Hand-set weights: source 0 excites (both > 0), source 1 is mixed (dropped), source 2 inhibits
    (both < 0), every other source gives exactly 0 (no edge)."""
    model = make_model("llama", seed=3)
    import copy

    model = copy.deepcopy(model)
    D = model.config.hidden_size
    with torch.no_grad():
        down = model.model.layers[0].mlp.down_proj.weight
        down.zero_()
        down[0, 0], down[1, 1], down[2, 2] = 1.0, 1.0, 1.0
        up, gate = model.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.gate_proj.weight
        up.zero_()
        gate.zero_()
        up[4, :3] = torch.tensor([1.0, 1.0, -1.0])
        gate[4, :3] = torch.tensor([1.0, -1.0, -3.0])
    assert D >= 3
    cols = weight_graph_layer(model, 1, per_polarity=100)
    rows = [(int(cols["src_neuron"][i]), int(cols["polarity"][i]), float(cols["strength"][i]))
            for i in range(len(cols["strength"])) if cols["tgt_neuron"][i] == 4]
    assert rows == [(0, 1, 2.0), (2, -1, -4.0)]
    assert set(cols["tgt_neuron"].tolist()) == {4}


@pytest.mark.parametrize("arch", ARCHS)
def test_blocked_merge_equals_one_global_topk(make_model, arch):
    """Many small blocks (one source layer x 4 targets each) give exactly the one-block answer."""
    model = make_model(arch)
    last = model.config.num_hidden_layers - 1
    one = weight_graph_layer(model, last, per_polarity=20, neuron_block=10_000, block_memory_mb=10_000)
    many = weight_graph_layer(model, last, per_polarity=20, neuron_block=4, block_memory_mb=1)
    for name in one:
        np.testing.assert_array_equal(one[name], many[name], err_msg=name)
    # and the similarity top-k: tiny column groups vs one group
    a = similarity_layer(model, 1, k=5, neuron_block=10_000, block_memory_mb=10_000)
    b = similarity_layer(model, 1, k=5, neuron_block=3, block_memory_mb=1)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-12, err_msg=name)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("final_norm", [False, True])
def test_similarity_matches_cosine_of_full_projections(make_model, arch, final_norm):
    model = make_model(arch)
    L, F = model.config.num_hidden_layers, model.config.intermediate_size
    vectors = torch.stack([
        direct_logit_effect(model, layer, neuron, final_norm=final_norm) for layer in range(L) for neuron in range(F)
    ])  # [L*F, V]
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    cosine = unit @ unit.T
    k = 4
    layer = 2
    cols = similarity_layer(model, layer, k=k, include_final_norm=final_norm, neuron_block=7, block_memory_mb=1)
    got = {}
    for i in range(len(cols["similarity"])):
        a = int(cols["src_layer"][i]) * F + int(cols["src_neuron"][i])
        b = int(cols["tgt_layer"][i]) * F + int(cols["tgt_neuron"][i])
        assert a < b
        got[(a, b)] = float(cols["similarity"][i])
    expected = {}
    for q in range(layer * F, (layer + 1) * F):
        row = cosine[q].clone()
        row[q] = -2.0
        values, ids = torch.topk(row, k)
        for value, other in zip(values.tolist(), ids.tolist()):
            if value > 0:
                expected[(min(q, other), max(q, other))] = value
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12)

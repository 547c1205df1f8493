"""Faithfulness by ablation: in the linearized model ablation is exactly attribution (relp-spec
§J.5), set ablations agree with the independent frozen-constant oracle, the real-model masks
agree with an explicit reference, and graphs that do not fit the model fail clearly."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from circuits_core.errors import FailedPrecondition, InvalidArgument

from circuits_attribution.testing import PROMPT

TARGET_MODES = {
    "topk": {},
    "tokens": {"target_tokens": ("cat", "red")},
    "contrastive": {"contrastive": ("cat", "red")},
}


def _trace(make_attributor, arch="llama", **config):
    config.setdefault("tau", 0.0)
    config.setdefault("top_k_per_layer", 40)
    config.setdefault("max_nodes", 100_000)
    attributor = make_attributor(arch, **config)
    graph = attributor.trace(PROMPT, compute_edges=False)
    return attributor, graph


def _evaluator(attributor, graph, **kwargs):
    from circuits_attribution.faithfulness import AblationEvaluator, graph_target

    target = graph_target(graph, attributor)
    return AblationEvaluator(attributor.model, target, **kwargs), target


def _metric(logits_row, target):
    return float(sum(c * logits_row[t] for t, c in zip(target.token_ids, target.coefficients)))


# ------------------------------------------------------------------------------ linearized = attribution
@pytest.mark.parametrize("arch", ["llama", "olmo2"])
@pytest.mark.parametrize("mode", sorted(TARGET_MODES))
def test_linearized_single_node_ablation_changes_m_by_its_attribution(make_attributor, arch, mode):
    attributor, graph = _trace(make_attributor, arch, **TARGET_MODES[mode])
    evaluator, target = _evaluator(attributor, graph, mode="linearized")
    m = graph.metadata.metric_value
    nodes = sorted(graph.neurons, key=lambda u: -abs(u.attribution))[:12]
    masks = [evaluator.full()] + [evaluator.remove([(u.layer, u.position, u.index)]) for u in nodes]
    values, probs = evaluator.evaluate(masks)
    assert probs is None
    assert values[0] == pytest.approx(m, rel=1e-12)  # completeness: nothing ablated -> m
    scale = max(abs(m), 1.0)
    for unit, value in zip(nodes, values[1:]):
        assert abs((value - m) - (-unit.attribution)) <= 1e-9 * scale, unit.node_id
    # and for neurons the graph did not select (every neuron of one position)
    scores = attributor.node_scores(list(target.input_ids), dataclasses.replace(attributor.config, **TARGET_MODES[mode]))
    picks = [(l, 3, i) for l in range(4) for i in (0, 17, 95)]
    values, _ = evaluator.evaluate([evaluator.remove([p]) for p in picks])
    for (l, p, i), value in zip(picks, values):
        assert abs((value - m) + float(scores.scores[l, p, i])) <= 1e-9 * scale


def test_linearized_mean_ablation_of_one_node_is_linear_in_the_replacement(make_attributor):
    attributor, graph = _trace(make_attributor)
    means = torch.randn(4, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    evaluator, _ = _evaluator(attributor, graph, mode="linearized", ablation="mean", means=means)
    m = graph.metadata.metric_value
    for unit in sorted(graph.neurons, key=lambda u: -abs(u.attribution))[:6]:
        (value,), _ = evaluator.evaluate([evaluator.remove([(unit.layer, unit.position, unit.index)])])
        gradient = unit.attribution / unit.activation  # d~m/dh_v
        expected = m + (float(means[unit.layer, unit.index]) - unit.activation) * gradient
        assert value == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_linearized_set_ablations_match_frozen_constant_oracle(make_attributor, oracle_cls):
    from circuits_attribution.faithfulness import random_nodes, ranked_nodes

    attributor, graph = _trace(make_attributor, contrastive=("cat", "red"))
    evaluator, target = _evaluator(attributor, graph, mode="linearized", batch_size=3)
    oracle = oracle_cls(attributor.model, list(target.input_ids), target.target_position)
    T = len(target.input_ids)
    ranked = ranked_nodes(graph, n_layers=4, n_neurons=96, n_positions=T)
    sets = [
        ("keep", ranked[:5]), ("keep", ranked[:40]), ("keep", []),
        ("remove", ranked[:5]), ("remove", ranked[:60]),
        ("remove", random_nodes(50, seed=1, n_layers=4, n_positions=T, n_neurons=96)),
    ]
    masks = [evaluator.keep_only(nodes) if kind == "keep" else evaluator.remove(nodes) for kind, nodes in sets]
    values, _ = evaluator.evaluate(masks)
    for (kind, nodes), mask, value in zip(sets, masks, values):
        zeroed = [tuple(int(x) for x in (l, p, i)) for l, p, i in (~mask).nonzero().tolist()]
        run = oracle.run(zero_neurons=zeroed)
        expected = _metric(run.logits, target)
        assert value == pytest.approx(expected, rel=1e-9, abs=1e-9), (kind, len(nodes))
    # the sets are not trivial: removing 60 top nodes changes m a lot
    assert abs(values[4] - graph.metadata.metric_value) > 1e-3


# ------------------------------------------------------------------------------ real model
def test_real_mode_masks_match_explicit_reference(make_attributor):
    from circuits_attribution.faithfulness import random_nodes

    attributor, graph = _trace(make_attributor)
    means = torch.randn(4, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for ablation in ("zero", "mean"):
        evaluator, target = _evaluator(attributor, graph, mode="real", ablation=ablation, means=means, batch_size=2)
        T = len(target.input_ids)
        masks = [
            evaluator.full(), evaluator.empty(),
            evaluator.keep_only(random_nodes(30, seed=0, n_layers=4, n_positions=T, n_neurons=96)),
            evaluator.remove(random_nodes(200, seed=2, n_layers=4, n_positions=T, n_neurons=96)),
            evaluator.remove([(0, 0, 0)]),
        ]
        values, probs = evaluator.evaluate(masks, top_token=55)
        model = attributor.model
        for mask, value, prob in zip(masks, values, probs):
            saved = []
            for l, layer in enumerate(model.model.layers):
                mlp = layer.mlp

                def forward(x, mlp=mlp, l=l):
                    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
                    fill = means[l] if ablation == "mean" else torch.zeros(96, dtype=h.dtype)
                    h = torch.where(mask[l][None], h, fill)
                    return mlp.down_proj(h)

                mlp.forward = forward
                saved.append(mlp)
            try:
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([list(target.input_ids)]), use_cache=False).logits[0]
            finally:
                for mlp in saved:
                    del mlp.forward
            row = logits[target.target_position]
            assert value == pytest.approx(_metric(row, target), rel=1e-10, abs=1e-10)
            assert prob == pytest.approx(float(torch.softmax(row, -1)[55]), abs=1e-12)
        assert values[0] == pytest.approx(graph.metadata.metric_value, rel=1e-10)
        assert values[1] != pytest.approx(values[0])


def test_report_curve_structure_and_limits(make_attributor, tmp_path):
    from circuits_attribution.faithfulness import FaithfulnessConfig, faithfulness_report, format_table, plot_report

    attributor, graph = _trace(make_attributor)
    n_nodes = len(graph.neurons)
    report = faithfulness_report(
        attributor.model, attributor.tokenizer, graph, FaithfulnessConfig(sizes=(3, 10, 10_000), random_seeds=3)
    )
    assert [p.size for p in report.points] == [3, 10, n_nodes]
    assert report.m_full == pytest.approx(graph.metadata.metric_value, rel=1e-10)
    for point in report.points:
        assert point.faithfulness == pytest.approx((point.m_keep - report.m_empty) / (report.m_full - report.m_empty))
        assert point.removal_effect == pytest.approx((report.m_full - point.m_removed) / (report.m_full - report.m_empty))
        assert 0.0 <= point.p_top_removed <= 1.0 and point.random_faithfulness_std >= 0
    text = format_table(report)
    assert "faith" in text and str(n_nodes) in text
    plot_report(report, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = report.to_dict()
    assert data["points"][0]["size"] == 3 and math.isfinite(data["m_empty"])
    # linearized mode: keeping every neuron equals m, keeping none equals the embedding-only path
    lin = faithfulness_report(attributor.model, attributor.tokenizer, graph,
                              FaithfulnessConfig(sizes=(5,), random_seeds=2, mode="linearized"))
    assert lin.m_full == pytest.approx(graph.metadata.metric_value, rel=1e-10)
    assert lin.p_top_full is None and lin.points[0].p_top_removed is None


def test_protected_positions_are_never_ablated(make_attributor):
    from circuits_attribution.faithfulness import FaithfulnessConfig, faithfulness_report, random_nodes

    attributor, graph = _trace(make_attributor)
    evaluator, target = _evaluator(attributor, graph, mode="real", protect_positions=(0, 2))
    empty = evaluator.empty()
    assert empty[:, [0, 2]].all() and not empty[:, [1, 3, 4, 5, 6]].any()
    picks = random_nodes(300, seed=0, n_layers=4, n_positions=0, n_neurons=96, positions=[1, 3, 6])
    assert {p for _, p, _ in picks} == {1, 3, 6}
    report = faithfulness_report(attributor.model, attributor.tokenizer, graph,
                                 FaithfulnessConfig(sizes=(5,), random_seeds=2, protect_positions=(0,)))
    assert report.protect_positions == (0,)
    assert report.n_graph_nodes == sum(1 for u in graph.neurons if u.position != 0)
    with pytest.raises(InvalidArgument, match="outside the prompt"):
        _evaluator(attributor, graph, protect_positions=(7,))


def test_random_nodes_are_distinct_and_reproducible():
    from circuits_attribution.faithfulness import random_nodes

    a = random_nodes(100, seed=4, n_layers=4, n_positions=7, n_neurons=96)
    assert a == random_nodes(100, seed=4, n_layers=4, n_positions=7, n_neurons=96)
    assert len(set(a)) == 100 and a != random_nodes(100, seed=5, n_layers=4, n_positions=7, n_neurons=96)
    assert all(0 <= l < 4 and 0 <= p < 7 and 0 <= i < 96 for l, p, i in a)
    with pytest.raises(InvalidArgument):
        random_nodes(4 * 7 * 96 + 1, seed=0, n_layers=4, n_positions=7, n_neurons=96)


# ------------------------------------------------------------------------------ bad graphs
def test_graphs_that_do_not_fit_the_model_fail_clearly(make_attributor):
    from circuits_core.schemas import Unit
    from circuits_attribution.faithfulness import FaithfulnessConfig, faithfulness_report

    attributor, graph = _trace(make_attributor)
    model, tok = attributor.model, attributor.tokenizer
    wrong_tokens = dataclasses.replace(graph, prompt_tokens=graph.prompt_tokens[:-1])
    with pytest.raises(FailedPrecondition, match="does not match the graph"):
        faithfulness_report(model, tok, wrong_tokens)
    bad_unit = Unit(layer=9, index=3, position=1, kind="neuron", attribution=1.0, activation=1.0)
    with pytest.raises(FailedPrecondition, match="does not exist in this model"):
        faithfulness_report(model, tok, dataclasses.replace(graph, units=graph.units + (bad_unit,)))
    with pytest.raises(InvalidArgument, match="ablation must be one of"):
        FaithfulnessConfig(ablation="resample")
    with pytest.raises(InvalidArgument, match="sizes must be positive"):
        FaithfulnessConfig(sizes=(0,))
    assert np.isfinite(graph.metadata.metric_value)

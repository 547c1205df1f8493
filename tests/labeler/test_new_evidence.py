"""The new labeller evidence: logit links in late-layer pass-1 prompts, exemplars and the input
projection in pass-2 prompts, and the per-pass prompt token budgets."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from circuits_core.config import LabelingSection
from circuits_labeler.cache import AnswerCache
from circuits_labeler.engine import ProgressiveLabeler
from circuits_labeler.evidence import DuckDBEvidence, write_evidence_parquet
from circuits_labeler.projection import InputProjection
from circuits_labeler.prompts import (
    ExemplarLine, LayerBands, LinkedNeuron, NeuronContext, TokenEffect, estimate_tokens, fit_prompt,
)
from labeler_support import NEURONS, NUM_LAYERS, evidence_edges, evidence_units


def export_with_logits(tmp_path: Path) -> Path:
    export = write_evidence_parquet(tmp_path / "export", edges=evidence_edges(), units=evidence_units())
    late = NUM_LAYERS - 1
    pq.write_table(pa.table({
        "src_layer": pa.array([late, late, late, late, 0], pa.int32()),
        "src_neuron": pa.array([2, 2, 2, 5, 2], pa.int32()),
        "token_id": pa.array([11, 12, 13, 11, 11], pa.int64()),
        "token": [" Paris", " Rome", " the", " Paris", " Paris"],
        "count": pa.array([4, 2, 9, 1, 3], pa.int64()),
        "weight_sum": [2.0, -1.6, 0.9, 0.3, 0.6],
        "weight_abs_sum": [2.0, 1.6, 0.9, 0.3, 0.6],
    }), export / "logits.parquet")  # fmt: skip
    return export


def test_logit_links_are_read_ordered_and_shown_for_late_layers_only(tmp_path):
    evidence = DuckDBEvidence(export_with_logits(tmp_path))
    late = NUM_LAYERS - 1
    links = evidence.logit_links(late, limit=2)
    assert [(l.token, l.count, l.mean_weight) for l in links[2]] == [(" Rome", 2, -0.8), (" Paris", 4, 0.5)]
    assert set(links) == {2, 5}
    labeler = ProgressiveLabeler(
        settings=LabelingSection(min_effect=0.0, logit_links_in_prompt=3), evidence=evidence, projections=None,
        cache=AnswerCache(tmp_path / "cache.jsonl", fsync=False), backend_factory=lambda: None, num_layers=NUM_LAYERS,
    )
    assert LayerBands.for_model(NUM_LAYERS).band(late) == "late"
    late_prompt = labeler.build_prompt("output", (late, 2), ()).user
    assert "Logit links in attribution graphs" in late_prompt
    assert late_prompt.index('SUPPRESSES " Rome"') < late_prompt.index('PROMOTES " Paris"') < late_prompt.index('" the"')
    early_prompt = labeler.build_prompt("output", (0, 2), ()).user
    assert "Logit links" not in early_prompt  # only late layers get them


def test_prompts_are_cut_to_the_pass_budget():
    ctx = NeuronContext(
        layer=3, neuron=1, num_layers=4, band="mid",
        exemplars=tuple(ExemplarLine(text="some words " * 20 + f"[[tok{i}]]", activation=5.0 - i) for i in range(40)),
        upstream=tuple(LinkedNeuron(layer=1, neuron=i, weight=0.1, count=3, label=f"label {i} " * 5) for i in range(10)),
        input_tokens=tuple(TokenEffect(token=f"t{i}", weight=1.0) for i in range(10)),
        activation_note="max 5",
    )
    unlimited = fit_prompt("input", ctx, budget=0)
    assert unlimited.user.count("[[tok") == 40 and estimate_tokens(unlimited) > 2000
    for budget in (600, 1200, 2000):
        prompt = fit_prompt("input", ctx, budget=budget)
        assert estimate_tokens(prompt) <= budget
        assert "Task: input" in prompt.user and "[[tok0]]" in prompt.user  # the strongest evidence stays
    # Upstream neurons go before exemplars: at 2000 tokens every kept exemplar outranks dropped ones.
    mid = fit_prompt("input", ctx, budget=2000).user
    kept = [i for i in range(40) if f"[[tok{i}]]" in mid]
    assert kept == list(range(len(kept)))


def test_input_projection_matches_a_per_token_loop(tiny_model):
    proj = InputProjection(tiny_model, None, top_k=5)
    layer, neuron = 2, 3
    embed = tiny_model.get_input_embeddings().weight
    mlp = tiny_model.model.layers[layer].mlp
    drives = []
    for v in range(embed.shape[0]):  # noqa: the slow obvious way
        if v < 0:
            continue
        e = embed[v]
        g = torch.dot(e, mlp.gate_proj.weight[neuron])
        u = torch.dot(e, mlp.up_proj.weight[neuron])
        drives.append((float((torch.nn.functional.silu(g) * u).detach()), v))
    want = sorted(drives, reverse=True)[:5]
    got = proj(layer, neuron)
    assert [t.token_id for t in got] == [v for _, v in want]
    for t, (value, _) in zip(got, want):
        assert abs(t.weight - value) < 1e-5
    assert proj(NUM_LAYERS + 3, 0) == () and proj(0, NEURONS + 100) == ()

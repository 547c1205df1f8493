"""Node selection (relp-spec §J.10 / §D.1), target resolution and the Graph the engine builds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from circuits_core.errors import InvalidArgument
from circuits_core.schemas import Graph

PROMPT = "the capital of france is paris"
REPO = Path(__file__).resolve().parents[2]


def _schema():
    for candidate in (REPO / "schemas" / "neuronpedia-graph-schema.json",
                      Path("/work/shared/schemas/neuronpedia-graph-schema.json")):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    pytest.skip("neuronpedia graph schema not found")


def _synthetic_scores(attributor, metric_value: float):
    from circuits_attribution.attributor import Metric, NodeScores

    gen = torch.Generator().manual_seed(7)
    L, T, F = 4, 7, 96
    scores = torch.randn(L, T, F, dtype=torch.float64, generator=gen) * 0.3
    scores[1, 2, 3] = 9.0  # always-on neuron (1, 3): strong but must be dropped
    scores[1, 5, 3] = -8.0
    scores[2, 0, 0] = 1e-12  # numerically zero
    scores[3] = 0.0
    scores[3, 6, 40] = -3.0
    acts = torch.randn(L, T, F, dtype=torch.float64, generator=gen)
    return NodeScores(
        input_ids=[1] * T, target_position=T - 1,
        metric=Metric(token_ids=(5,), coefficients=(1.0,)), metric_value=metric_value,
        logits=torch.zeros(97, dtype=torch.float64), scores=scores, activations=acts,
        embedding_scores=torch.zeros(T, dtype=torch.float64),
    )


def _brute_force(ns, *, top_k, tau, always_on):
    L, T, F = ns.scores.shape
    kept = []
    for l in range(L):
        entries = [(abs(ns.scores[l, p, i].item()), p, i) for p in range(T) for i in range(F)]
        entries.sort(key=lambda e: -e[0])
        for value, p, i in entries[:top_k]:
            if value >= 1e-10 and value >= tau * abs(ns.metric_value) and (l, i) not in always_on:
                kept.append((value, l, p, i))
    kept.sort(key=lambda e: (-e[0], e[1], e[2], e[3]))
    return [(l, p, i) for _, l, p, i in kept]


@pytest.mark.parametrize("over", ["prune", "skip_edges"])
@pytest.mark.parametrize("tau, top_k, max_nodes", [(0.05, 5, 500), (0.0, 3, 500), (0.2, 500, 3), (0.0, 1, 4)])
def test_selection_rules_match_brute_force(make_attributor, tau, top_k, max_nodes, over):
    attributor = make_attributor("llama", tau=tau, top_k_per_layer=top_k, max_nodes=max_nodes,
                                 always_on_neurons=((1, 3),), over_max_nodes=over)
    ns = _synthetic_scores(attributor, metric_value=-4.0)
    sel = attributor.select_nodes(ns)
    got = list(zip(sel.layers.tolist(), sel.positions.tolist(), sel.indices.tolist()))
    candidates = _brute_force(ns, top_k=top_k, tau=tau, always_on={(1, 3)})
    # prune keeps the max_nodes largest |RelP| (the brute-force order), skip_edges keeps all
    expected = candidates[:max_nodes] if over == "prune" else candidates
    assert got == expected
    assert sel.n_candidates == len(candidates) and sel.pruned == len(candidates) - len(expected)
    assert (1, 2, 3) not in got and (1, 5, 3) not in got
    assert (2, 0, 0) not in got
    assert sel.nodes_exceeded == (over == "skip_edges" and len(candidates) > max_nodes)
    assert np.all(np.diff(np.abs(sel.scores)) <= 0)
    for (l, p, i), score, act in zip(got, sel.scores, sel.activations):
        assert score == ns.scores[l, p, i].item() and act == ns.activations[l, p, i].item()


def test_always_on_list_is_keyed_by_model():
    from circuits_attribution.attributor import always_on_neurons_for

    llama = always_on_neurons_for("meta-llama/Llama-3.1-8B-Instruct")
    assert len(llama) == 12 and (23, 306) in llama and (2, 4786) in llama
    assert always_on_neurons_for("Qwen/Qwen3-32B") == ()
    assert always_on_neurons_for("allenai/OLMo-2-1124-7B") == ()


def test_always_on_filter_can_be_disabled(make_attributor):
    on = make_attributor("llama", tau=0.0, top_k_per_layer=5, always_on_neurons=((1, 3),))
    off = make_attributor("llama", tau=0.0, top_k_per_layer=5, always_on_neurons=((1, 3),), filter_always_on=False)
    ns = _synthetic_scores(on, metric_value=1.0)
    assert len(off.select_nodes(ns)) == len(on.select_nodes(ns)) + 2


def test_nodes_exceeded_keeps_nodes_and_logit_edges_only(make_attributor):
    attributor = make_attributor("llama", tau=0.0, top_k_per_layer=4, max_nodes=5, over_max_nodes="skip_edges")
    graph = attributor.trace(PROMPT)
    assert graph.metadata.nodes_exceeded
    assert len(graph.neurons) == 16
    logit_layer = graph.logits[0].layer
    assert graph.edges and all(e.tgt_layer == logit_layer for e in graph.edges)
    legacy = graph.to_legacy()
    assert legacy["nodes_exceeded"] is True
    assert legacy["metadata"]["generation_settings"]["nodes_exceeded"] is True


def test_over_max_nodes_prunes_to_the_most_influential_and_keeps_their_exact_edges(make_attributor):
    """Default over max_nodes: the max_nodes neurons with the largest |RelP| and all their edges. A
    direct edge does not depend on which other neurons are selected, so the pruned graph's edges
    are exactly the uncapped graph's edges among the kept nodes."""
    full = make_attributor("llama", tau=0.0, top_k_per_layer=4, max_nodes=500).trace(PROMPT)
    pruned = make_attributor("llama", tau=0.0, top_k_per_layer=4, max_nodes=5).trace(PROMPT)
    assert len(full.neurons) == 16 and not full.metadata.nodes_exceeded
    by_influence = sorted(full.neurons, key=lambda u: -abs(u.attribution))
    assert {u.node_key for u in pruned.neurons} == {u.node_key for u in by_influence[:5]}
    assert not pruned.metadata.nodes_exceeded
    gs = pruned.metadata.extra["generation_settings"]
    assert gs["nodes_pruned"] == 11 and gs["n_candidate_nodes"] == 16 and gs["over_max_nodes"] == "prune"

    def edges(graph):
        logit_layer = graph.logits[0].layer  # one past the deepest neuron: differs between the graphs

        def key(node):
            return ("logit", node[1]) if node[0] == logit_layer else node

        return {(key(e.src_key), key(e.tgt_key)): e.weight for e in graph.edges}

    logit_layer = pruned.logits[0].layer
    kept = {("logit", u.index) if u.layer == logit_layer else u.node_key for u in pruned.units}
    expected = {pair: w for pair, w in edges(full).items() if pair[0] in kept and pair[1] in kept}
    got = edges(pruned)
    assert got.keys() == expected.keys() and any(t[0] != "logit" for _, t in got)  # neuron -> neuron edges too
    assert all(got[pair] == pytest.approx(expected[pair], rel=1e-9, abs=1e-12) for pair in got)


def test_trace_builds_a_valid_graph(make_attributor, tmp_path):
    import jsonschema

    attributor = make_attributor("olmo2", tau=0.01)
    graph = attributor.trace(PROMPT)
    T = len(graph.prompt_tokens)
    assert T == 7 and graph.prompt == PROMPT
    kinds = [u.kind for u in graph.units]
    assert kinds.count("embedding") == T and kinds.count("logit") == 5
    neurons = graph.neurons
    assert 0 < len(neurons) <= 500
    logit_layer = max(u.layer for u in neurons) + 1
    assert all(u.layer == logit_layer and u.position == T - 1 for u in graph.logits)
    assert sum(u.probability for u in graph.logits) <= 1.0
    assert all(abs(u.attribution) >= 0.01 * abs(graph.metadata.metric_value) for u in neurons)
    graph.unit_index()  # no duplicate keys
    keys = {u.node_key for u in graph.units}
    assert all(e.src_key in keys and e.tgt_key in keys for e in graph.edges)
    assert any(e.src_layer == -1 for e in graph.edges) and any(e.tgt_layer == logit_layer for e in graph.edges)
    assert all(e.raw_weight is not None for e in graph.edges)
    legacy = graph.to_legacy()
    jsonschema.validate(legacy, _schema())
    assert legacy["metadata"]["target_position"] == T - 1
    path = graph.save(tmp_path / "g.json")
    again = Graph.load(path)
    assert len(again.edges) == len(graph.edges) and len(again.units) == len(graph.units)
    # content id: same settings -> same id; other settings -> other id
    assert attributor.trace(PROMPT, compute_edges=False).graph_id == graph.graph_id
    other = make_attributor("olmo2", tau=0.02).trace(PROMPT, compute_edges=False)
    assert other.graph_id != graph.graph_id


def test_target_modes_and_errors(make_attributor):
    attributor = make_attributor("llama")
    graph = attributor.trace(PROMPT, contrastive=("paris", "london"), compute_edges=False)
    paris, london = graph.logits
    assert (paris.token, london.token) == ("paris", "london")
    assert paris.attribution + london.attribution == pytest.approx(graph.metadata.metric_value, rel=1e-12)
    assert graph.metadata.max_n_logits == 2
    graph = attributor.trace(PROMPT, target_tokens=["rome"], target_position=-2, compute_edges=False)
    assert [u.token for u in graph.logits] == ["rome"] and graph.metadata.target_position == 5
    # a multi-token target is traced by its first token, and the metadata says so
    graph = attributor.trace(PROMPT, target_tokens=["paris london"], compute_edges=False)
    assert [u.token for u in graph.logits] == ["paris"]
    (record,) = graph.metadata.extra["generation_settings"]["targets"]
    assert record["pieces"] == ["paris", "london"] and record["traced"] == "paris"
    with pytest.raises(InvalidArgument, match=r"2 target tokens cannot be traced .*'zebra' is not in the vocabulary.*'yak'"):
        attributor.trace(PROMPT, target_tokens=["zebra", "rome", "yak"])
    with pytest.raises(InvalidArgument, match="both trace the token 'paris'"):
        attributor.trace(PROMPT, contrastive=("paris", "paris london"))
    with pytest.raises(InvalidArgument, match="cannot be combined"):
        attributor.trace(PROMPT, target_tokens=["rome"], contrastive=("paris", "london"))
    with pytest.raises(InvalidArgument, match="empty"):
        attributor.trace("   ")
    with pytest.raises(InvalidArgument, match="outside the prompt"):
        attributor.trace(PROMPT, target_position=7)
    with pytest.raises(InvalidArgument, match="longer than the model's context"):
        attributor.trace(" ".join(["cat"] * 80))
    with pytest.raises(InvalidArgument, match="cannot be combined"):
        dataclasses.replace(attributor.config, target_tokens=("a",), contrastive=("b", "c"))


def test_chat_template_and_answer_prefix(make_attributor, tokenizer):
    attributor = make_attributor("llama", raw=False)
    ids = attributor.encode_prompt("the capital")
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "<|user|>", "the", "capital", "<|end|>", "<|assistant|>"]
    ids = attributor.encode_prompt("the capital", answer_prefix="paris is")
    assert tokenizer.convert_ids_to_tokens(ids)[-3:] == ["<|assistant|>", "paris", "is"]
    graph = attributor.trace("the capital", compute_edges=False)
    assert graph.prompt == "the capital" and graph.prompt_tokens[0] == "<bos>"

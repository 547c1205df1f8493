"""SmolLM2-135M-Instruct: the graph of "The capital of France is" is faithful by ablation.

Skipped when the converted model is not in the cache (`python -m circuits_attribution.prepare_model`).
About 20-30 s on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def smollm2():
    from circuits_attribution.models import SMOLLM2_NAME, is_prepared

    if not is_prepared(SMOLLM2_NAME):
        pytest.skip("SmolLM2 is not prepared (python -m circuits_attribution.prepare_model)")
    from circuits_attribution import load_model

    return load_model(SMOLLM2_NAME, dtype="float32")


def test_capital_of_france_graph_beats_random_and_its_removal_kills_paris(smollm2):
    from circuits_attribution import RelPAttributor, RelPConfig
    from circuits_attribution.faithfulness import FaithfulnessConfig, faithfulness_report
    from circuits_attribution.interventions import DEFAULT_MEAN_PROMPTS, compute_neuron_means

    model, tokenizer = smollm2.model, smollm2.tokenizer
    attributor = RelPAttributor(model, tokenizer, RelPConfig(raw=True, model_name=smollm2.name))
    graph = attributor.trace("The capital of France is", compute_edges=False)
    assert graph.logits[0].token == " Paris"
    means, _ = compute_neuron_means(model, tokenizer, DEFAULT_MEAN_PROMPTS)  # no disk cache in tests
    config = FaithfulnessConfig(ablation="mean", sizes=(10, 20, 50, 100), random_seeds=3)
    report = faithfulness_report(model, tokenizer, graph, config, means=means)

    assert report.top_token == " Paris" and report.p_top_full > 0.5
    for point in report.points:
        # keeping only the graph's top-N recovers more of m than N random neurons
        assert point.faithfulness > point.random_faithfulness_mean + 3 * point.random_faithfulness_std + 0.1, point
        # removing the graph's top-N destroys the prediction; removing N random neurons does not
        assert point.p_top_removed < 0.5 * report.p_top_full, point
        assert point.random_p_top_removed_mean > 0.8 * report.p_top_full, point
    # the hooks are gone: a plain forward still predicts Paris with the clean probability
    ids = torch.tensor([attributor.encode_prompt("The capital of France is", raw=True)])
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1)
    assert float(probs[report.top_token_id]) == pytest.approx(report.p_top_full, abs=1e-6)

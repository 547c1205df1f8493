"""RelP on the real SmolLM2-135M-Instruct (float32, CPU); skipped when the model cache is absent."""

from __future__ import annotations

import numpy as np
import pytest

from circuits_attribution.models import SMOLLM2_NAME, is_prepared

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(
        not is_prepared(),
        reason="SmolLM2 cache not prepared (run: python -m circuits_attribution.prepare_model)",
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    from circuits_attribution import load_model

    return load_model(SMOLLM2_NAME, dtype="float32", device="cpu")


def test_paris_graph_and_direct_edge_completeness(smollm2):
    from circuits_attribution import RelPAttributor, RelPConfig
    from circuits_attribution.attributor import Selection

    attributor = RelPAttributor(smollm2.model, smollm2.tokenizer, RelPConfig(raw=True, model_name=SMOLLM2_NAME))
    graph = attributor.trace("The capital of France is")
    tokens = [u.token for u in graph.logits]
    assert " Paris" in tokens
    paris = next(u for u in graph.logits if u.token == " Paris")
    assert paris.probability > 0.5
    assert 0 < len(graph.neurons) <= 500 and not graph.metadata.nodes_exceeded
    assert len(graph.edges) > 1000
    # graph edges into each logit: flows from the selected nodes only, a part of c_j * logit_j
    # Completeness needs every source: all neurons of all layers + embeddings.
    ids = attributor.encode_prompt("The capital of France is")
    ns = attributor.node_scores(ids)
    assert abs(ns.embedding_scores.sum().item() - ns.metric_value) <= 1e-4 * abs(ns.metric_value)
    L, T, F = ns.scores.shape
    layers, positions, indices = np.meshgrid(np.arange(L), np.arange(T), np.arange(F), indexing="ij")
    everything = Selection(
        layers=layers.ravel(), positions=positions.ravel(), indices=indices.ravel(),
        scores=ns.scores.reshape(-1).double().numpy(), activations=ns.activations.reshape(-1).double().numpy(),
        nodes_exceeded=False,
    )
    targets = attributor.select_nodes(ns)
    targets = Selection(
        layers=targets.layers[:12], positions=targets.positions[:12], indices=targets.indices[:12],
        scores=targets.scores[:12], activations=targets.activations[:12], nodes_exceeded=False,
    )
    table = attributor.compute_edges(ns, targets, sources=everything)
    checked = 0
    for token_id in ns.metric.token_ids:
        rows = (table.tgt_layer == L) & (table.tgt_index == token_id)
        value = ns.logits[token_id].item()
        assert abs(table.raw[rows].sum() - value) <= 2e-4 * max(1.0, abs(value)), token_id
        checked += 1
    for l, p, i in zip(targets.layers, targets.positions, targets.indices):
        rows = (table.tgt_layer == l) & (table.tgt_position == p) & (table.tgt_index == i)
        h = ns.activations[l, p, i].item()
        scale = max(1.0, np.abs(table.raw[rows]).sum())
        assert abs(table.raw[rows].sum() - h) <= 2e-5 * scale, (l, p, i, table.raw[rows].sum(), h)
        checked += 1
    assert checked == 5 + 12

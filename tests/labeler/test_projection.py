"""Output projections: blocked top-k equals brute force; an independent path through the model's
own modules (final norm + lm_head) ranks tokens identically; storage round-trips."""

from __future__ import annotations

import pytest
import torch

from circuits_labeler.projection import OutputProjections, compute_output_projections


def brute_force(model, layer: int, neuron: int, *, final_norm: bool) -> torch.Tensor:
    w_u = model.lm_head.weight.double()
    col = model.model.layers[layer].mlp.down_proj.weight[:, neuron].double()
    if final_norm:
        col = col * model.model.norm.weight.double()
    return w_u @ col  # [V]


@pytest.mark.parametrize("final_norm", [True, False])
def test_blocked_topk_matches_brute_force(tiny_model, final_norm):
    proj = compute_output_projections(tiny_model, top_k=6, block_size=3, include_final_norm=final_norm)
    n_layers = len(tiny_model.model.layers)
    n_neurons = tiny_model.model.layers[0].mlp.down_proj.weight.shape[1]
    assert len(proj) == n_layers * n_neurons and proj.num_layers == n_layers
    for layer in range(n_layers):
        for neuron in range(n_neurons):
            full = brute_force(tiny_model, layer, neuron, final_norm=final_norm)
            p = proj.get(layer, neuron)
            top = torch.topk(full, 6)
            bottom = torch.topk(-full, 6)
            assert [t.token_id for t in p.promotes] == top.indices.tolist()
            assert [t.token_id for t in p.suppresses] == bottom.indices.tolist()
            assert [t.weight for t in p.promotes] == pytest.approx(top.values.tolist(), rel=1e-4, abs=1e-7)
            assert [t.weight for t in p.suppresses] == pytest.approx((-bottom.values).tolist(), rel=1e-4, abs=1e-7)
            assert p.logit_effect == pytest.approx(full.abs().max().item(), rel=1e-4)
            col = tiny_model.model.layers[layer].mlp.down_proj.weight[:, neuron]
            assert p.output_norm == pytest.approx(col.norm().item(), rel=1e-5)


def test_model_modules_rank_tokens_identically(tiny_model):
    """lm_head(final_norm(W_down[:, i])) differs from the projection only by the positive RMS
    factor of the norm, so rankings agree and values are proportional."""
    proj = compute_output_projections(tiny_model, top_k=97)
    with torch.no_grad():
        for layer in (0, len(tiny_model.model.layers) - 1):
            for neuron in (0, 5):
                col = tiny_model.model.layers[layer].mlp.down_proj.weight[:, neuron].double()
                logits = tiny_model.lm_head.double()(tiny_model.model.norm.double()(col[None, None, :]))[0, 0]
                p = proj.get(layer, neuron)
                assert [t.token_id for t in p.promotes] == torch.argsort(logits, descending=True).tolist()
                ratio = logits[p.promotes[0].token_id] / p.promotes[0].weight
                assert ratio > 0
                for t in p.promotes[:10]:
                    assert logits[t.token_id].item() == pytest.approx(ratio.item() * t.weight, rel=1e-3)
    tiny_model.float()


def test_save_load_round_trip(tmp_path, tiny_model):
    proj = compute_output_projections(tiny_model, model_name="tiny", top_k=4)
    back = OutputProjections.load(proj.save(tmp_path / "p.parquet"))
    assert back.model == "tiny" and back.top_k == 4 and back.num_layers == proj.num_layers
    assert back.include_final_norm is True
    a, b = proj.get(2, 3), back.get(2, 3)
    assert [t.token_id for t in a.promotes] == [t.token_id for t in b.promotes]
    assert [t.token for t in b.suppresses] == [f"<{t.token_id}>" for t in a.suppresses]
    assert b.promotes[0].weight == pytest.approx(a.promotes[0].weight, rel=1e-6)


def test_load_rejects_foreign_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from circuits_core.errors import CorruptInput, NotFound

    with pytest.raises(NotFound):
        OutputProjections.load(tmp_path / "missing.parquet")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(CorruptInput):
        OutputProjections.load(tmp_path / "other.parquet")


def test_projections_without_torch_are_a_clear_precondition_error(monkeypatch) -> None:
    """Where neither circuits-attribution nor transformers is installed (the labeler image), asking
    for computed projections says what is missing instead of raising ModuleNotFoundError."""
    import sys

    from circuits_core.errors import FailedPrecondition
    from circuits_labeler.projection import load_model_for_projections

    monkeypatch.setitem(sys.modules, "circuits_attribution.models", None)  # import -> ImportError
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(FailedPrecondition, match=r"needs torch and transformers.*compute_projections: false"):
        load_model_for_projections("HuggingFaceTB/SmolLM2-135M-Instruct")

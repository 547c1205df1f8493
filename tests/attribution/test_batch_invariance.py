"""Spec §J.7 (last part): node scores of a prompt are the same alone or inside a left-padded batch.

The engine traces one prompt at a time; this checks that its linearization is per-row exact when
the model runs a same-length batch with an attention mask (positions offset by the padding).
"""

from __future__ import annotations

import pytest
import torch

from circuits_attribution.linearize import Linearization


@pytest.mark.parametrize("arch", ["llama", "qwen3", "olmo2"])
def test_node_scores_alone_equal_scores_in_a_left_padded_batch(arch, make_attributor, tokenizer) -> None:
    attributor = make_attributor(arch, dtype="float64")
    model = attributor.model
    ids_a = tokenizer("the capital of france is paris", add_special_tokens=False)["input_ids"]
    ids_b = tokenizer("the dog is", add_special_tokens=False)["input_ids"]
    alone = [attributor.node_scores(ids) for ids in (ids_a, ids_b)]

    T = max(len(ids_a), len(ids_b))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [[pad] * (T - len(ids)) + list(ids) for ids in (ids_a, ids_b)]
    mask = torch.tensor([[0] * (T - len(ids)) + [1] * len(ids) for ids in (ids_a, ids_b)])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    input_ids = torch.tensor(rows)
    # A 2-D padding mask leaves the pad *query* rows with every key masked: eager softmax gives NaN
    # there, and 0 * NaN then poisons every row through the value products. This 4-D additive mask
    # is causal, hides pads from real tokens, and lets a pad row see only itself.
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    allowed = causal & (mask.bool()[:, None, :] | torch.eye(T, dtype=torch.bool)[None])
    attention = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    attention = attention[:, None, :, :]

    captured: list[torch.Tensor] = []

    def keep(_module, args):
        args[0].retain_grad()
        captured.append(args[0])

    hooks = [layer.mlp.down_proj.register_forward_pre_hook(keep) for layer in model.model.layers]
    try:
        with Linearization(model):
            embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, attention_mask=attention, position_ids=positions, use_cache=False).logits
            last = logits[:, -1, :]
            # one scalar over the batch: rows do not interact, so each row gets its own gradient
            metric = sum(last[b].topk(5).values.sum() for b in range(2))
            metric.backward()
    finally:
        for hook in hooks:
            hook.remove()

    assert len(captured) == len(model.model.layers)
    batched = torch.stack([h.detach() * h.grad for h in captured], dim=0)  # [L, B, T, F]
    for b, (ids, single) in enumerate(zip((ids_a, ids_b), alone)):
        offset = T - len(ids)
        row = batched[:, b, offset:, :]
        assert row.shape == single.scores.shape
        scale = single.scores.abs().max().item()
        assert torch.allclose(row, single.scores.to(row.dtype), rtol=0, atol=1e-9 * scale), (
            (row - single.scores).abs().max().item()
        )
        # and the per-row metric is the one the single run traced
        assert last[b].topk(5).values.sum().item() == pytest.approx(single.metric_value, rel=1e-12)

"""Fixtures for `circuits analyze` tests: a tiny random Llama checkpoint with an offline
word-level chat tokenizer (built in milliseconds, no hub), synthetic graphs, the graph schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORDS = (
    "the capital of france is paris london rome city country language spoken in germany berlin "
    "a b c d e f g h i j k l m n o p one two three four five red green blue cat dog sun moon"
).split()


def schema_path() -> Path | None:
    """The Neuronpedia graph schema: repo copy first, then ../shared/schemas."""
    for candidate in (REPO / "schemas" / "neuronpedia-graph-schema.json",
                      REPO.parent / "shared" / "schemas" / "neuronpedia-graph-schema.json"):
        if candidate.is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def graph_schema() -> dict:
    path = schema_path()
    if path is None:
        pytest.skip("neuronpedia-graph-schema.json not found under schemas/ or ../shared/schemas")
    return json.loads(path.read_text())


def _tokenizer():
    from circuits_attribution.testing import build_tokenizer

    return build_tokenizer(words=WORDS, vocab_size=None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved random 3-layer Llama (hidden 32, F=48) + tokenizer, loadable with --model DIR."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = _tokenizer()
    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=len(tok), max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|end|>"),
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init so that many neurons matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out

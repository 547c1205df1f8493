"""Fixtures for the labeler tests: a tiny random Llama, a small evidence set, the stand-in LLM."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from circuits_core.config import Config, config_from_mapping
from circuits_labeler.evidence import write_evidence_parquet
from circuits_labeler.testing import StandInLLMServer
from labeler_support import NEURONS, NUM_LAYERS, SECRET_KEY, evidence_edges, evidence_units  # noqa: F401

@pytest.fixture(scope="session")
def tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=NEURONS, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # make the final norm weight non-trivial so folding it in matters
        model.model.norm.weight.uniform_(0.5, 2.0)
    return model


@pytest.fixture()
def evidence_dir(tmp_path: Path) -> Path:
    return write_evidence_parquet(tmp_path / "export", edges=evidence_edges(), units=evidence_units())


@pytest.fixture()
def projections_path(tmp_path: Path, tiny_model) -> Path:
    from circuits_labeler.projection import compute_output_projections

    return compute_output_projections(tiny_model, model_name="tiny", top_k=5).save(tmp_path / "proj.parquet")


@pytest.fixture()
def standin() -> Iterator[StandInLLMServer]:
    with StandInLLMServer() as server:
        yield server


@pytest.fixture()
def make_config(tmp_path: Path, evidence_dir: Path, projections_path: Path) -> Callable[..., Config]:
    """Config for a run against a stand-in server; keyword overrides go into `labeling`."""
    key_file = tmp_path / "api_key"
    key_file.write_text(SECRET_KEY + "\n")

    def make(server: StandInLLMServer, **labeling) -> Config:
        backend = labeling.get("backend", "anthropic")
        section = {
            "backend": backend,
            "model": "stand-in-model",
            "base_url": server.base_url if backend == "anthropic" else server.openai_base_url,
            "api_key_file": str(key_file),
            "evidence_path": str(evidence_dir),
            "projections_path": str(projections_path),
            "compute_projections": False,
            "cache_path": "cache.jsonl",
            "labels_path": "labels.jsonl",
            "min_effect": 0.0,
            "concurrency": 4,
            "retry_base_delay": 0.01,
            "retry_max_delay": 0.05,
            "request_timeout": 5.0,
            "cache_fsync": False,
        }
        section.update(labeling)
        return config_from_mapping({"labeling": section}, base_dir=str(tmp_path))

    return make

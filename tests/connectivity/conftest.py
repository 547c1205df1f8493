"""Fixtures for the connectivity / diff / patching tests (tiny float64 models and the offline
tokenizer come from tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (float64) + the offline tokenizer saved as a local checkpoint directory."""
    from circuits_attribution.testing import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    build_model("llama", seed=11).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path

"""Pytest fixtures over :mod:`circuits_attribution.testing` (tiny models, tokenizer, oracle).

Test folders pull them in with ``from circuits_attribution.testing_fixtures import *``.
"""

from __future__ import annotations

import pytest

from circuits_attribution.testing import LinearOracle, all_neuron_selection, build_model, build_tokenizer

__all__ = ["all_neurons", "make_attributor", "make_model", "oracle_cls", "tokenizer"]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def make_model():
    cache: dict = {}

    def make(arch: str, **kwargs):
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = build_model(arch, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def oracle_cls():
    return LinearOracle


@pytest.fixture(scope="session")
def all_neurons():
    return all_neuron_selection


@pytest.fixture(scope="session")
def make_attributor(make_model, tokenizer):
    from circuits_attribution import RelPAttributor, RelPConfig

    def make(arch: str = "llama", **config):
        config.setdefault("raw", True)
        config.setdefault("model_name", f"tiny-{arch}")
        return RelPAttributor(make_model(arch), tokenizer, RelPConfig(**config))

    return make

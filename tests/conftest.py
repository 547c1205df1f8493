"""Test-wide settings (one thread on 2 shared cores, offline hub, no GPU assumptions) and the
shared engine fixtures: tiny random models, the offline tokenizer, the linear oracle
(:mod:`circuits_attribution.testing`, imported when a test asks for them)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch
    except ImportError:  # the SDK tests run without torch
        return
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# -- engine fixtures over circuits_attribution.testing (tiny models, tokenizer, oracle) ------------
@pytest.fixture(scope="session")
def tokenizer():
    from circuits_attribution.testing import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def make_model():
    from circuits_attribution.testing import build_model

    cache: dict = {}

    def make(arch: str, **kwargs):
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = build_model(arch, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def oracle_cls():
    from circuits_attribution.testing import LinearOracle

    return LinearOracle


@pytest.fixture(scope="session")
def all_neurons():
    from circuits_attribution.testing import all_neuron_selection

    return all_neuron_selection


@pytest.fixture(scope="session")
def make_attributor(make_model, tokenizer):
    from circuits_attribution import RelPAttributor, RelPConfig

    def make(arch: str = "llama", **config):
        config.setdefault("raw", True)
        config.setdefault("model_name", f"tiny-{arch}")
        return RelPAttributor(make_model(arch), tokenizer, RelPConfig(**config))

    return make

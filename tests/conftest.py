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


@pytest.fixture
def offloaded_llama(make_model, tokenizer, tmp_path):
    """``load(device_map) -> (single, mapped)``: the tiny float64 Llama saved under tmp_path, loaded
    on one device and split by ``device_map`` (layers on "cpu" / "disk": accelerate's hooks stream
    offloaded weights in, which stay on meta between uses; checked)."""
    import json

    from circuits_attribution import load_model
    from circuits_attribution.placement import is_dispatched

    make_model("llama").save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")

    def load(device_map: dict):
        single = load_model(str(tmp_path / "tiny"), dtype="float64")
        mapped = load_model(str(tmp_path / "tiny"), dtype="float64", device_map=json.dumps(device_map),
                            offload_folder=str(tmp_path / "offload"))  # fmt: skip
        assert is_dispatched(mapped.model)
        assert any(p.device.type == "meta" for p in mapped.model.parameters())  # really offloaded
        return single, mapped

    return load


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


# -- TLS ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict:
    """A throwaway CA (ca.pem) with a server certificate for localhost/127.0.0.1 (server.pem,
    server.key) and a client certificate (client.pem, client.key), made with openssl."""
    import subprocess

    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=circuits-test-ca")
    for name, cn in (("server", "localhost"), ("client", "circuits-client")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}

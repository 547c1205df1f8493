"""Fixtures of the neuron-scientist tests: a tiny Llama with a planted neuron (fires on "cat"
only), saved as a checkpoint; its exemplar file; an atlas holding the neuron; the scripted
stand-in LLM."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from scientist_support import DIM, FILLERS, LAYER, NEURON, PROBES, REPO, TOKEN  # noqa: F401


def _atlas_fixtures():
    spec = importlib.util.spec_from_file_location("atlas_fixtures", REPO / "tests" / "atlas" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """(model, tokenizer, checkpoint dir) of the tiny model with the planted neuron."""
    from circuits_attribution.testing import build_model, build_tokenizer, plant_token_neuron

    torch.set_num_threads(1)
    model = build_model("llama", dtype=torch.float32)
    tokenizer = build_tokenizer()
    plant_token_neuron(model, layer=LAYER, neuron=NEURON, token_id=tokenizer.convert_tokens_to_ids(TOKEN), dim=DIM)
    out = tmp_path_factory.mktemp("planted_model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, tokenizer, out


@pytest.fixture(scope="session")
def exemplar_file(planted, tmp_path_factory) -> Path:
    from circuits_attribution.exemplars import run_exemplars
    from circuits_attribution.testing import WORDS
    from circuits_core.exemplars import ExemplarRunSettings

    model, tokenizer, _ = planted
    root = tmp_path_factory.mktemp("exemplars")
    rng = random.Random(1)
    with open(root / "corpus.jsonl", "w") as fh:
        for _ in range(60):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS[:70]) for _ in range(rng.randint(8, 24)))}) + "\n")
    out = root / "ex.duckdb"
    run_exemplars(ExemplarRunSettings(corpus=str(root / "corpus.jsonl"), output=out, model="tiny", top_k=10,
                                      random_samples=32, seq_len=24, batch_size=4, context_before=4, context_after=2,
                                      layers=(LAYER,), progress=False), model=model, tokenizer=tokenizer)
    return out


@pytest.fixture(scope="session")
def atlas_file(tmp_path_factory) -> Path:
    """An atlas built from planted graphs in which L1/N10 is a member (labelled 'enzyme catalysis...')."""
    from circuits_atlas import ClusterSettings, build_atlas

    fx = _atlas_fixtures()
    root = tmp_path_factory.mktemp("atlas")
    export = fx.write_export(fx.planted_graphs(), root / "export")
    labels = fx.write_labels(root / "labels.jsonl")
    out = root / "atlas.duckdb"
    build_atlas(export_dir=export, output_path=out, labels_path=labels,
                clustering=ClusterSettings(min_edge_count=5, num_trials=4), min_edge_count=3, model="planted-test")
    return out


@pytest.fixture(scope="session")
def engine(planted):
    from circuits_attribution.attributor import RelPAttributor

    model, tokenizer, _ = planted
    return RelPAttributor(model, tokenizer)


@pytest.fixture
def scripted():
    from circuits_labeler.testing import ScriptedScientist

    return ScriptedScientist(probes=PROBES, fillers=FILLERS)

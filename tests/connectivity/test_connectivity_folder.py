"""The connectivity folder: a killed run resumes at the first missing layer and ends with the same
files as a clean run; mismatching settings or models are refused; the output projections are the
labeler's file format (one implementation, one owner)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from circuits_attribution.connectivity import compute_connectivity
from circuits_core.connectivity import PARTS, ConnectivitySpec
from circuits_core.connectivity_files import ConnectivityFolder
from circuits_core.errors import CorruptInput, FailedPrecondition, InvalidArgument, NotFound
from circuits_core.projections import OutputProjections

SPEC = ConnectivitySpec(parts=PARTS, top_k=5, edges_per_polarity=6, similarity_k=3, neuron_block=16, dtype="float64")


class Killed(Exception):
    pass


def tables(path):
    folder = ConnectivityFolder.open(path)
    return {
        "output": folder.output_projections().replace_schema_metadata(None),
        "input": folder.input_projections(),
        "weights": folder.weight_edges(),
        "similarity": folder.projection_edges(),
    }


def test_killed_run_resumes_to_the_clean_result(tmp_path, make_model, tokenizer):
    model = make_model("qwen3")
    clean = compute_connectivity(model, tokenizer, SPEC, tmp_path / "clean", model_name="tiny-qwen3")
    assert clean.computed_layers == {p: 4 for p in PARTS}

    calls = []

    def die_after_two(part, done, total):
        calls.append((part, done))
        if part == "weights" and done == 2:
            raise Killed()

    with pytest.raises(Killed):
        compute_connectivity(model, tokenizer, SPEC, tmp_path / "resumed", model_name="tiny-qwen3", progress=die_after_two)
    folder = ConnectivityFolder.open(tmp_path / "resumed")
    assert folder.has("output") and folder.has("input") and not folder.has("weights")
    assert folder.layers_done("weights") == {0, 1}
    again = compute_connectivity(model, tokenizer, SPEC, tmp_path / "resumed", model_name="tiny-qwen3")
    assert again.resumed_layers == {"output": 4, "input": 4, "weights": 2, "similarity": 0}
    assert again.computed_layers == {"output": 0, "input": 0, "weights": 2, "similarity": 4}
    assert not (tmp_path / "resumed" / "parts").exists()
    a, b = tables(tmp_path / "clean"), tables(tmp_path / "resumed")
    for part in PARTS:
        assert a[part].equals(b[part]), part
    manifest = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert manifest["num_layers"] == 4 and manifest["d_mlp"] == 96 and manifest["model"] == "tiny-qwen3"
    assert set(manifest["settings"]) == set(PARTS)


def test_other_settings_or_model_are_refused(tmp_path, make_model, tokenizer):
    model = make_model("llama")
    spec = ConnectivitySpec(parts=("output",), top_k=3, dtype="float64")
    compute_connectivity(model, tokenizer, spec, tmp_path / "c", model_name="m")
    with pytest.raises(FailedPrecondition, match="top_k"):
        compute_connectivity(model, tokenizer, ConnectivitySpec(parts=("output",), top_k=4, dtype="float64"), tmp_path / "c", model_name="m")
    with pytest.raises(FailedPrecondition, match="another model"):
        compute_connectivity(model, tokenizer, spec, tmp_path / "c", model_name="other")
    # another part with its own settings is added to the same folder
    compute_connectivity(model, tokenizer, ConnectivitySpec(parts=("weights",), edges_per_polarity=2, dtype="float64"),
                         tmp_path / "c", model_name="m")
    assert ConnectivityFolder.open(tmp_path / "c").has("weights")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(FailedPrecondition, match="not empty"):
        compute_connectivity(model, tokenizer, spec, tmp_path / "junk", model_name="m")


def test_bad_folders_and_specs(tmp_path):
    with pytest.raises(NotFound):
        ConnectivityFolder.open(tmp_path / "missing")
    with pytest.raises(CorruptInput, match="not a connectivity folder"):
        ConnectivityFolder.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptInput, match="unreadable"):
        ConnectivityFolder.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CorruptInput, match="format"):
        ConnectivityFolder.open(tmp_path)
    with pytest.raises(InvalidArgument, match="parts"):
        ConnectivitySpec(parts=("outputs",))
    with pytest.raises(InvalidArgument, match="top_k"):
        ConnectivitySpec(top_k=0)
    with pytest.raises(InvalidArgument, match="dtype"):
        ConnectivitySpec(dtype="int8")


def test_output_projections_are_the_labeler_file(tmp_path, make_model, tokenizer):
    from circuits_labeler.projection import compute_output_projections

    model = make_model("olmo2")
    compute_connectivity(model, tokenizer, ConnectivitySpec(parts=("output",), top_k=4, final_norm=True, dtype="float64"),
                         tmp_path / "c", model_name="tiny-olmo2")
    loaded = OutputProjections.load(tmp_path / "c" / "output_projections.parquet")
    assert loaded.model == "tiny-olmo2" and loaded.top_k == 4 and loaded.include_final_norm
    labeler = compute_output_projections(model, tokenizer=tokenizer, top_k=4, include_final_norm=True)
    assert len(loaded) == len(labeler) == 4 * 96
    for key, mine in loaded.by_unit.items():
        theirs = labeler.get(*key)
        assert [t.token_id for t in mine.promotes] == [t.token_id for t in theirs.promotes]
        assert [t.token for t in mine.suppresses] == [t.token for t in theirs.suppresses]
        assert mine.logit_effect == pytest.approx(theirs.logit_effect, rel=1e-5)
    meta = json.loads(pq.read_schema(tmp_path / "c" / "output_projections.parquet").metadata[b"circuits.projections"])
    assert meta["num_layers"] == 4

"""`circuits graph`: writes a schema-valid legacy graph; bad input exits 2 with one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from viewer_requirements import graph_index_problems, neuronpedia_upload_problems, viewer_problems

from circuits.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, make_model, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_model("llama")
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def _schema():
    for candidate in (REPO / "schemas" / "neuronpedia-graph-schema.json",
                      Path("/work/shared/schemas/neuronpedia-graph-schema.json")):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    pytest.skip("neuronpedia graph schema not found")


def test_graph_writes_legacy_json(tiny_model_dir, tmp_path, capsys):
    import jsonschema

    code = main(["graph", "the capital of france is", "--model", str(tiny_model_dir), "--raw",
                 "--output-dir", str(tmp_path), "--tau", "0.01", "--dtype", "float64", "--edge-chunk-size", "3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    path = tmp_path / "relp-the-capital-of-france-is.json"
    data = json.loads(path.read_text())
    jsonschema.validate(data, _schema())
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1
    assert "nodes" in lines[0] and "edges" in lines[0] and str(path) in lines[0] and "p=" in lines[0]
    n_neurons = sum(1 for n in data["nodes"] if n["feature_type"] == "mlp_neuron")
    assert lines[0].startswith(f"{n_neurons} nodes, {len(data['links'])} edges")
    assert data["metadata"]["slug"] == "relp-the-capital-of-france-is"
    # what circuit-tracer's and Neuronpedia's viewers need, and the folder index beside the file
    assert viewer_problems(data) == []
    assert neuronpedia_upload_problems(data, file_name=path.name, size=path.stat().st_size) == []
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["relp-the-capital-of-france-is"]
    assert graph_index_problems(index, tmp_path) == []


def test_graph_slug_and_target_tokens(tiny_model_dir, tmp_path, capsys):
    code = main(["graph", "the capital of france is", "--model", str(tiny_model_dir), "--raw", "--slug", "My Run",
                 "--output-dir", str(tmp_path), "--target-tokens", "paris", "rome", "--max-nodes", "2"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "relp-my-run.json").read_text())
    # the viewers' rule: the token between the clerp's double quotes
    assert sorted(n["clerp"].split('"')[1] for n in data["nodes"] if n["isLogit"]) == ["paris", "rome"]
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["relp-my-run"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["graph", "   "], "prompt is empty"),
        (["graph", "hi", "--contrastive", "a", "b", "--target-tokens", "c"], "cannot be combined"),
        (["graph", "hi", "--model", "no-such-org/no-such-model"], "no-such-org/no-such-model"),
        (["graph", "the capital", "--raw", "--target-tokens", "paris london"], "splits into ['paris', 'london']"),
        (["graph", " ".join(["cat"] * 70), "--raw"], "longer than the model's context"),
        (["graph", "the capital", "--dtype", "int7"], "unknown dtype"),
        (["graph", "the capital", "--k", "0"], "k must be an integer >= 1"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_model_dir, tmp_path, capsys, argv, message):
    if "--model" not in argv:
        argv = [*argv, "--model", str(tiny_model_dir)]
    code = main([*argv, "--output-dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2
    err_lines = [line for line in captured.err.strip().splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and message in err_lines[0], captured.err
    assert "Traceback" not in captured.err
    assert not list(tmp_path.iterdir())


def test_process_exit_code_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "circuits.cli", "graph", "", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: prompt is empty"


def test_graph_fills_clerps_from_a_label_file(tiny_model_dir, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["graph", "the capital of france is", "--model", str(tiny_model_dir), "--raw",
                 "--output-dir", str(first), "--tau", "0.01", "--dtype", "float64"]) == 0
    data = json.loads((first / "relp-the-capital-of-france-is.json").read_text())
    neurons = [n for n in data["nodes"] if n["feature_type"] == "mlp_neuron"]
    chosen = neurons[0]
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"layer": int(chosen["layer"]), "neuron": chosen["feature"],
                                  "label": "planted label", "source": "goodfire"}) + "\n")
    second = tmp_path / "second"
    assert main(["graph", "the capital of france is", "--model", str(tiny_model_dir), "--raw",
                 "--output-dir", str(second), "--tau", "0.01", "--dtype", "float64", "--labels", str(labels)]) == 0
    capsys.readouterr()
    labelled = json.loads((second / "relp-the-capital-of-france-is.json").read_text())
    clerps = {n["node_id"]: n["clerp"] for n in labelled["nodes"]}
    same_neuron = [n["node_id"] for n in neurons if (n["layer"], n["feature"]) == (chosen["layer"], chosen["feature"])]
    assert all(clerps[i] == f"L{chosen['layer']}/N{chosen['feature']}: planted label" for i in same_neuron)
    others = [n for n in neurons if n["node_id"] not in same_neuron]
    assert all(clerps[n["node_id"]] == n["clerp"] for n in others)
    assert main(["graph", "x", "--model", str(tiny_model_dir), "--labels", str(tmp_path / "missing.jsonl")]) == 2

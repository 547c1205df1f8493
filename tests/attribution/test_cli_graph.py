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
        (["graph", "the capital", "--raw", "--target-tokens", "zebra", "paris", "yak"],
         "2 target tokens cannot be traced for "),
        (["graph", " ".join(["cat"] * 70), "--raw"], "longer than the model's context"),
        (["graph", "the capital", "--dtype", "int7"], "unknown dtype"),
        (["graph", "the capital", "--k", "0"], "k must be an integer >= 1"),
        (["graph", "the capital", "--memory-budget", "lots"], "--memory-budget: cannot read 'lots'"),
        (["graph", "the capital", "--memory-budget", "1KiB"], "needs at least"),
        (["graph", "the capital", "--device-map", "{\"model.layers.0\": \"tpu\"}"], "is not a device"),
        (["graph", "the capital", "--max-memory", "cpu=1GiB"], "--max-memory only applies with --device-map"),
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


def test_graph_pb_gz_with_budget_and_device_map_equals_json(tiny_model_dir, tmp_path, capsys):
    """--format pb.gz (compact framed protobuf) holds the same graph as the JSON; --memory-budget and
    --device-map (layers offloaded to disk) change how it is traced, not what."""
    from circuits_core.graphio import read_graph

    prompt = ["graph", "the capital of france is", "--model", str(tiny_model_dir), "--raw", "--dtype", "float64",
              "--tau", "0.01"]
    assert main([*prompt, "--output-dir", str(tmp_path / "a")]) == 0
    device_map = json.dumps({"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                             "model.layers.1": "disk", "model.layers.2": "cpu", "model.layers.3": "disk",
                             "model.norm": "cpu", "lm_head": "cpu"})
    code = main([*prompt, "--output-dir", str(tmp_path / "b"), "--format", "pb.gz", "--memory-budget", "64MiB",
                 "--device-map", device_map, "--offload-folder", str(tmp_path / "offload")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    pb = tmp_path / "b" / "relp-the-capital-of-france-is.pb.gz"
    assert str(pb) in captured.out.strip().splitlines()[-1]
    a = read_graph(tmp_path / "a" / "relp-the-capital-of-france-is.json")
    b = read_graph(pb)
    assert [u.key for u in a.units] == [u.key for u in b.units]
    assert len(a.edge_table) == len(b.edge_table) > 50
    import numpy as np

    assert np.allclose(a.edge_table.weight, b.edge_table.weight, rtol=1e-9, atol=1e-12)
    assert pb.stat().st_size < (tmp_path / "a" / "relp-the-capital-of-france-is.json").stat().st_size / 3


@pytest.mark.parametrize("offline", [True, False])
def test_a_mistyped_model_fails_at_once_with_the_nearest_names(tmp_path, offline):
    """Offline (HF_HUB_OFFLINE=1) or with the hub unreachable (a closed local port stands in for
    it): one error line naming the nearest known model and the offline hint, no hub retries."""
    import os
    import socket

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        with socket.socket() as probe:  # a port nothing listens on once closed
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()[1]
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed}"
    result = subprocess.run(
        [sys.executable, "-m", "circuits.cli", "graph", "The capital of France is", "--model",
         "HuggingFaceTB/SmolLM2-135M", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown model 'HuggingFaceTB/SmolLM2-135M'"), result.stderr
    assert "did you mean 'HuggingFaceTB/SmolLM2-135M-Instruct'?" in lines[0]
    assert "--model PATH" in lines[0] and ("HF_HUB_OFFLINE=1" in lines[0] if offline else "unreachable" in lines[0])
    assert not list(tmp_path.iterdir())


def test_targets_are_checked_before_the_weights_load(tiny_model_dir, tmp_path, capsys):
    """Bad targets are refused by the tokenizer alone: with unreadable weights the error is still
    about the targets (and lists every bad one), while good targets reach the weights and fail there."""
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    out = tmp_path / "out"
    code = main(["graph", "the capital", "--model", str(broken), "--raw", "--target-tokens", "zebra", "paris", "yak",
                 "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: 2 target tokens cannot be traced for {broken}: ")
    assert "'zebra' is not in the vocabulary (unknown token)" in err[0] and "'yak' is not in the vocabulary" in err[0]
    code = main(["graph", "the capital", "--model", str(broken), "--raw", "--target-tokens", "paris",
                 "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"error: cannot load model from {broken}")
    assert not out.exists()


def test_a_second_graph_never_overwrites_the_first(tiny_model_dir, tmp_path, capsys):
    argv = ["graph", "the capital of france is", "--model", str(tiny_model_dir), "--raw", "--output-dir", str(tmp_path),
            "--max-nodes", "3", "--dtype", "float64"]
    assert main(argv) == 0
    first = tmp_path / "relp-the-capital-of-france-is.json"
    before = first.read_bytes()
    out = capsys.readouterr().out
    assert out.strip().endswith(f"wrote {first}")
    assert main([*argv, "--k", "2"]) == 0
    second = tmp_path / "relp-the-capital-of-france-is-2.json"
    assert capsys.readouterr().out.strip().endswith(f"wrote {second}")
    assert first.read_bytes() == before
    assert json.loads(second.read_text())["metadata"]["slug"] == "relp-the-capital-of-france-is-2"
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert sorted(g["slug"] for g in index["graphs"]) == ["relp-the-capital-of-france-is", "relp-the-capital-of-france-is-2"]
    assert main([*argv, "--k", "1", "--overwrite"]) == 0
    capsys.readouterr()
    assert first.read_bytes() != before and not (tmp_path / "relp-the-capital-of-france-is-3.json").exists()
    assert len(json.loads(first.read_text())["metadata"]["generation_settings"]["metric_tokens"]) == 1


def test_summary_states_prompt_form_pruning_and_a_weak_logit_hint(tiny_model_dir, tmp_path, capsys):
    argv = ["graph", "the capital of france is", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path),
            "--tau", "0", "--max-nodes", "4", "--dtype", "float64"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    (summary,) = captured.out.strip().splitlines()
    data = json.loads((tmp_path / "relp-the-capital-of-france-is.json").read_text())
    gs = data["metadata"]["generation_settings"]
    # an unknown model with a chat template is traced in chat form, and the summary says why
    assert "prompt: chat template (the model has one)" in summary and gs["prompt_form"] == "chat" and gs["raw"] is False
    assert summary.startswith(f"4 nodes (the 4 most influential of {gs['n_candidate_nodes']} above tau; "
                              f"{gs['nodes_pruned']} pruned by --max-nodes 4), ")
    assert gs["n_candidate_nodes"] == 4 + gs["nodes_pruned"] > 4
    # a random tiny model answers nothing: its top logit is weak, and one hint line says what to try
    top = max(n["token_prob"] for n in data["nodes"] if n["isLogit"])
    assert top < 0.2
    hints = [line for line in captured.err.splitlines() if line.startswith("hint:")]
    assert len(hints) == 1 and "--raw (completion form)" in hints[0] and "--target-tokens TOKEN" in hints[0]
    # skip_edges keeps every node, with edges into the logits only, and says so
    assert main([*argv, "--over-max-nodes", "skip_edges", "--slug", "skip"]) == 0
    (summary,) = capsys.readouterr().out.strip().splitlines()
    assert f"{gs['n_candidate_nodes']} nodes, " in summary and "(over --max-nodes 4: neuron edges skipped)" in summary


def test_graph_help_says_where_outputs_go():
    from circuits.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))  # noqa: SLF001
    text = " ".join(sub.choices["graph"].format_help().split())
    assert "directory for the graph file relp-<slug>.json and its graph-metadata.json index, relative to the working directory" in text
    assert "--overwrite" in text and "relp-<slug>-2.json" in text
    assert "--raw" in text and "--chat" in text and "--over-max-nodes {prune,skip_edges}" in text


def test_an_error_after_the_progress_bar_starts_its_own_line(tiny_model_dir, tmp_path):
    """Redirected stderr: the edge pass's bar leaves its line with a carriage return; the error
    that follows (here: a corrupt label file, read once the graph is traced) is a line of its own."""
    labels = tmp_path / "labels.jsonl"
    labels.write_text("{not json\n")
    result = subprocess.run(
        [sys.executable, "-m", "circuits.cli", "graph", "the capital of france is", "--model", str(tiny_model_dir),
         "--raw", "--max-nodes", "3", "--labels", str(labels), "--output-dir", str(tmp_path / "out")],
        capture_output=True, timeout=300,
    )  # fmt: skip
    stderr = result.stderr.decode()  # bytes: universal newlines would turn the bar's \r into line ends
    assert result.returncode == 2, stderr
    assert "%|" in stderr and "\r" in stderr  # the bar was drawn, and left its line with a carriage return
    lines = stderr.split("\n")
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: ") and str(labels) in errors[0], stderr
    assert lines[-1] == "" and lines[-2] == errors[0]

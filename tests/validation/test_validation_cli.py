"""`circuits validate` and `circuits intervene` end to end on a tiny checkpoint saved to disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from circuits_attribution.testing import PROMPT, build_model, build_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    build_model("llama", seed=2).save_pretrained(str(path))
    build_tokenizer().save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def graph_file(checkpoint, tmp_path_factory):
    from circuits_attribution import RelPAttributor, RelPConfig, load_model

    loaded = load_model(str(checkpoint), dtype="float64")
    config = RelPConfig(raw=True, tau=0.001, model_name=str(checkpoint))
    graph = RelPAttributor(loaded.model, loaded.tokenizer, config).trace(PROMPT, compute_edges=False)
    return graph.save(tmp_path_factory.mktemp("graphs") / "relp-tiny.json")


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITS_HOME", str(tmp_path / "home"))


def test_validate_prints_table_and_writes_json_and_png(graph_file, checkpoint, tmp_path, capsys):
    from circuits.cli import main

    out = tmp_path / "out"
    rc = main(["validate", str(graph_file), "--dtype", "float64", "--sizes", "3,10", "--random-seeds", "2",
               "--ablation", "mean", "--output-dir", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "faith" in captured.out and "m_full=" in captured.out
    data = json.loads((out / "relp-tiny.faithfulness-mean.json").read_text())
    assert data["ablation"] == "mean" and data["model"] == str(checkpoint)
    assert [p["size"] for p in data["points"]][:2] == [3, 10]
    assert (out / "relp-tiny.faithfulness-mean.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "home" / "means").is_dir()  # mean ablation cached the means


def test_validate_errors_are_one_line(tmp_path, capsys):
    from circuits.cli import main

    assert main(["validate", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["validate", "x.json", "--sizes", "a,b"])


def test_intervene_shows_baseline_and_intervened_predictions(checkpoint, capsys):
    from circuits.cli import main

    rc = main(["intervene", PROMPT, "--model", str(checkpoint), "--dtype", "float64", "--raw",
               "--neuron", "3:5=set:8", "--neuron", "1:2:-1=zero", "--generate", "3", "--top-k", "3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "interventions: 3:5=set:8, 1:2:-1=zero" in captured.out
    assert "baseline:" in captured.out and "intervened:" in captured.out
    rc = main(["intervene", PROMPT, "--model", str(checkpoint), "--dtype", "float64", "--raw",
               "--neuron", "3:5=scale:2", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(data["baseline"]) == 10 and data["interventions"][0]["mode"] == "scale"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [("9:5=zero", "layer 9 is out of range"), ("1:500=zero", "neuron index 500 is out of range"),
     ("1:5:40=zero", "position 40 is outside the prompt"), ("1-5=zero", "bad neuron spec")],
)
def test_intervene_bad_neurons_exit_2_with_one_line(checkpoint, capsys, spec, fragment):
    from circuits.cli import main

    rc = main(["intervene", PROMPT, "--model", str(checkpoint), "--raw", "--neuron", spec])
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]  # after the weight-loading progress bar
    assert rc == 2
    assert last.startswith("error: ") and fragment in last


def test_intervene_without_neurons_shows_the_baseline(checkpoint, capsys):
    """No --neuron: the baseline prediction alone, the same numbers a plain forward pass gives."""
    import torch

    from circuits.cli import main
    from circuits_attribution import load_model

    rc = main(["intervene", PROMPT, "--model", str(checkpoint), "--dtype", "float64", "--raw", "--top-k", "3",
               "--generate", "2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith("interventions: (none): the baseline prediction")
    assert "intervened" not in captured.out and lines[-1].startswith("baseline:   ")
    loaded = load_model(str(checkpoint), dtype="float64")
    ids = loaded.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        probs = torch.softmax(loaded.model(input_ids=torch.tensor([ids])).logits[0, -1], -1)
    top = torch.topk(probs, 3)
    shown = [float(line.split()[-1]) for line in lines[3:6]]
    assert shown == pytest.approx([round(float(p), 4) for p in top.values], abs=1e-4)
    with pytest.raises(SystemExit):  # --raw and --chat exclude each other
        main(["intervene", PROMPT, "--model", str(checkpoint), "--raw", "--chat"])


def test_validation_results_beside_the_graph_are_not_read_as_graphs(graph_file, tmp_path, capsys):
    """validate writes next to the graph by default; `circuits aggregate` of that folder counts the
    graph and reports no corrupt file."""
    import shutil

    from circuits.cli import main

    folder = tmp_path / "graphs"
    folder.mkdir()
    graph = Path(shutil.copy(graph_file, folder / graph_file.name))
    assert main(["validate", str(graph), "--dtype", "float64", "--sizes", "3", "--random-seeds", "1", "--no-plot"]) == 0
    assert (folder / "relp-tiny.faithfulness-zero.json").is_file()
    capsys.readouterr()
    assert main(["aggregate", str(folder), "--state", str(tmp_path / "agg.duckdb"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "aggregated 1 new graphs" in out and "from 1 files" in out and "0 corrupt" in out


def _report(m_full, m_empty, full_faith):
    from circuits_attribution.faithfulness import CurvePoint, FaithfulnessReport

    point = CurvePoint(**{f: 0.0 for f in CurvePoint.__dataclass_fields__} | {"size": 7, "faithfulness": full_faith})
    return FaithfulnessReport(graph_id="g", prompt="p", model="m", ablation="zero", mode="real", target_position=-1,
                              metric_tokens=("a",), metric_coefficients=(1.0,), n_graph_nodes=7, m_full=m_full,
                              m_empty=m_empty, graph_metric_value=None, top_token="a", top_token_id=0, p_top_full=None,
                              p_top_empty=None, random_seeds=0, points=(point,))  # fmt: skip


def test_validate_explains_a_baseline_that_does_not_remove_the_behaviour():
    from circuits_attribution.faithfulness import report_warnings

    assert report_warnings(_report(5.0, 1.0, 0.8)) == []
    (above,) = report_warnings(_report(5.0, 9.0, 0.8))
    assert above.startswith("m_empty=9.0000 >= m_full=5.0000: zero-ablating every neuron outside the kept set does not "
                            "remove the traced behaviour (it raises the metric)")
    assert "negative: their signs flip" in above and "try --ablation mean or --protect-positions 0" in above
    (negative,) = report_warnings(_report(5.0, 1.0, -0.4))
    assert negative.startswith("keeping all 7 graph nodes gives faith=-0.400 < 0")

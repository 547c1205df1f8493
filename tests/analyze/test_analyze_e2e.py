"""End-to-end `circuits analyze`: trace -> labels -> clusters -> paths -> LLM (local stub) -> report.

The fast tests trace a tiny random Llama saved to disk (offline tokenizer); the SmolLM2 test runs
the real model and is skipped when `python -m circuits_attribution.prepare_model` has not been run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from analyze_llm_stub import StubLLM

from circuits.cli import main
from circuits_core.schemas import Graph

REPO = Path(__file__).resolve().parents[2]


def write_config(path: Path, *, model: str, prompts: list[str], base_url: str, backend: str = "anthropic",
                 labels_file: str = "", output_dir: str = "out") -> Path:
    data = {
        "model": {"name": model},
        "graphs": {"prompts": prompts, "k": 2, "tau": 0.001, "max_nodes": 400},
        "labeling": {
            "method": "file" if labels_file else "none", "labels_file": labels_file, "backend": backend,
            "model": "stub-llm", "base_url": base_url, "api_key_env": "CIRCUITS_TEST_LLM_KEY",
            "max_retries": 0, "request_timeout": 20,
        },
        "output": {"dir": output_dir},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def check_report(folder: Path, schema: dict, *, expect_llm: str) -> dict:
    """Assertions every report folder must satisfy; returns summary.json."""
    for name in ("report.md", "report.html", "graph.json", "summary.json"):
        assert (folder / name).is_file(), f"{name} missing in {folder}"
    legacy = json.loads((folder / "graph.json").read_text())
    jsonschema.validate(legacy, schema)
    graph = Graph.from_legacy(legacy)
    summary = json.loads((folder / "summary.json").read_text())

    # every neuron is labelled or explicitly marked unlabelled, in graph.json and summary.json
    for unit in graph.neurons:
        assert unit.label or any(lab.source == "unlabelled" for lab in unit.labels), unit.node_id
    assert {n["node_id"] for n in summary["neurons"]} == {u.node_id for u in graph.neurons}
    for n in summary["neurons"]:
        assert n["label"] or n["label_source"] == "unlabelled"

    # clusters present, consistent across node fields, supernodes and summary
    assert summary["counts"]["clusters"] >= 1 and summary["clusters"]
    supernodes = legacy["qParams"]["supernodes"]
    assert len(supernodes) == len(summary["clusters"])
    by_node = {n["node_id"]: n.get("cluster") for n in legacy["nodes"]}
    for sn, cl in zip(supernodes, summary["clusters"]):
        assert sn[0] == cl["name"] and sn[1:] == cl["node_ids"]
        assert all(by_node[n] == cl["cluster_id"] for n in cl["node_ids"])

    # paths start at an input token and end at the predicted token
    assert summary["paths"]["paths"], "a traced graph has at least one token -> prediction path"
    kinds = {u.node_id: u.kind for u in graph.units}
    for p in summary["paths"]["paths"]:
        assert kinds[p["node_ids"][0]] == "embedding" and p["node_ids"][-1] == summary["predicted"]

    md = (folder / "report.md").read_text()
    page = (folder / "report.html").read_text()
    assert summary["analysis"]["status"] == expect_llm
    if expect_llm == "ok":
        assert "STUB-ANALYSIS" in md and "STUB-ANALYSIS" in page
    else:
        assert "skipped" in md and summary["analysis"]["reason"]
    for cl in summary["clusters"]:
        assert cl["name"] in md
    # the report page embeds the viewer and the same graph, and loads nothing from the network
    embedded = re.search(r'<script type="application/json" id="circuits-graph">(.*?)</script>', page, re.S)
    assert embedded and json.loads(embedded.group(1))["qParams"]["supernodes"] == supernodes
    assert not re.search(r'(src|href)="https?:', page)
    return summary


def test_analyze_prompt_with_stub_llm(tiny_model_dir, tmp_path, graph_schema, monkeypatch) -> None:
    monkeypatch.setenv("CIRCUITS_TEST_LLM_KEY", "sk-test")
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"layer": 0, "neuron": 3, "label": "LABEL-FROM-FILE"}) + "\n")
    with StubLLM() as stub:
        cfg = write_config(tmp_path / "cfg.yaml", model=str(tiny_model_dir), prompts=[],
                           base_url=stub.anthropic_base_url, labels_file=str(labels))
        rc = main(["analyze", "the capital of france is", "--config", str(cfg), "--output", str(tmp_path / "rep")])
    assert rc == 0
    summary = check_report(tmp_path / "rep", graph_schema, expect_llm="ok")
    assert len(stub.requests) == 1 and stub.requests[0]["path"].endswith("/v1/messages")
    sent = json.dumps(stub.requests[0]["body"])
    assert "the capital of france is" in sent
    sources = {n["label_source"] for n in summary["neurons"]}
    assert sources <= {"file", "unlabelled"}
    from_file = [n for n in summary["neurons"] if n["layer"] == 0 and n["neuron"] == 3]
    assert all(n["label"] == "LABEL-FROM-FILE" and n["label_source"] == "file" for n in from_file)
    assert summary["labels"]["by_source"].get("file", 0) == len(from_file)


def test_analyze_config_many_prompts_openai_then_graph_without_key(tiny_model_dir, tmp_path, graph_schema, monkeypatch) -> None:
    monkeypatch.setenv("CIRCUITS_TEST_LLM_KEY", "sk-test")
    prompts = ["the capital of france is", "the language spoken in germany is"]
    with StubLLM() as stub:
        cfg = write_config(tmp_path / "cfg.yaml", model=str(tiny_model_dir), prompts=prompts,
                           base_url=stub.openai_base_url, backend="openai")
        assert main(["analyze", "--config", str(cfg)]) == 0
    root = tmp_path / "out" / "reports"  # output.dir relative to the config file
    index = json.loads((root / "index.json").read_text())
    assert [r["prompt"] for r in index["reports"]] == prompts
    assert len(stub.requests) == 2 and all(r["path"].endswith("/chat/completions") for r in stub.requests)
    for r in index["reports"]:
        check_report(Path(r["folder"]), graph_schema, expect_llm="ok")

    # re-analyse a written graph with no key: the LLM section says it was skipped
    monkeypatch.delenv("CIRCUITS_TEST_LLM_KEY")
    graph_file = Path(index["reports"][0]["folder"]) / "graph.json"
    out = tmp_path / "again"
    assert main(["analyze", "--graph", str(graph_file), "--output", str(out),
                 "--backend", "anthropic", "--base-url", ""]) == 0
    summary = check_report(out, graph_schema, expect_llm="skipped")
    assert "ANTHROPIC_API_KEY" in summary["analysis"]["reason"] or "CIRCUITS_TEST_LLM_KEY" in summary["analysis"]["reason"]
    first = json.loads((Path(index["reports"][0]["folder"]) / "summary.json").read_text())
    assert summary["counts"] == first["counts"] and summary["clusters"] == first["clusters"]


def test_analyze_trace_settings_flag_over_line_over_config(tiny_model_dir, tmp_path) -> None:
    """A trace flag beats the config's graphs section; a prompts-file line's own setting beats both
    (graphs.k=2 in the config, --tau on the command line, k=1 on one line)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "the capital of france is", "id": "first"}) + "\n"
                       + json.dumps({"prompt": "the capital of germany is", "id": "second", "k": 1}) + "\n")
    cfg = write_config(tmp_path / "cfg.yaml", model=str(tiny_model_dir), prompts=[], base_url="")
    data = yaml.safe_load(cfg.read_text())
    data["graphs"] = {"prompts_file": str(prompts), "k": 2, "tau": 0.5}
    cfg.write_text(yaml.safe_dump(data))
    assert main(["analyze", "--config", str(cfg), "--tau", "0.002", "--no-llm", "--output", str(tmp_path / "rep")]) == 0
    first = json.loads((tmp_path / "rep" / "first" / "summary.json").read_text())
    second = json.loads((tmp_path / "rep" / "second" / "summary.json").read_text())
    assert first["counts"]["logits"] == 2 and second["counts"]["logits"] == 1
    for name in ("first", "second"):
        legacy = json.loads((tmp_path / "rep" / name / "graph.json").read_text())
        # tau sits in generation_settings; metadata.node_threshold is the viewers' pruning fraction
        assert legacy["metadata"]["generation_settings"]["node_threshold"] == 0.002


def test_analyze_bad_input_is_one_line_error(tmp_path, capsys) -> None:
    assert main(["analyze"]) == 2
    assert main(["analyze", "--graph", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("error: ") for line in err)


def test_example_configs_load() -> None:
    from circuits_core.config import load_config

    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs, "configs/ has example configs"
    for path in configs:
        cfg = load_config(path)
        assert cfg.model.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
        if cfg.graphs.prompts_file:
            assert cfg.resolve(cfg.graphs.prompts_file).is_file()
        else:
            assert cfg.graphs.prompts


def _smollm2_ready() -> bool:
    try:
        from circuits_attribution.models import is_prepared
    except ImportError:
        return False
    return is_prepared()


@pytest.mark.smollm2
@pytest.mark.skipif(not _smollm2_ready(), reason="SmolLM2 cache absent: run `python -m circuits_attribution.prepare_model`")
def test_analyze_smollm2_knowledge_config(tmp_path, graph_schema, monkeypatch) -> None:
    """The shipped config's first prompt on the real model, write-up through the stub LLM."""
    from circuits_core.config import load_config

    shipped = load_config(REPO / "configs" / "knowledge_circuits.yaml")
    monkeypatch.setenv("CIRCUITS_TEST_LLM_KEY", "sk-test")
    with StubLLM() as stub:
        cfg = yaml.safe_load((REPO / "configs" / "knowledge_circuits.yaml").read_text())
        cfg["graphs"]["prompts"] = [shipped.graphs.prompts[0]]
        cfg["graphs"].pop("output_dir")
        cfg["labeling"] = {"method": "none", "backend": "anthropic", "model": "stub", "base_url": stub.anthropic_base_url,
                           "api_key_env": "CIRCUITS_TEST_LLM_KEY", "max_retries": 0}
        cfg["output"] = {"dir": str(tmp_path)}
        path = tmp_path / "knowledge.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["analyze", "--config", str(path), "--output", str(tmp_path / "rep")]) == 0
    summary = check_report(tmp_path / "rep", graph_schema, expect_llm="ok")
    assert summary["logits"][0]["token"] == " Paris"
    assert summary["counts"]["neurons"] > 20


def test_analyze_without_config_ignores_a_stray_labels_file_and_shows_progress(tiny_model_dir, tmp_path, monkeypatch,
                                                                                capsys) -> None:
    """Without --config a labels.jsonl in the working directory labels nothing (a note names it);
    --labels uses it. The report goes to output/reports/<slug>/ under the working directory, and the
    trace shows its progress bar."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CIRCUITS_TEST_LLM_KEY", raising=False)
    rows = [{"layer": layer, "neuron": n, "label": "STRAY-LABEL"} for layer in range(3) for n in range(48)]
    Path("labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["analyze", "the capital of france is", "--model", str(tiny_model_dir), "--raw", "--no-llm"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "note: labels.jsonl is not used for labels; pass --labels labels.jsonl to label neurons from it" in captured.err
    assert "edges:" in captured.err and "%|" in captured.err  # the trace's progress bar
    folder = tmp_path / "output" / "reports" / "relp-the-capital-of-france-is"
    assert captured.out.strip().endswith(f"wrote {Path('output/reports/relp-the-capital-of-france-is/report.html')}")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["neurons"] and all(n["label"] != "STRAY-LABEL" for n in summary["neurons"])
    assert summary["labels"]["unlabelled"] == len(summary["neurons"])
    assert main([*argv, "--labels", "labels.jsonl", "--output", "labelled"]) == 0
    assert "note:" not in capsys.readouterr().err
    labelled = json.loads((tmp_path / "labelled" / "summary.json").read_text())
    assert labelled["neurons"] and all(n["label"] == "STRAY-LABEL" for n in labelled["neurons"])

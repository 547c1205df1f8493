"""Graph diff against a brute-force recomputation from the viewer JSON of two real graphs of a tiny
float64 model: statuses, normalised values and changes of neurons and edges, token vs neuron
alignment, the diff file and viewer graph, and one-line errors in the CLI."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from circuits.cli import main as cli_main
from circuits_core.errors import InvalidArgument
from circuits_core.graphdiff import GraphDiff, diff_graphs
from circuits_core.graphio import read_graph
from circuits_core.schemas import Graph

FRANCE = "the capital of france is"
ROME = "the capital of rome is"
LONGER = "the capital of the big red city is"


@pytest.fixture(scope="module")
def graphs(make_attributor, tmp_path_factory):
    attributor = make_attributor("llama", tau=0.002)
    out = tmp_path_factory.mktemp("graphs")
    paths = {}
    for name, prompt in (("france", FRANCE), ("rome", ROME), ("longer", LONGER)):
        graph = attributor.trace(prompt)
        paths[name] = graph.save(out / f"{name}.json")
    return paths


def reference_from_json(path, by_position: bool):
    """Brute force from the viewer JSON: node key -> value / |m| and edge key -> weight / |m|."""
    data = json.loads(path.read_text())
    m = abs(data["metadata"]["generation_settings"]["metric_value"])
    by_id = {}
    nodes = defaultdict(float)
    for node in data["nodes"]:
        kind = node["feature_type"]
        pos = node["ctx_idx"]
        if kind == "mlp_neuron":
            key = ("neuron", int(node["layer"]), node["feature"], pos if by_position else None)
        elif kind == "embedding":
            key = ("embedding", None, None, pos) if by_position else ("embedding", None, node["feature"], None)
        else:
            key = ("logit", None, node["feature"], None)
        by_id[node["node_id"]] = key
        nodes[key] += (node["attribution"] or 0.0) / m
    edges = defaultdict(float)
    for link in data["links"]:
        edges[(by_id[link["source"]], by_id[link["target"]])] += link["weight"] / m
    return nodes, edges


def unit_key(u):
    if u.kind == "neuron":
        return ("neuron", u.layer, u.index, u.position)
    if u.kind == "embedding":
        return ("embedding", None, None, u.position) if u.position is not None else ("embedding", None, u.index, None)
    return ("logit", None, u.index, None)


@pytest.mark.parametrize("other,alignment", [("rome", "token"), ("longer", "neuron")])
def test_diff_matches_brute_force(graphs, other, alignment):
    a, b = read_graph(graphs["france"]), read_graph(graphs[other])
    diff = diff_graphs(a, b)
    assert diff.alignment == alignment and diff.normalisation == "metric"
    na, ea = reference_from_json(graphs["france"], alignment == "token")
    nb, eb = reference_from_json(graphs[other], alignment == "token")
    assert {unit_key(u) for u in diff.units} == na.keys() | nb.keys()
    for u in diff.units:
        key = unit_key(u)
        expected_status = "changed" if key in na and key in nb else ("lost" if key in na else "gained")
        assert u.status == expected_status, key
        assert u.a == pytest.approx(na.get(key, 0.0), rel=1e-12, abs=1e-15)
        assert u.b == pytest.approx(nb.get(key, 0.0), rel=1e-12, abs=1e-15)
        assert u.change == pytest.approx(u.b - u.a, rel=1e-12, abs=1e-15)
    assert {(e.source, e.target) for e in diff.edges} == ea.keys() | eb.keys()
    for e in diff.edges:
        key = (e.source, e.target)
        assert e.a == pytest.approx(ea.get(key, 0.0), rel=1e-12, abs=1e-15)
        assert e.b == pytest.approx(eb.get(key, 0.0), rel=1e-12, abs=1e-15)
    changes = [abs(u.change) for u in diff.units]
    assert changes == sorted(changes, reverse=True)
    counts = diff.counts()
    assert sum(counts["neurons"].values()) == sum(1 for u in diff.units if u.kind == "neuron")
    assert counts["neurons"]["lost"] + counts["neurons"]["gained"] > 0


def test_self_diff_changes_nothing(graphs):
    a = read_graph(graphs["france"])
    diff = diff_graphs(a, a)
    assert all(u.status == "changed" and u.change == 0 for u in diff.units)
    assert all(e.change == 0 for e in diff.edges)


def test_diff_file_and_viewer_graph(graphs, tmp_path):
    from circuits.viewer import render_page

    a, b = read_graph(graphs["france"]), read_graph(graphs["rome"])
    diff = diff_graphs(a, b, sources={"a": "a.json", "b": "b.json"})
    assert GraphDiff.load(diff.save(tmp_path / "d.json")) == diff
    path = diff.save_graph(tmp_path / "g.json")
    data = json.loads(path.read_text())
    assert len(data["nodes"]) == len(diff.units)
    groups = {g[0]: set(g[1:]) for g in data["qParams"]["supernodes"]}
    statuses = {n["node_id"]: n["diff_status"] for n in data["nodes"]}
    for name, status in (("gained (only in B)", "gained"), ("lost (only in A)", "lost"), ("changed", "changed")):
        assert groups.get(name, set()) == {i for i, s in statuses.items() if s == status}
    back = Graph.load(path)
    assert len(back.units) == len(diff.units)
    assert sorted(u.attribution for u in back.units) == pytest.approx(sorted(u.change for u in diff.units))
    assert "france→rome" in " ".join(back.prompt_tokens)
    assert "circuits-graph" in render_page(back)


def test_errors(graphs, tmp_path):
    a = read_graph(graphs["france"])
    other = Graph(units=a.units, edges=a.edges, prompt=a.prompt, prompt_tokens=a.prompt_tokens, model="another-model",
                  metadata=a.metadata)
    with pytest.raises(InvalidArgument, match="different models"):
        diff_graphs(a, other)


def test_cli(graphs, tmp_path, capsys):
    out_json, out_graph = tmp_path / "diff.json", tmp_path / "diff-graph.json"
    rc = cli_main(["diff", str(graphs["france"]), str(graphs["rome"]), "--json", str(out_json), "--graph", str(out_graph), "--top", "5"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "aligned by token position" in captured.out and "RelP / |m|" in captured.out
    assert "only in A (lost)" in captured.out
    assert GraphDiff.load(out_json).alignment == "token" and out_graph.is_file()
    rc = cli_main(["diff", str(graphs["france"]), str(graphs["longer"])])
    assert rc == 0 and "aligned by neuron only" in capsys.readouterr().out

    not_graph = tmp_path / "labels.json"
    not_graph.write_text(json.dumps({"layer": 1, "neuron": 2}))
    other_model = tmp_path / "other.json"
    data = json.loads(graphs["rome"].read_text())
    data["metadata"]["model"] = "other-model"
    other_model.write_text(json.dumps(data))
    for argv, message in (
        (["diff", str(graphs["france"]), str(tmp_path / "missing.json")], "no such file"),
        (["diff", str(graphs["france"]), str(not_graph)], "missing field"),
        (["diff", str(graphs["france"]), str(other_model)], "different models"),
        (["diff", str(graphs["france"]), str(graphs["rome"]), "--graph", str(tmp_path / "x.html")], "JSON"),
    ):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err

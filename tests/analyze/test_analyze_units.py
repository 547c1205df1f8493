"""Unit tests of circuits.analysis: path search (vs brute force), labels, clusters, LLM write-up."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
from analyze_llm_stub import StubLLM

from contextlib import ExitStack

from circuits import analysis
from circuits_core.config import LabelingSection
from circuits_core.errors import InvalidArgument
from circuits_core.schemas import EMBEDDING_LAYER, Edge, Graph, Unit


def random_dag_graph(seed: int, *, n_layers: int = 4, per_layer: int = 3, n_pos: int = 3, p_edge: float = 0.5) -> Graph:
    """Embeddings -> neurons (layers 0..n-1) -> 2 logits, random signed edges forward in layer."""
    rng = random.Random(seed)
    units = [Unit(layer=EMBEDDING_LAYER, index=100 + p, position=p, kind="embedding", token=f"t{p}", activation=1.0)
             for p in range(n_pos)]
    for layer in range(n_layers):
        for i in range(per_layer):
            units.append(Unit(layer=layer, index=i, position=rng.randrange(n_pos), kind="neuron",
                              attribution=rng.uniform(-2, 2), activation=rng.uniform(0, 3)))
    units.append(Unit(layer=n_layers, index=7, position=n_pos - 1, kind="logit", token="A", probability=0.6))
    units.append(Unit(layer=n_layers, index=8, position=n_pos - 1, kind="logit", token="B", probability=0.3))
    edges = []
    for s, t in itertools.product(units, units):
        if s.layer < t.layer and s.kind != "logit" and t.kind != "embedding" and rng.random() < p_edge:
            w = rng.choice([-1, 1]) * rng.uniform(0.05, 1.0)
            edges.append(Edge(src_layer=s.layer, src_index=s.index, src_position=s.position,
                              tgt_layer=t.layer, tgt_index=t.index, tgt_position=t.position, weight=w))
    return Graph(units=tuple(units), edges=tuple(edges), prompt="t0 t1 t2",
                 prompt_tokens=tuple(f"t{p}" for p in range(n_pos)), model="random")


def brute_force_paths(graph: Graph, target_id: str, mode: str) -> list[tuple[float, tuple[str, ...]]]:
    by_key = {u.node_key: u for u in graph.units}
    out: dict[str, list[tuple[str, float]]] = {}
    in_abs: dict[str, float] = {}
    for e in graph.edges:
        s, t = by_key[e.src_key].node_id, by_key[e.tgt_key].node_id
        out.setdefault(s, []).append((t, e.weight))
        in_abs[t] = in_abs.get(t, 0.0) + abs(e.weight)
    results = []

    def walk(node: str, path: tuple[str, ...], score: float) -> None:
        if node == target_id:
            results.append((score, path))
            return
        for t, w in out.get(node, []):
            step = abs(w) / in_abs[t] if mode == "product" else abs(w)
            walk(t, path + (t,), score * step if mode == "product" else score + step)

    for u in graph.units:
        if u.kind == "embedding":
            walk(u.node_id, (u.node_id,), 1.0 if mode == "product" else 0.0)
    return sorted(results, key=lambda r: -r[0])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["product", "sum"])
def test_top_paths_match_brute_force(seed: int, mode: str) -> None:
    graph = random_dag_graph(seed)
    target = analysis.predicted_logit(graph)
    assert target is not None and target.token == "A"
    expected = brute_force_paths(graph, target.node_id, mode)
    got = analysis.top_paths(graph, k=5, mode=mode)
    assert len(got) == min(5, len(expected))
    for path, (score, _) in zip(got, expected):
        assert path.score == pytest.approx(score, rel=1e-9)
    # every returned path is a real path of the graph, ends at the target, and its sign is right
    weight = {(e.src_key, e.tgt_key): e.weight for e in graph.edges}
    key = {u.node_id: u.node_key for u in graph.units}
    for path in got:
        assert path.node_ids[-1] == target.node_id
        ws = [weight[(key[a], key[b])] for a, b in zip(path.node_ids, path.node_ids[1:])]
        assert list(path.weights) == ws
        assert path.sign == math.prod(1 if w > 0 else -1 for w in ws)


def test_top_paths_explicit_target_and_errors() -> None:
    graph = random_dag_graph(1)
    b = next(u for u in graph.logits if u.token == "B")
    paths = analysis.top_paths(graph, k=3, target=b.node_id)
    assert paths and all(p.node_ids[-1] == b.node_id for p in paths)
    with pytest.raises(InvalidArgument):
        analysis.top_paths(graph, target="nope")
    with pytest.raises(InvalidArgument):
        analysis.top_paths(graph, k=0)


def test_label_graph_from_file_marks_the_rest_unlabelled(tmp_path) -> None:
    graph = random_dag_graph(2)
    labelled_key = graph.neurons[0].key
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"layer": labelled_key[0], "neuron": labelled_key[1], "label": "capital cities"}) + "\n")
    with ExitStack() as stack:
        named = analysis.configured_label_sources(LabelingSection(method="file", labels_file=str(labels)), stack=stack)
        out, sources = analysis.label_graph(graph, named)
    assert set(sources) == {u.node_id for u in graph.neurons}
    for unit in out.neurons:
        if unit.key == labelled_key:
            assert unit.label == "capital cities" and sources[unit.node_id] == "file"
        else:
            assert unit.label == "" and sources[unit.node_id] == analysis.UNLABELLED
            assert [lab.source for lab in unit.labels] == [analysis.UNLABELLED]
    # the marker survives the legacy JSON round trip
    back = Graph.from_legacy(out.to_legacy())
    assert sum(1 for u in back.neurons if any(lab.source == "unlabelled" for lab in u.labels)) == len(graph.neurons) - sum(
        1 for u in graph.neurons if u.key == labelled_key)


def test_clusters_become_supernodes() -> None:
    graph = random_dag_graph(3, per_layer=6, n_pos=4, p_edge=0.6)
    clusters = analysis.cluster_graph(graph)
    assert clusters, "a connected random graph must yield at least one cluster"
    node_ids = [n for c in clusters for n in c.node_ids]
    assert len(node_ids) == len(set(node_ids)), "clusters must not overlap"
    assert set(node_ids) <= {u.node_id for u in graph.neurons}
    assert [c.mean_layer for c in clusters] == sorted(c.mean_layer for c in clusters)
    out = analysis.with_clusters(graph, clusters)
    legacy = out.to_legacy()
    supernodes = legacy["qParams"]["supernodes"]
    assert [s[0] for s in supernodes] == [c.name for c in clusters]
    assert sorted(n for s in supernodes for n in s[1:]) == sorted(node_ids)
    cluster_of = {n["node_id"]: n.get("cluster") for n in legacy["nodes"]}
    for c in clusters:
        assert all(cluster_of[n] == c.cluster_id for n in c.node_ids)


def test_llm_skipped_without_key(monkeypatch) -> None:
    monkeypatch.delenv("CIRCUITS_TEST_NO_SUCH_KEY", raising=False)
    graph = random_dag_graph(4)
    result = analysis.llm_analysis(graph, [], [], LabelingSection(api_key_env="CIRCUITS_TEST_NO_SUCH_KEY"))
    assert result.status == "skipped" and "CIRCUITS_TEST_NO_SUCH_KEY" in result.reason
    off = analysis.llm_analysis(graph, [], [], LabelingSection(), enabled=False)
    assert off.status == "skipped" and "disabled" in off.reason


@pytest.mark.parametrize("backend", ["anthropic", "openai"])
def test_llm_analysis_through_stub(backend: str, monkeypatch) -> None:
    monkeypatch.setenv("CIRCUITS_TEST_LLM_KEY", "sk-test")
    graph = random_dag_graph(5)
    clusters = analysis.cluster_graph(graph)
    paths = analysis.top_paths(graph, k=3)
    with StubLLM() as stub:
        base = stub.anthropic_base_url if backend == "anthropic" else stub.openai_base_url
        labeling = LabelingSection(backend=backend, model="stub-model", base_url=base,
                                   api_key_env="CIRCUITS_TEST_LLM_KEY", max_retries=0, request_timeout=10)
        result = analysis.llm_analysis(graph, clusters, paths, labeling)
    assert result.status == "ok", result.reason
    assert "STUB-ANALYSIS" in result.text
    assert len(stub.requests) == 1
    body = json.dumps(stub.requests[0]["body"])
    assert "stub-model" in body and "t0 t1 t2" in body
    for c in clusters:
        assert c.name in body, "every cluster is described to the LLM"


def test_llm_failure_is_reported_not_raised(monkeypatch) -> None:
    monkeypatch.setenv("CIRCUITS_TEST_LLM_KEY", "sk-test")
    with StubLLM(fail_status=500) as stub:
        labeling = LabelingSection(backend="openai", model="m", base_url=stub.openai_base_url,
                                   api_key_env="CIRCUITS_TEST_LLM_KEY", max_retries=0, request_timeout=10)
        result = analysis.llm_analysis(random_dag_graph(0), [], [], labeling)
    assert result.status == "failed" and result.reason


class PlantedAtlas:
    """An atlas holding one labelled unit (the get_unit of CircuitDatabase / AtlasClient)."""

    def __init__(self, unit: Unit) -> None:
        self.unit = unit
        self.asked: list[tuple[int, int]] = []

    def get_unit(self, layer: int, index: int) -> Unit | None:
        self.asked.append((layer, index))
        return self.unit if (layer, index) == self.unit.key else None


def test_atlas_labels_come_first(tmp_path) -> None:
    """The atlas's labels win over the label file; the file fills the rest; others are unlabelled."""
    graph = random_dag_graph(6)
    first, second = graph.neurons[0].key, graph.neurons[1].key
    atlas = PlantedAtlas(Unit(layer=first[0], index=first[1], label="ATLAS-LABEL", input_label="ATLAS-INPUT"))
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join(json.dumps({"layer": k[0], "neuron": k[1], "label": "FILE-LABEL"}) for k in (first, second)))
    with ExitStack() as stack:
        named = analysis.configured_label_sources(
            LabelingSection(method="file", labels_file=str(labels)), stack=stack, atlas=atlas
        )
        assert [n.name for n in named] == ["atlas", "file"]
        out, sources = analysis.label_graph(graph, named)
    assert set(atlas.asked) == {u.key for u in graph.neurons}
    for unit in out.neurons:
        if unit.key == first:
            assert (unit.label, unit.input_label, sources[unit.node_id]) == ("ATLAS-LABEL", "ATLAS-INPUT", "atlas")
        elif unit.key == second:
            assert (unit.label, sources[unit.node_id]) == ("FILE-LABEL", "file")
        else:
            assert sources[unit.node_id] == analysis.UNLABELLED


def test_a_failing_label_source_is_skipped_with_a_warning() -> None:
    from circuits_core.errors import Unavailable

    class Down:
        def labels_for(self, keys):
            raise Unavailable("database is down")

    graph = random_dag_graph(7)
    planted = {graph.neurons[0].key: "planted"}

    class Planted:
        def labels_for(self, keys):
            return {k: v for k, v in planted.items() if k in keys}

    warnings: list[str] = []
    named = [analysis.NamedLabelSource(name="neurondb", source=Down()), analysis.NamedLabelSource(name="file", source=Planted())]
    out, sources = analysis.label_graph(graph, named, warn=warnings.append)
    assert warnings == ["label source neurondb skipped: database is down"]
    assert out.neurons[0].label == "planted" and sources[out.neurons[0].node_id] == "file"


def test_the_cluster_source_is_injected() -> None:
    """analyze_graph clusters with the given clusterer (the atlas's Infomap one by default)."""
    graph = random_dag_graph(8, per_layer=4)
    neurons = [u.node_id for u in graph.neurons]
    halves = [("1", neurons[: len(neurons) // 2]), ("2", neurons[len(neurons) // 2:])]
    result = analysis.analyze_graph(graph, clusterer=lambda g: halves, settings=analysis.AnalysisSettings(use_llm=False))
    assert [c.node_ids for c in sorted(result.clusters, key=lambda c: c.cluster_id)] == [tuple(h) for _, h in halves]
    assert {u.cluster for u in result.graph.neurons} == {"1", "2"}
    default = analysis.analyze_graph(graph, settings=analysis.AnalysisSettings(use_llm=False))
    assert [c.node_ids for c in default.clusters] == [c.node_ids for c in analysis.cluster_graph(graph)]

"""The fields circuit-tracer's and Neuronpedia's viewers read: scan ids, logit clerps, the
graph-metadata.json index, and files written before these fields existed."""

from __future__ import annotations

import copy
import json
import multiprocessing
from pathlib import Path

import pytest
from viewer_requirements import NP_ID, circuit_tracer_problems, graph_index_problems, viewer_problems

from circuits_core.errors import CorruptInput
from circuits_core.graph_index import INDEX_NAME, index_entry, read_graph_index, rebuild_graph_index, update_graph_index
from circuits_core.graphio import read_graph, write_graph
from circuits_core.graphio import write_json
from circuits_core.schemas import Edge, Graph, GraphMetadata, Unit
from circuits_core.viewers import logit_clerp, parse_logit_clerp, scan_id


@pytest.mark.parametrize(
    ("model", "scan"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", "llama3.1-8b-it"),
        ("meta-llama/Llama-3.1-8B", "llama3.1-8b"),
        ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama3.1-8b-it"),
        ("Qwen/Qwen3-32B", "qwen3-32b"),
        ("allenai/Olmo-3-1025-7B", "olmo-3-1025-7b"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
        ("/data/models/My Model (v2)/", "my-model-v2"),
        ("llama3.1-8b-it", "llama3.1-8b-it"),
        ("///", "model"),
    ],
)
def test_scan_ids_are_neuronpedia_model_ids_or_sanitized(model: str, scan: str) -> None:
    assert scan_id(model) == scan
    assert NP_ID.match(scan) and scan_id(scan) == scan


def test_logit_clerps_in_both_forms() -> None:
    assert logit_clerp(" Paris", 0.7725) == 'Output " Paris" (p=0.772)'
    assert parse_logit_clerp('Output " Paris" (p=0.772)') == (" Paris", 0.772)
    assert parse_logit_clerp('Output """ (p=0.5)') == ('"', 0.5)  # the token may itself be a quote
    assert parse_logit_clerp(" Paris (p=0.7725)") == (" Paris", 0.7725)  # files written before
    assert parse_logit_clerp("Output \"x\" (p=nan)") == ("x", None)
    assert parse_logit_clerp("no probability") == ("no probability", None)


def _small_graph(prompt: str = "The capital of France is", **metadata) -> Graph:
    units = (
        Unit(layer=-1, index=504, position=0, kind="embedding", token="The", activation=1.0, attribution=0.4),
        Unit(layer=3, index=11, position=0, activation=1.5, attribution=-0.25, label="capital cities"),
        Unit(layer=5, index=9, position=0, activation=0.5, attribution=0.75),
        Unit(layer=6, index=7, position=0, kind="logit", token=" Paris", probability=0.8, attribution=12.0),
    )
    edges = (
        Edge(src_layer=-1, src_index=504, src_position=0, tgt_layer=3, tgt_index=11, tgt_position=0, weight=-0.2),
        Edge(src_layer=3, src_index=11, src_position=0, tgt_layer=5, tgt_index=9, tgt_position=0, weight=0.1),
        Edge(src_layer=5, src_index=9, src_position=0, tgt_layer=6, tgt_index=7, tgt_position=0, weight=0.7),
        Edge(src_layer=3, src_index=11, src_position=0, tgt_layer=6, tgt_index=7, tgt_position=0, weight=-0.3),
    )
    return Graph(units=units, edges=edges, prompt=prompt, prompt_tokens=("The",), model="HuggingFaceTB/SmolLM2-135M-Instruct",
                 metadata=GraphMetadata(node_threshold=0.005, **metadata))


def test_written_graph_passes_both_viewers_and_keeps_tau() -> None:
    legacy = _small_graph().to_legacy()
    assert viewer_problems(legacy) == []
    meta = legacy["metadata"]
    assert meta["scan"] == "smollm2-135m-instruct" and meta["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["node_threshold"] == 0.8 and meta["generation_settings"]["node_threshold"] == 0.005
    assert Graph.from_legacy(legacy).metadata.node_threshold == 0.005
    # the checker itself catches each of the four defects
    for mutate in (
        lambda d: d["metadata"].__setitem__("scan", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        lambda d: d["nodes"][3].__setitem__("clerp", " Paris (p=0.8000)"),
        lambda d: d["nodes"][1].__setitem__("influence", -0.25),
        lambda d: d["metadata"].pop("transcoder_list"),
        lambda d: d["qParams"].pop("sg_pos"),
        lambda d: d["nodes"][3].__setitem__("token_prob", None),
    ):
        broken = copy.deepcopy(legacy)
        mutate(broken)
        assert viewer_problems(broken), mutate


def test_a_custom_pruning_fraction_round_trips() -> None:
    graph = _small_graph()
    graph = Graph(units=graph.units, edges=graph.edges, prompt=graph.prompt, prompt_tokens=graph.prompt_tokens,
                  metadata=GraphMetadata(slug="s", scan="m", extra={"pruning_settings": {"node_threshold": 0.6}}))
    legacy = graph.to_legacy()
    assert legacy["metadata"]["node_threshold"] == 0.6
    assert Graph.from_legacy(legacy) == graph and Graph.from_legacy(legacy).to_legacy() == legacy


def test_files_written_before_the_viewer_fields_still_read() -> None:
    # relp-spec §E.3 as our writer produced it before: signed score in `influence`, tau in
    # node_threshold, hub id in scan, logit clerp without "Output".
    old = {
        "metadata": {
            "slug": "relp-the-capital-of-france-is", "scan": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "prompt": "The capital of France is", "prompt_tokens": ["The"], "node_threshold": 0.005,
            "generation_settings": {"max_n_logits": 1, "node_threshold": 0.005, "metric_value": 17.42},
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both"},
        "nodes": [
            {"node_id": "24_5326_0", "feature": 5326, "layer": "24", "ctx_idx": 0, "feature_type": "mlp_neuron",
             "jsNodeId": "24_5326_0", "clerp": "L24/N5326: capital cities", "influence": -0.913, "activation": 1.87},
            {"node_id": "L_12366_0", "feature": 12366, "layer": "25", "ctx_idx": 0, "feature_type": "logit",
             "jsNodeId": "L_12366_0", "clerp": " Paris (p=0.8731)", "influence": None, "activation": None, "isLogit": True},
        ],
        "links": [{"source": "24_5326_0", "target": "L_12366_0", "weight": 0.913}],
    }
    graph = Graph.from_legacy(old)
    neuron, logit = graph.units
    assert neuron.attribution == -0.913 and neuron.label == "capital cities"
    assert logit.token == " Paris" and logit.probability == 0.8731
    assert graph.metadata.node_threshold == 0.005
    new = graph.to_legacy()
    assert viewer_problems(new) == []
    assert new["nodes"][0]["attribution"] == -0.913 and new["nodes"][0]["influence"] == 1.0
    assert new["metadata"]["scan"] == "smollm2-135m-instruct"
    assert new["metadata"]["node_threshold"] == 0.8 and new["metadata"]["generation_settings"]["node_threshold"] == 0.005


def test_pb_graphs_written_as_json_get_a_valid_scan(tmp_path: Path) -> None:
    graph = _small_graph(scan="meta-llama/Llama-3.1-8B-Instruct")
    back = read_graph(write_graph(graph, tmp_path / "g.pb.gz"))
    legacy = json.loads(write_graph(back, tmp_path / "g.json").read_text())
    assert legacy["metadata"]["scan"] == "llama3.1-8b-it" and circuit_tracer_problems(legacy) == []


# -- graph-metadata.json ------------------------------------------------------------------------
def _write(folder: Path, slug: str, prompt: str) -> dict:
    legacy = _small_graph(prompt, slug=slug).to_legacy()
    write_json(legacy, folder / f"{slug}.json")
    return legacy


def test_index_lists_each_slug_once_and_satisfies_the_frontend(tmp_path: Path) -> None:
    first = _write(tmp_path, "relp-a", "A?")
    update_graph_index(tmp_path, index_entry(first))
    second = _write(tmp_path, "relp-b", "B?")
    update_graph_index(tmp_path, index_entry(second))
    again = _write(tmp_path, "relp-a", "A again?")
    update_graph_index(tmp_path, index_entry(again))
    entries = read_graph_index(tmp_path)
    assert [(e["slug"], e["prompt"]) for e in entries] == [("relp-b", "B?"), ("relp-a", "A again?")]
    assert entries[0] == {"slug": "relp-b", "scan": "smollm2-135m-instruct", "prompt": "B?", "prompt_tokens": ["The"],
                          "transcoder_list": [], "node_threshold": 0.8}
    assert graph_index_problems(json.loads((tmp_path / INDEX_NAME).read_text()), tmp_path) == []
    with pytest.raises(CorruptInput):
        index_entry({"metadata": {}})


def _add_many(folder: str, start: int) -> None:
    for i in range(start, start + 10):
        update_graph_index(folder, {"slug": f"g{i}", "scan": "m", "prompt": str(i), "prompt_tokens": [],
                                    "transcoder_list": [], "node_threshold": 0.8})


def test_concurrent_writers_lose_no_entry(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_many, args=(str(tmp_path), 10 * k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(e["slug"] for e in read_graph_index(tmp_path)) == sorted(f"g{i}" for i in range(40))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_corrupt_index_is_rebuilt_from_the_graph_files(tmp_path: Path) -> None:
    _write(tmp_path, "relp-a", "A?")
    (tmp_path / "not-a-graph.json").write_text("{")
    (tmp_path / INDEX_NAME).write_text('{"graphs": [')
    with pytest.raises(CorruptInput, match=INDEX_NAME):
        read_graph_index(tmp_path)
    update_graph_index(tmp_path, index_entry(_write(tmp_path, "relp-b", "B?")))
    assert sorted(e["slug"] for e in read_graph_index(tmp_path)) == ["relp-a", "relp-b"]
    (tmp_path / INDEX_NAME).unlink()
    rebuild_graph_index(tmp_path)
    assert sorted(e["slug"] for e in read_graph_index(tmp_path)) == ["relp-a", "relp-b"]


def test_slugs_are_ascii_ids() -> None:
    from circuits_core.schemas import slugify
    from circuits_core.viewers import slug_id

    assert slugify("Quelle est la capitale de la Région ?") == "quelle-est-la-capitale-de-la-region"
    assert slugify("東京") == "graph"
    assert slug_id("relp-ok_1.2") == "relp-ok_1.2" and slug_id("my run/été") == "my-run-ete"
    legacy = _small_graph(slug="ünïcode slug").to_legacy()
    assert legacy["metadata"]["slug"] == "unicode-slug" and viewer_problems(legacy) == []

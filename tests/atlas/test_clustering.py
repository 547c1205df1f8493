"""Infomap clustering: planted structure, the §G filtering rules (brute force), determinism."""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest

import circuits
from circuits_core.errors import InvalidArgument
from circuits_core.schemas import Edge, Graph, Unit
from circuits_atlas import cluster_full_model, cluster_graph
from circuits_atlas.clustering import full_model_network, is_special_position


def _group_of(planted: dict) -> dict[tuple[int, int], str]:
    return {unit: text for text, units in planted.items() for unit in units}


def test_lazy_reexport_is_the_same_function() -> None:
    assert circuits.cluster_full_model is cluster_full_model


def test_planted_groups_never_share_a_top_cluster(planted_export, planted_groups) -> None:
    result = cluster_full_model(planted_export / "edges.parquet", planted_export / "units.parquet", num_trials=4)
    group_of = _group_of(planted_groups)
    groups_per_top: dict[int, set[str]] = defaultdict(set)
    for layer, neuron, path in zip(result.layers.tolist(), result.neurons.tolist(), result.paths):
        groups_per_top[path[0]].add(group_of[(layer, neuron)])
    assert len(result) == sum(len(v) for v in planted_groups.values())
    assert all(len(g) == 1 for g in groups_per_top.values()), groups_per_top
    assert {g for gs in groups_per_top.values() for g in gs} == set(planted_groups)
    stats = result.stats()
    assert stats["clustered_units"] == len(result)
    assert sum(c["size"] for c in stats["top_clusters"]) == len(result)
    assignments = result.assignments()
    some = assignments["L0/N10"]
    assert set(some) == {"path", "top", "sub", "subsub", "depth", "flow"}
    assert some["depth"] == len(some["path"].split("."))


def test_same_seed_same_clusters_even_with_shuffled_input(planted_export) -> None:
    table = pq.read_table(planted_export / "edges.parquet")
    units = pq.read_table(planted_export / "units.parquet")
    first = cluster_full_model(table, units, num_trials=3, seed=7)
    perm = np.random.default_rng(1).permutation(table.num_rows)
    shuffled = table.take(perm)
    second = cluster_full_model(shuffled, units.take(np.random.default_rng(2).permutation(units.num_rows)), num_trials=3, seed=7)
    assert first.paths == second.paths
    assert np.array_equal(first.flows, second.flows)
    assert first.codelength == second.codelength


def _random_aggregate(seed: int):
    rng = random.Random(seed)
    units = [(l, n) for l in range(4) for n in range(12)]
    known = units[:-5]  # the last 5 units are unknown: their edges must be dropped
    edges = []
    seen = set()
    for _ in range(300):
        (sl, sn), (tl, tn) = rng.sample(units, 2)
        if sl >= tl or (sl, sn, tl, tn) in seen:
            continue
        seen.add((sl, sn, tl, tn))
        count = rng.randint(1, 9)
        ws = [rng.uniform(-1, 1) for _ in range(count)]
        edges.append(
            Edge(src_layer=sl, src_index=sn, tgt_layer=tl, tgt_index=tn, weight=sum(ws) / count, count=count,
                 weight_sum=sum(ws), weight_abs_sum=sum(abs(w) for w in ws), weight_sq_sum=sum(w * w for w in ws),
                 weight_min=min(ws), weight_max=max(ws))
        )  # fmt: skip
    return edges, [Unit(layer=l, index=n) for l, n in known]


@pytest.mark.parametrize("transform", ["abs_weight_sq", "abs_weight", "weight"])
def test_network_matches_a_brute_force_reading_of_the_spec(transform: str) -> None:
    edges, units = _random_aggregate(3)
    known = {u.key for u in units}
    kept = [e for e in edges if e.count >= 5 and (e.src_layer, e.src_index) in known and (e.tgt_layer, e.tgt_index) in known]
    degree: dict[tuple[int, int], int] = defaultdict(int)
    for e in kept:
        degree[(e.src_layer, e.src_index)] += 1
        degree[(e.tgt_layer, e.tgt_index)] += 1
    nodes = sorted(k for k, d in degree.items() if d > 1)
    index = {k: i for i, k in enumerate(nodes)}
    expected = {}
    for e in kept:
        s, t = (e.src_layer, e.src_index), (e.tgt_layer, e.tgt_index)
        if s in index and t in index:
            w = {"abs_weight_sq": (e.weight_abs_sum / e.count) ** 2, "abs_weight": e.weight_abs_sum / e.count,
                 "weight": abs(e.weight_sum / e.count)}[transform]  # fmt: skip
            if w > 0:
                expected[(index[s], index[t])] = w
    network = full_model_network(edges, units, min_edge_count=5, weight_transform=transform)
    assert list(zip(network.layers.tolist(), network.neurons.tolist())) == nodes
    got = {(int(s), int(t)): w for s, t, w in network.links.tolist()}
    assert got.keys() == expected.keys()
    for key, w in expected.items():
        assert got[key] == pytest.approx(w, rel=1e-12)


def test_every_clustered_unit_is_a_kept_node() -> None:
    edges, units = _random_aggregate(5)
    network = full_model_network(edges, units)
    result = cluster_full_model(edges, units, num_trials=2)
    linked = set(network.links[:, 0].astype(int)) | set(network.links[:, 1].astype(int))
    expected = {(int(network.layers[i]), int(network.neurons[i])) for i in linked}
    assert set(zip(result.layers.tolist(), result.neurons.tolist())) == expected
    assert all(len(p) >= 1 and min(p) >= 1 for p in result.paths)
    assert result.flows.sum() == pytest.approx(1.0, abs=1e-6)


def test_bad_settings_are_invalid_arguments() -> None:
    edges, units = _random_aggregate(1)
    with pytest.raises(InvalidArgument, match="weight_transform"):
        cluster_full_model(edges, units, weight_transform="squared")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="num_trials"):
        cluster_full_model(edges, units, num_trials=0)
    with pytest.raises(InvalidArgument, match="seed"):
        cluster_full_model(edges, units, seed=0)
    empty = cluster_full_model(edges, units, min_edge_count=1000)
    assert len(empty) == 0 and empty.stats()["total_clusters"] == 0


def _two_circuit_graph() -> Graph:
    tokens = ("<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "\n\n", "The", " enzyme", " Paris")
    units = []
    edges = []
    rng = random.Random(0)
    for group, base in ((0, 0), (1, 100)):
        members = [Unit(layer=l, index=base + j, position=6 + group, activation=1.0, attribution=0.5, label=f"g{group}")
                   for l in range(3) for j in range(5)]  # fmt: skip
        units += members
        for a in members:
            for b in members:
                if b.layer == a.layer + 1:
                    edges.append(Edge(src_layer=a.layer, src_index=a.index, src_position=a.position,
                                      tgt_layer=b.layer, tgt_index=b.index, tgt_position=b.position,
                                      weight=rng.uniform(0.5, 1.0)))  # fmt: skip
    special = Unit(layer=0, index=500, position=1, activation=1.0)  # at a chat marker
    units.append(special)
    edges.append(Edge(src_layer=0, src_index=500, src_position=1, tgt_layer=1, tgt_index=0, tgt_position=6, weight=5.0))
    units.append(Unit(layer=-1, index=42, position=5, kind="embedding", token="The"))
    units.append(Unit(layer=3, index=7, position=7, kind="logit", token=" Paris", probability=0.75))
    return Graph(units=tuple(units), edges=tuple(edges), prompt_tokens=tokens)


def test_cluster_graph_separates_circuits_and_skips_special_positions() -> None:
    graph = _two_circuit_graph()
    result = cluster_graph(graph, num_trials=3)
    members = [m for c in result.clusters for m in c.members]
    assert all(m.neuron != 500 for m in members)  # chat-marker position skipped
    assert len(members) == 30
    for c in result.clusters:
        assert len({m.label for m in c.members}) == 1, c.cluster_id
    assert [c.mean_layer for c in result.clusters] == sorted(c.mean_layer for c in result.clusters)
    assert result.logits == ((" Paris", 0.75),)
    assert cluster_graph(graph, num_trials=3) == result  # deterministic
    kept = cluster_graph(graph, num_trials=3, skip_special_positions=False)
    assert any(m.neuron == 500 for c in kept.clusters for m in c.members)
    data = result.to_json()
    assert data["clusters"][0]["members"][0]["token"] in graph.prompt_tokens


def test_special_positions() -> None:
    tokens = ("<|begin_of_text|>", "system", "\n", "Hello", " assistant", "\n")
    assert [is_special_position(tokens, i) for i in range(6)] == [True, True, True, False, True, True]
    assert not is_special_position(tokens, None)

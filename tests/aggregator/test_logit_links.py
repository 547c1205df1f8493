"""Neuron -> logit links: a separate table (token, count, mean weight), exactly once, through both
graph encodings, compaction, export and shard merge, against a brute-force recount."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest

from circuits_core.aggregator_types import graph_arrays_from_graph
from circuits_core.graphio import write_graph
from circuits_core.viewers import parse_logit_clerp
from circuits_core.schemas import Edge, Graph, Unit
from circuits_aggregator import AggregateStore, StoreSettings, aggregate_directory, merge_exports
from circuits_aggregator.testing import random_graph


def with_logits(rng: np.random.Generator, graph_id: str) -> Graph:
    """A random graph plus two logit units and several neuron -> logit (and logit -> neuron) links."""
    g = random_graph(rng, graph_id=graph_id, n_neurons=8, pool=12)
    neurons = [u for u in g.units if u.kind == "neuron"]
    logits = [Unit(layer=5, index=200 + int(t), position=3, kind="logit", token=f" tok{t}", probability=0.3)
              for t in rng.choice(6, size=2, replace=False)]
    edges = list(g.edges)
    for _ in range(6):
        a = neurons[int(rng.integers(len(neurons)))]
        b = logits[int(rng.integers(2))]
        edges.append(Edge(src_layer=a.layer, src_index=a.index, src_position=a.position, tgt_layer=b.layer,
                          tgt_index=b.index, tgt_position=b.position, weight=float(rng.normal())))
    b = logits[0]  # a backwards link must not count
    edges.append(Edge(src_layer=b.layer, src_index=b.index, src_position=b.position, tgt_layer=neurons[0].layer,
                      tgt_index=neurons[0].index, tgt_position=neurons[0].position, weight=1.0))
    return Graph(units=(*g.units, *logits), edges=tuple(edges), graph_id=graph_id, prompt="p", model="m")


def brute_force(graphs: list[Graph]) -> dict:
    out: dict = defaultdict(lambda: [0, 0.0, 0.0, ""])
    seen = set()
    for g in graphs:
        if g.graph_id in seen:
            continue
        seen.add(g.graph_id)
        kind = {u.node_key: u for u in g.units}
        for e in g.edges:
            src, tgt = kind[e.src_key], kind[e.tgt_key]
            if src.kind == "neuron" and tgt.kind == "logit":
                rec = out[(e.src_layer, e.src_index, e.tgt_index)]
                rec[0] += 1
                rec[1] += e.weight
                rec[2] += abs(e.weight)
                rec[3] = tgt.token
    return dict(out)


def table_rows(table) -> dict:
    d = table.to_pydict()
    return {(l, n, t): [c, s, a, tok] for l, n, t, tok, c, s, a in zip(
        d["src_layer"], d["src_neuron"], d["token_id"], d["token"], d["count"], d["weight_sum"], d["weight_abs_sum"])}


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, (c, s, a, tok) in want.items():
        assert got[key][0] == c and got[key][3] == tok
        assert got[key][1] == pytest.approx(s, abs=1e-9) and got[key][2] == pytest.approx(a, abs=1e-9)


def test_logit_links_are_counted_once_through_compaction_export_and_merge(tmp_path):
    rng = np.random.default_rng(7)
    graphs = [with_logits(rng, f"g{i}") for i in range(30)]
    want = brute_force(graphs)
    assert want and any(rec[0] > 1 for rec in want.values())
    with AggregateStore(tmp_path / "one.duckdb", StoreSettings(compact_min_rows=50, compact_growth=0.5)) as store:
        for start in range(0, 30, 7):
            store.ingest([graph_arrays_from_graph(g) for g in graphs[start : start + 7]])
        store.ingest([graph_arrays_from_graph(g) for g in graphs[:10]])  # re-sent: counted once
        assert_same(table_rows(store.logit_table()), want)
        store.compact()
        assert_same(table_rows(store.logit_table()), want)
        store.export(tmp_path / "one")
    assert_same(table_rows(pq.read_table(tmp_path / "one" / "logits.parquet")), want)
    # Two shards, merged: the same table.
    parts = []
    for shard in range(2):
        with AggregateStore(tmp_path / f"s{shard}.duckdb", StoreSettings(shard_index=shard, shard_count=2)) as store:
            store.ingest([graph_arrays_from_graph(g) for g in graphs])
            parts.append(store.export(tmp_path / f"s{shard}")[0].parent)
    merge_exports(parts, tmp_path / "merged")
    assert_same(table_rows(pq.read_table(tmp_path / "merged" / "logits.parquet")), want)


def test_legacy_json_and_protobuf_files_give_the_same_logit_links(tmp_path):
    rng = np.random.default_rng(3)
    graphs = [with_logits(rng, f"h{i}") for i in range(6)]
    for i, g in enumerate(graphs):
        write_graph(g, tmp_path / ("json" if i % 2 else "pb") / f"graph_{i}.{'json' if i % 2 else 'pb.gz'}")
    with AggregateStore(tmp_path / "agg.duckdb") as store:
        aggregate_directory(store, tmp_path / "json", progress=False)
        aggregate_directory(store, tmp_path / "pb", progress=False)
        got = table_rows(store.logit_table())
    want = brute_force(graphs)
    # Legacy JSON carries the token in the clerp ("tok (p=0.3000)" / 'Output "tok" (p=...)').
    assert_same(got, want)
    assert parse_logit_clerp('Output " Paris" (p=0.8731)') == (" Paris", 0.8731)
    assert parse_logit_clerp(" Paris (p=0.8731)") == (" Paris", 0.8731)


def test_merge_accepts_exports_without_logit_links(tmp_path):
    rng = np.random.default_rng(1)
    with AggregateStore(tmp_path / "a.duckdb") as store:
        store.ingest([graph_arrays_from_graph(with_logits(rng, "x1"))])
        store.export(tmp_path / "a")
    with AggregateStore(tmp_path / "b.duckdb") as store:
        store.ingest([graph_arrays_from_graph(with_logits(rng, "x2"))])
        store.export(tmp_path / "b")
    (tmp_path / "b" / "logits.parquet").unlink()  # an export from before logit links existed
    merge_exports([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    merged = table_rows(pq.read_table(tmp_path / "m" / "logits.parquet"))
    assert merged == table_rows(pq.read_table(tmp_path / "a" / "logits.parquet"))

"""The engine against brute force: exactly-once statistics, dedupe, shards, compaction, merge."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuits_core.aggregator_types import shard_of
from circuits_core.errors import FailedPrecondition, InvalidArgument
from circuits_core.schemas import Edge, Graph, Unit
from circuits_aggregator import AggregateStore, InMemoryAggregator, StoreSettings, merge_exports
from circuits_aggregator import store as store_module
from circuits_core.aggregator_types import graph_arrays_from_graph
from circuits_aggregator.testing import random_graph

weights = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_subnormal=False)
maybe = st.one_of(st.none(), weights)


@st.composite
def graphs(draw: st.DrawFn, graph_id: str) -> Graph:
    """A graph over a tiny key space (so edges repeat across graphs), with embeddings and logits."""
    raw_units = draw(st.lists(
        st.tuples(st.sampled_from(["neuron", "neuron", "neuron", "embedding", "logit"]),
                  st.integers(0, 2), st.integers(0, 3), st.integers(0, 2), maybe, maybe),
        min_size=1, max_size=10,
    ))  # fmt: skip
    units, keys = [], set()
    for kind, layer, index, pos, act, attr in raw_units:
        layer = {"neuron": layer, "embedding": -1, "logit": 3}[kind]
        if (layer, index, pos) in keys:
            continue
        keys.add((layer, index, pos))
        units.append(Unit(layer=layer, index=index, position=pos, kind=kind, activation=act, attribution=attr))
    pairs = draw(st.lists(st.tuples(st.integers(0, len(units) - 1), st.integers(0, len(units) - 1), weights), max_size=25))
    edges = [
        Edge(src_layer=units[s].layer, src_index=units[s].index, src_position=units[s].position,
             tgt_layer=units[t].layer, tgt_index=units[t].index, tgt_position=units[t].position, weight=w)
        for s, t, w in pairs
    ]  # fmt: skip
    return Graph(units=tuple(units), edges=tuple(edges), graph_id=graph_id, prompt="p")


@st.composite
def corpora(draw: st.DrawFn) -> list[Graph]:
    n = draw(st.integers(1, 8))
    corpus = [draw(graphs(f"g{i}")) for i in range(n)]
    # Re-sent graphs (same id, same content) anywhere in the stream must count once.
    repeats = draw(st.lists(st.integers(0, n - 1), max_size=4))
    return corpus + [corpus[i] for i in repeats]


def _rows(store: AggregateStore) -> tuple[list[dict], list[dict]]:
    cols = store.edge_columns(min_count=1)
    edges = [dict(zip(("src_layer", "src_neuron", "tgt_layer", "tgt_neuron", "count", "weight_sum",
                        "weight_abs_sum", "weight_sq_sum", "weight_min", "weight_max"), row))
             for row in zip(*(getattr(cols, n).tolist() for n in ("src_layer", "src_neuron", "tgt_layer", "tgt_neuron",
                                                                    "count", "weight_sum", "weight_abs_sum", "weight_sq_sum",
                                                                    "weight_min", "weight_max")))]  # fmt: skip
    return edges, store.unit_table().to_pylist()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpus=corpora(), batch=st.integers(1, 5), compact=st.booleans())
def test_statistics_equal_brute_force(brute, corpus: list[Graph], batch: int, compact: bool) -> None:
    store = AggregateStore(settings=StoreSettings(compact_min_rows=1 if compact else 10**9))
    arrays = [graph_arrays_from_graph(g) for g in corpus]
    for start in range(0, len(arrays), batch):
        store.ingest(arrays[start : start + batch])
    edges, units = _rows(store)
    brute.assert_matches(edges, units, corpus)
    stats = store.stats()
    assert stats.graphs_processed == len({g.graph_id for g in corpus})
    assert stats.total_edge_observations == sum(r["count"] for r in edges)
    store.close()


def test_reingest_counts_once_and_reports_duplicates(brute) -> None:
    rng = np.random.default_rng(3)
    corpus = [random_graph(rng) for _ in range(20)]
    store = AggregateStore()
    arrays = [graph_arrays_from_graph(g) for g in corpus]
    first = store.ingest(arrays[:15])
    assert first.duplicates == 0 and first.graphs_total == 15
    again = store.ingest(arrays[10:] + arrays[:3] + arrays[19:])  # 10..19 (10..14 known), 0..2 known, 19 twice
    assert again.graphs_total == 20
    assert again.duplicates == 5 + 3 + 1
    assert set(again.graph_ids) == {g.graph_id for g in corpus[10:]} | {g.graph_id for g in corpus[:3]}
    brute.assert_matches(*_rows(store), corpus)


@pytest.mark.parametrize("pass_rows", [4_000_000, 7])  # one merge pass; many hash-partition passes
def test_compaction_keeps_statistics(brute, pass_rows) -> None:
    rng = np.random.default_rng(4)
    corpus = [random_graph(rng) for _ in range(30)]
    store = AggregateStore(settings=StoreSettings(compact_min_rows=10**9, compact_pass_rows=pass_rows))
    for g in corpus[:20]:
        store.ingest([graph_arrays_from_graph(g)])
    before = _rows(store)
    store.compact()
    assert store._con.execute("SELECT count(*) FROM edge_delta").fetchone()[0] == 0
    assert store._con.execute("SELECT count(*) FROM edge_single").fetchone()[0] == 0
    after = _rows(store)
    assert sorted(map(str, before[1])) == sorted(map(str, after[1]))
    brute.assert_matches(*after, corpus[:20])
    # a second compaction merges the compacted rows with new deltas (and a re-sent graph counts once)
    store.ingest([graph_arrays_from_graph(g) for g in corpus[15:]])
    store.compact()
    edges, units = _rows(store)
    assert len({(r["src_layer"], r["src_neuron"], r["tgt_layer"], r["tgt_neuron"]) for r in edges}) == len(edges)
    brute.assert_matches(edges, units, corpus)


def test_empty_graph_id_is_invalid() -> None:
    rng = np.random.default_rng(5)
    arrays = graph_arrays_from_graph(random_graph(rng, graph_id="x"))
    from dataclasses import replace

    with pytest.raises(InvalidArgument, match="graph_id"):
        AggregateStore().ingest([replace(arrays, graph_id="")])


def test_layers_and_indices_must_fit_the_keys() -> None:
    bad = Graph(units=(Unit(layer=5000, index=1, position=0),), graph_id="big")
    with pytest.raises(InvalidArgument, match="layers"):
        graph_arrays_from_graph(bad)


def test_shards_partition_graphs_and_merge_equals_single_pass(tmp_path, brute) -> None:
    rng = np.random.default_rng(6)
    corpus = [random_graph(rng) for _ in range(40)]
    arrays = [graph_arrays_from_graph(g) for g in corpus]
    exports = []
    for shard in range(3):
        store = AggregateStore(tmp_path / f"s{shard}.duckdb", StoreSettings(shard_index=shard, shard_count=3))
        ack = store.ingest(arrays)
        owned = {g.graph_id for g in corpus if shard_of(g.graph_id, 3) == shard}
        assert set(ack.graph_ids) == owned
        assert set(ack.rejected_graph_ids) == {g.graph_id for g in corpus} - owned
        assert store.graphs_total == len(owned)
        exports.append(store.export(tmp_path / f"e{shard}")[0].parent)
        store.close()
    merged = merge_exports(exports, tmp_path / "merged")
    edges, units, ledger = brute.export_rows(merged[0].parent)
    brute.assert_matches(edges, units, corpus)
    assert sorted(r["graph_id"] for r in ledger) == sorted(g.graph_id for g in corpus)
    with pytest.raises(InvalidArgument, match="more than one export"):
        merge_exports([exports[0], exports[0]], tmp_path / "twice")


def test_state_remembers_its_shard(tmp_path) -> None:
    AggregateStore(tmp_path / "s.duckdb", StoreSettings(shard_index=1, shard_count=2)).close()
    with pytest.raises(FailedPrecondition, match="shard 1 of 2"):
        AggregateStore(tmp_path / "s.duckdb", StoreSettings(shard_index=0, shard_count=2))


def test_export_schema_is_what_the_atlas_reads(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with InMemoryAggregator() as agg:
        agg.add_graph(random_graph(np.random.default_rng(7), corpus_index=42))
        agg.export(tmp_path)
    edges = pq.read_schema(tmp_path / "edges.parquet")
    assert edges.names == ["src_layer", "src_neuron", "tgt_layer", "tgt_neuron", "count", "weight_sum",
                           "weight_abs_sum", "weight_sq_sum", "weight_min", "weight_max"]  # fmt: skip
    assert [edges.field(n).type for n in edges.names] == [pa.int32()] * 4 + [pa.int64()] + [pa.float64()] * 5
    units = pq.read_schema(tmp_path / "units.parquet")
    assert units.names == ["layer", "neuron", "graph_count", "observation_count", "act_sum", "act_sq_sum", "act_min",
                           "act_max", "attr_sum", "attr_abs_sum", "attr_sq_sum", "attr_min", "attr_max"]  # fmt: skip
    assert [units.field(n).type for n in units.names] == [pa.int32()] * 2 + [pa.int64()] * 2 + [pa.float64()] * 9
    ledger = pq.read_table(tmp_path / "ledger.parquet")
    assert ledger.column_names == ["graph_id", "source", "corpus_index"]
    assert ledger.column("corpus_index").to_pylist() == [42]
    assert not list(tmp_path.glob(".*.tmp"))


def test_seed_api_get_edges_and_units() -> None:
    rng = np.random.default_rng(8)
    corpus = [random_graph(rng) for _ in range(25)]
    with InMemoryAggregator() as agg:
        assert all(agg.add_graph(g) for g in corpus)
        assert not agg.add_graph(corpus[0])
        edges = agg.get_edges(min_count=5)
        assert edges and all(e.count >= 5 for e in edges)
        assert all(abs(e.weight - e.weight_sum / e.count) < 1e-12 for e in edges)
        assert [e.count for e in edges] == sorted((e.count for e in edges), reverse=True)
        units = agg.get_units()
        ref_units = {}
        for g in corpus:
            for u in g.neurons:
                ref_units.setdefault(u.key, set()).add(g.graph_id)
        assert {u.key: u.appearance_count for u in units} == {k: len(v) for k, v in ref_units.items()}
        assert agg.graphs_processed == 25


def test_compaction_spills_beside_the_state_and_cleans_up(tmp_path, brute, monkeypatch) -> None:
    """A compaction larger than one pass spills hash partitions to a folder beside the state and
    removes it; a folder left by a compaction killed midway is removed when the state is opened."""
    rng = np.random.default_rng(8)
    corpus = [random_graph(rng) for _ in range(12)]
    state = tmp_path / "state.duckdb"
    leftover = tmp_path / ".state.duckdb.compaction-killed"
    leftover.mkdir()
    (leftover / "part-00003.bin").write_bytes(b"\0" * 64)
    unrelated = tmp_path / ".other.duckdb.compaction-x"  # another state's: not touched
    unrelated.mkdir()
    seen: list[list[str]] = []
    with AggregateStore(state, StoreSettings(compact_min_rows=10**9, compact_pass_rows=50)) as store:
        assert not leftover.exists() and unrelated.exists()
        store.ingest([graph_arrays_from_graph(g) for g in corpus])
        real_take = store_module._Spill.take

        def take(self, part):  # watch the spill folder while the compaction runs
            seen.append(sorted(p.name for p in tmp_path.iterdir()))
            return real_take(self, part)

        monkeypatch.setattr(store_module._Spill, "take", take)
        store.compact()
        brute.assert_matches(*_rows(store), corpus)
    assert any(any(name.startswith(".state.duckdb.compaction-") for name in names) for names in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.duckdb.compaction-x", "state.duckdb"]


def test_checking_a_graph_does_not_wait_for_a_commit() -> None:
    """The Ingest reader checks each graph (model, shape) while the previous batch commits: the
    check takes the identity's own lock, not the write lock (waiting for it stalled decoding
    through every commit and compaction). What a commit saves of a shape learned meanwhile is not
    lost."""
    import threading
    import time
    from dataclasses import replace

    rng = np.random.default_rng(9)
    first = replace(graph_arrays_from_graph(random_graph(rng, graph_id="a")), model="m")
    second = replace(graph_arrays_from_graph(random_graph(rng, graph_id="b")), model="m", num_layers=16)
    store = AggregateStore()
    store.check_graph(first)
    version = store._identity_version
    held, release = threading.Event(), threading.Event()

    def commit_in_progress() -> None:
        with store._lock:
            held.set()
            release.wait(5)

    writer = threading.Thread(target=commit_in_progress)
    writer.start()
    held.wait(5)
    started = time.perf_counter()
    store.check_graph(second)  # learns num_layers while the "commit" holds the write lock
    waited = time.perf_counter() - started
    release.set()
    writer.join()
    assert waited < 1.0
    store._identity_saved(version)  # a commit that wrote the identity as of before the check
    assert store._identity_unsaved  # the learned shape is still to be saved
    store.ingest([second])
    assert not store._identity_unsaved
    assert store._load_identity() == {"model": "m", "num_layers": "16", "d_mlp": "0"}


def test_a_failed_compaction_keeps_the_batch_counted_and_retries_later(tmp_path, brute, monkeypatch, caplog) -> None:
    """No disk left for the compaction's spill: the batch that triggered it is committed and
    acknowledged, the compaction is rolled back and logged, reads stay exact, and the next attempt
    waits for another compact_min_rows partial rows (then succeeds once the disk has room)."""
    import errno
    import logging

    rng = np.random.default_rng(10)
    corpus = [random_graph(rng) for _ in range(16)]
    state = tmp_path / "state.duckdb"
    store = AggregateStore(state, StoreSettings(compact_min_rows=60, compact_growth=0.0, compact_pass_rows=20))
    real_add = store_module._Spill.add
    attempts: list[int] = []

    def full_disk(self, columns):
        attempts.append(store._delta_rows)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module._Spill, "add", full_disk)
    with caplog.at_level(logging.ERROR, logger="circuits.aggregator"):
        ack = store.ingest([graph_arrays_from_graph(g) for g in corpus[:4]])
    assert ack.graphs_total == 4 and len(attempts) == 1
    assert "compaction failed" in caplog.text and "No space left" in caplog.text
    assert store._con.execute("SELECT count(*) FROM edge_stats").fetchone()[0] == 0  # rolled back
    assert not list(tmp_path.glob(".state.duckdb.compaction-*"))
    brute.assert_matches(*_rows(store), corpus[:4])
    for g in corpus[4:8]:  # still no room: an attempt only every compact_min_rows (60) more partial rows
        store.ingest([graph_arrays_from_graph(g)])
    assert len(attempts) >= 2 and all(b >= a + 60 for a, b in zip(attempts, attempts[1:]))
    assert len(attempts) < 5  # not one per batch
    monkeypatch.setattr(store_module._Spill, "add", real_add)  # room again
    for g in corpus[8:]:
        store.ingest([graph_arrays_from_graph(g)])
    assert store._con.execute("SELECT count(*) FROM edge_stats").fetchone()[0] > 0  # compacted since
    brute.assert_matches(*_rows(store), corpus)
    store.close()

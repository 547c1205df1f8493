"""Evidence reader: Parquet export and atlas DuckDB agree; shards merge by summing."""

from __future__ import annotations

import duckdb
import pytest

from circuits_core.errors import CorruptInput, InvalidArgument, NotFound
from circuits_labeler.evidence import DuckDBEvidence, write_evidence_parquet

EDGES = [
    (0, 1, 1, 2, 4, 0.5), (0, 1, 1, 3, 2, -0.9), (0, 1, 2, 0, 1, 0.1), (0, 2, 1, 2, 6, 0.3), (1, 2, 2, 0, 3, 0.2),
]
UNITS = [(0, 1, 7), (0, 2, 3), (1, 2, 5), (1, 3, 1), (2, 0, 2)]


def test_parquet_neighbours_sorted_by_abs_weight(tmp_path):
    ev = DuckDBEvidence(write_evidence_parquet(tmp_path, edges=EDGES, units=UNITS))
    down = ev.downstream(0, limit=2)
    assert [(n.key, n.mean_weight, n.count) for n in down[1]] == [((1, 3), pytest.approx(-0.9), 2), ((1, 2), pytest.approx(0.5), 4)]
    up = ev.upstream(1, limit=5)
    assert sorted(up) == [2, 3] and [n.key for n in up[2]] == [(0, 1), (0, 2)]
    assert [(u.layer, u.neuron, u.appearance_count) for u in ev.units()] == UNITS
    assert ev.max_layer() == 2


def test_min_edge_count_and_shard_merge(tmp_path):
    shard_a = [e for e in EDGES if e[4] != 1]
    write_evidence_parquet(tmp_path / "shards" / "a", edges=shard_a, units=UNITS)
    write_evidence_parquet(tmp_path / "shards" / "b", edges=[(0, 1, 1, 2, 4, 0.1)])
    ev = DuckDBEvidence(tmp_path / "shards", min_edge_count=3)
    down = ev.downstream(0, limit=5)
    # (0,1)->(1,2): 4 obs at 0.5 + 4 obs at 0.1 = mean 0.3 over 8; (0,1)->(1,3) has 2 < 3 obs.
    assert [(n.key, n.count) for n in down[1]] == [((1, 2), 8)]
    assert down[1][0].mean_weight == pytest.approx(0.3)
    # units of both shards, graph counts summed; shard b knows its edge endpoints only (count 0)
    assert {(u.layer, u.neuron): u.appearance_count for u in ev.units()}[(0, 1)] == 7


def test_shards_that_share_a_graph_are_refused(tmp_path):
    write_evidence_parquet(tmp_path / "shards" / "a", edges=EDGES, units=UNITS)
    write_evidence_parquet(tmp_path / "shards" / "b", edges=EDGES, units=UNITS)
    (tmp_path / "shards" / "b" / "ledger.parquet").write_bytes((tmp_path / "shards" / "a" / "ledger.parquet").read_bytes())
    with pytest.raises(InvalidArgument, match="more than one export"):
        DuckDBEvidence(tmp_path / "shards")


def test_atlas_duckdb_matches_parquet(tmp_path):
    db = tmp_path / "atlas.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE neurons(layer INT, neuron INT, label VARCHAR, description VARCHAR, appearance_count INT)")
    con.executemany("INSERT INTO neurons VALUES (?, ?, '', ?, ?)", [(l, n, f"d{l}{n}", c) for l, n, c in UNITS])
    con.execute("CREATE TABLE edges(src_layer INT, src_neuron INT, tgt_layer INT, tgt_neuron INT, count INT, "
                "weight_sum FLOAT, mean_weight FLOAT)")
    con.executemany("INSERT INTO edges VALUES (?, ?, ?, ?, ?, ?, ?)", [(*e[:5], e[4] * e[5], e[5]) for e in EDGES])
    con.close()
    atlas = DuckDBEvidence(db)
    parquet = DuckDBEvidence(write_evidence_parquet(tmp_path / "p", edges=EDGES, units=UNITS))
    for layer in range(3):
        a, p = atlas.downstream(layer, limit=9), parquet.downstream(layer, limit=9)
        assert {k: [n.key for n in v] for k, v in a.items()} == {k: [n.key for n in v] for k, v in p.items()}
    assert atlas.units()[0].prior_description == "d01"


def test_missing_evidence_is_not_found_and_an_empty_folder_is_no_export(tmp_path):
    with pytest.raises(NotFound):
        DuckDBEvidence(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptInput, match="edges.parquet: missing from the aggregator export"):
        DuckDBEvidence(tmp_path / "empty")

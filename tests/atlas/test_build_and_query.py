"""Atlas build (tables vs SQL ground truth over the export, atomicity) and the read API."""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import defaultdict
from pathlib import Path

import duckdb
import pytest

from circuits.cli import main as cli_main
from circuits.database import CircuitDatabase as ReexportedDatabase
from circuits_core.errors import CorruptInput, DeadlineExceeded, InvalidArgument, NotFound
from circuits_atlas import CircuitDatabase, ClusterSettings, QueryLimits, build_atlas
from circuits_atlas import build as build_module


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def truth(sql: str, params: list) -> list[tuple]:
    """Ground truth straight from the Parquet export with a separate in-memory DuckDB."""
    con = duckdb.connect()
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def test_reexport() -> None:
    assert ReexportedDatabase is CircuitDatabase


def test_tables_match_the_export(planted_atlas: Path, planted_export: Path) -> None:
    con = duckdb.connect(str(planted_atlas), read_only=True)
    try:
        got = con.execute(
            "SELECT src_layer, src_neuron, tgt_layer, tgt_neuron, count, weight_sum, weight_abs_sum, weight_sq_sum, "
            "weight_min, weight_max, mean_weight, mean_abs_weight FROM edges"
        ).fetchall()
        neurons = con.execute("SELECT layer, neuron, appearance_count, label, input_label, description FROM neurons").fetchall()
        meta = dict(con.execute("SELECT key, value FROM metadata").fetchall())
        clusters = con.execute("SELECT cluster_path, level, size, layer_min, layer_max, median_layer FROM clusters").fetchall()
        members = con.execute("SELECT layer, cluster_path FROM neurons WHERE cluster_path IS NOT NULL").fetchall()
        by_target = con.execute(
            "SELECT src_layer, src_neuron, tgt_layer, tgt_neuron, count, weight_sum, weight_abs_sum, weight_sq_sum, "
            "weight_min, weight_max, mean_weight, mean_abs_weight FROM edges_by_target"
        ).fetchall()
        fts = con.execute("SELECT count(*) FROM duckdb_schemas() WHERE schema_name = 'fts_main_neurons'").fetchone()[0]
    finally:
        con.close()
    expected = truth(
        "SELECT src_layer, src_neuron, tgt_layer, tgt_neuron, count, weight_sum, weight_abs_sum, weight_sq_sum, "
        "weight_min, weight_max, weight_sum / count, weight_abs_sum / count FROM read_parquet(?) WHERE count >= 3 "
        "ORDER BY ALL",
        [str(planted_export / "edges.parquet")],
    )
    assert sorted(got) == expected
    assert [r[:2] for r in got] == sorted(r[:2] for r in got)  # physically sorted by source
    assert sorted(by_target) == expected and [r[2:4] for r in by_target] == sorted(r[2:4] for r in by_target)
    all_edges = truth("SELECT count(*) FROM read_parquet(?)", [str(planted_export / "edges.parquet")])[0][0]
    assert all_edges > len(got)  # the weak cross-group links were filtered
    units = truth("SELECT layer, neuron, graph_count FROM read_parquet(?) ORDER BY ALL", [str(planted_export / "units.parquet")])
    assert sorted(r[:3] for r in neurons) == units
    by_key = {(r[0], r[1]): r for r in neurons}
    assert by_key[(0, 10)][3] == "enzyme catalysis in biochemistry (L0)"
    assert by_key[(0, 10)][4] == "tokens about enzyme" and by_key[(0, 10)][5].startswith("Fires on")
    assert by_key[(0, 11)][4] is None  # that line had no input label
    assert by_key[(3, 93)][3] is None  # unlabeled unit still present
    assert meta["total_edges"] == str(len(got)) and meta["total_neurons"] == str(len(neurons))
    assert meta["source_graph_count"] == "24" and meta["model"] == "planted-test" and meta["min_edge_count"] == "3"
    assert meta["labeled_neurons"] == str(len(neurons) - 1) and "created" in meta and meta["clustering_seed"] == "42"
    assert meta["total_clusters"] == str(len(clusters))
    # clusters: one row per path prefix, recomputed independently from the members
    layers_by_prefix: dict[str, list[int]] = defaultdict(list)
    for layer, path in members:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            layers_by_prefix[".".join(parts[:k])].append(layer)
    assert {c[0] for c in clusters} == set(layers_by_prefix)
    for path, level, size, lo, hi, median in clusters:
        layers = layers_by_prefix[path]
        assert (level, size, lo, hi) == (len(path.split(".")), len(layers), min(layers), max(layers))
        assert median == pytest.approx(statistics.median(layers))
    assert fts == 1


def test_search_ranks_bm25_then_substring(planted_atlas: Path) -> None:
    with CircuitDatabase(planted_atlas) as db:
        hits = db.search("enzyme", 100)
        assert len(hits) == 16 and all("enzyme" in h.unit.label or "enzyme" in h.unit.input_label for h in hits)
        assert all(h.score > 0 for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert db.search_units("%enzyme%", 100) == [h.unit for h in hits]  # seed-style wildcards
        partial = db.search("apita", 5)  # not a word or stem: substring fallback, score 0
        assert len(partial) == 5 and all(h.score == 0 and "capital" in h.unit.label for h in partial)
        assert [h.unit.key for h in db.search("European capital cities", 3)][:3]
        assert db.search("zzzz-no-such-label") == []
        assert len(db.search("enzyme", 3)) == 3


@pytest.mark.parametrize("text", ["enzyme", "capital cities", "rhyming words poetry L2", "tokens about enzyme"])
def test_bm25_scores_equal_the_fts_extension_macro(planted_atlas: Path, text: str) -> None:
    """Differential check: our one-pass BM25 against the extension's own match_bm25."""
    from circuits_atlas.duck import connect

    with CircuitDatabase(planted_atlas) as db:
        ours = {h.unit.unit_id: h.score for h in db.search(text, 1000) if h.score > 0}
    con = connect(planted_atlas, read_only=True)
    theirs = dict(
        con.execute(
            "SELECT unit_id, s FROM (SELECT unit_id, fts_main_neurons.match_bm25(unit_id, ?) AS s FROM neurons) WHERE s IS NOT NULL",
            [text],
        ).fetchall()
    )
    con.close()
    assert ours.keys() == theirs.keys() and ours
    for key, score in theirs.items():
        assert ours[key] == pytest.approx(score, rel=1e-9)


@pytest.mark.parametrize("text", ["'; DROP TABLE neurons; --", "%", "_", "\\", "a' OR '1'='1", '"', "%%", "enzyme\x00"])
def test_hostile_text_is_just_text(planted_atlas: Path, text: str) -> None:
    before = sha256(planted_atlas)
    with CircuitDatabase(planted_atlas) as db:
        hits = db.search(text, 10)
        assert all(isinstance(h.score, float) for h in hits)
        if text in ("%", "_", "%%", "\\", '"'):
            assert hits == []  # literal characters, not wildcards
        assert db.stats().neurons == 48
    assert sha256(planted_atlas) == before


def test_bad_arguments(planted_atlas: Path) -> None:
    with CircuitDatabase(planted_atlas) as db:
        for bad in ("", "   ", "x" * 100_000, "bad \udcff surrogate"):
            with pytest.raises(InvalidArgument):
                db.search(bad)
        with pytest.raises(InvalidArgument):
            db.search("enzyme", -1)
        with pytest.raises(InvalidArgument):
            db.get_edges_for_unit(0, 10, direction="sideways")
        with pytest.raises(InvalidArgument):
            db.get_edges_for_unit(-1, 10)
        with pytest.raises(InvalidArgument):
            db.get_edges_for_unit(0, 10, min_count=-2)
        with pytest.raises(InvalidArgument):
            db.get_cluster("1; DROP TABLE x")
        with pytest.raises(NotFound):
            db.get_cluster("999")
        assert db.get_unit(9, 9) is None
        assert db.get_units_by_cluster(999) == []


def test_edges_for_unit_match_sql_ground_truth(planted_atlas: Path, planted_export: Path) -> None:
    parquet = str(planted_export / "edges.parquet")
    with CircuitDatabase(planted_atlas) as db:
        for layer, neuron in ((1, 11), (0, 50), (3, 93), (2, 91)):
            down = db.get_edges_for_unit(layer, neuron, "downstream", limit=1000)
            up = db.get_edges_for_unit(layer, neuron, "upstream", limit=1000)
            both = db.get_edges_for_unit(layer, neuron, limit=1000)
            assert both == down + up
            want_down = truth(
                "SELECT tgt_layer, tgt_neuron, count, weight_sum FROM read_parquet(?) "
                "WHERE src_layer = ? AND src_neuron = ? AND count >= 3 ORDER BY ALL",
                [parquet, layer, neuron],
            )
            want_up = truth(
                "SELECT src_layer, src_neuron, count, weight_sum FROM read_parquet(?) "
                "WHERE tgt_layer = ? AND tgt_neuron = ? AND count >= 3 ORDER BY ALL",
                [parquet, layer, neuron],
            )
            assert sorted((e.tgt_layer, e.tgt_index, e.count, e.weight_sum) for e in down) == want_down
            assert sorted((e.src_layer, e.src_index, e.count, e.weight_sum) for e in up) == want_up
            assert [e.count for e in down] == sorted((e.count for e in down), reverse=True)
            for e in down:
                assert e.weight == pytest.approx(e.weight_sum / e.count)
        top2 = db.get_edges_for_unit(1, 11, "downstream", limit=2)
        assert top2 == db.get_edges_for_unit(1, 11, "downstream", limit=1000)[:2]
        assert db.get_edges_for_unit(1, 11, min_count=10**6) == []


def test_clusters_and_stats(planted_atlas: Path) -> None:
    with CircuitDatabase(planted_atlas) as db:
        stats = db.get_stats()
        assert stats["neurons"] == 48 and stats["metadata"]["total_edges"] == str(stats["edges"])
        unit = db.get_unit(0, 10)
        assert unit is not None and unit.cluster
        top = unit.cluster.split(".")[0]
        members = db.get_cluster(top, 1000)
        assert members.cluster.size == len(members.units) and unit in members.units
        assert [u.key for u in members.units] == sorted(u.key for u in members.units)
        assert db.get_units_by_cluster(int(top)) == list(members.units)
        assert {u.label.split(" (")[0] for u in members.units if u.label} == {"enzyme catalysis in biochemistry"}
        sub = db.get_cluster(unit.cluster, 1000)
        assert unit in sub.units and all(u.cluster.startswith(unit.cluster) for u in sub.units)


def test_query_time_limit_interrupts(planted_atlas: Path) -> None:
    with CircuitDatabase(planted_atlas, limits=QueryLimits(query_timeout_s=0.2)) as db:
        with pytest.raises(DeadlineExceeded):
            db._rows("SELECT count(*) FROM range(100000000000) a")
        assert db.get_unit(0, 10) is not None  # the cursor still works afterwards


def test_failed_build_leaves_no_file_and_keeps_the_old_one(planted_export: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "atlas.duckdb"
    bad_labels = tmp_path / "bad.jsonl"
    bad_labels.write_text('{"layer": 0, "neuron": 1, "label": "ok"}\n{not json\n')
    with pytest.raises(CorruptInput, match="bad.jsonl:2"):
        build_atlas(export_dir=planted_export, output_path=out, labels_path=bad_labels, clustering=None)
    assert list(tmp_path.iterdir()) == [bad_labels]

    def explode(con):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(build_module, "build_fts_index", explode)
    with pytest.raises(RuntimeError):
        build_atlas(export_dir=planted_export, output_path=out, clustering=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
    monkeypatch.undo()

    build_atlas(export_dir=planted_export, output_path=out, clustering=None)
    index = out.with_name(out.name + ".neighbours")  # the neighbour index beside it
    before = (sha256(out), sha256(index))
    monkeypatch.setattr(build_module, "build_fts_index", explode)
    with pytest.raises(RuntimeError):
        build_atlas(export_dir=planted_export, output_path=out, clustering=None)
    assert (sha256(out), sha256(index)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas.duckdb", "atlas.duckdb.neighbours", "bad.jsonl"]


def test_missing_export_column_is_a_clear_error(tmp_path: Path, planted_export: Path) -> None:
    import pyarrow.parquet as pq

    broken = tmp_path / "export"
    broken.mkdir()
    pq.write_table(pq.read_table(planted_export / "edges.parquet").drop(["weight_abs_sum"]), broken / "edges.parquet")
    pq.write_table(pq.read_table(planted_export / "units.parquet"), broken / "units.parquet")
    with pytest.raises(CorruptInput, match="weight_abs_sum"):
        build_atlas(export_dir=broken, output_path=tmp_path / "a.duckdb")
    with pytest.raises(InvalidArgument, match="not found"):
        build_atlas(export_dir=tmp_path / "nope", output_path=tmp_path / "a.duckdb")
    assert not (tmp_path / "a.duckdb").exists()


def test_cli_build_db_config_query_and_cluster(planted_export: Path, planted_labels: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "atlas_config.yaml"
    config.write_text(
        f"model:\n  name: planted-model\naggregation:\n  export_dir: {planted_export}\n  min_edge_count: 3\n"
        f"labeling:\n  labels_path: {planted_labels}\nclustering:\n  num_trials: 2\noutput:\n  duckdb: out/atlas.duckdb\n"
    )
    assert cli_main(["build-db", "--config", str(config)]) == 0
    atlas = tmp_path / "out" / "atlas.duckdb"
    assert atlas.exists() and "48 neurons (47 labeled)" in capsys.readouterr().out
    with CircuitDatabase(atlas) as db:
        assert db.stats().metadata["model"] == "planted-model"
        assert db.stats().metadata["clustering_num_trials"] == "2"

    assert cli_main(["query", str(atlas), "rhyming", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "rhyming words in poetry" in out and out.count("\n") == 4
    assert cli_main(["query", str(atlas), "rhyming", "--json", "--limit", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and rows[0]["label"].startswith("rhyming")

    before = sha256(atlas)
    assert cli_main(["cluster", "--duckdb", str(atlas), "--dry-run", "--num-trials", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["clustered_units"] == 48
    assert sha256(atlas) == before
    assert cli_main(["cluster", "--duckdb", str(atlas), "--num-trials", "3", "--seed", "5"]) == 0
    with CircuitDatabase(atlas) as db:
        assert db.stats().metadata["clustering_seed"] == "5"
        assert db.get_unit(0, 10).cluster

    assert cli_main(["build-db", "--export", str(tmp_path / "missing"), "--output", str(tmp_path / "x.duckdb")]) == 2
    assert "error:" in capsys.readouterr().err
    assert cli_main(["query", str(tmp_path / "none.duckdb"), "x"]) == 2


def test_cli_cluster_graph(tmp_path: Path, capsys) -> None:
    from circuits_core.schemas import Edge, Graph, Unit

    units = [Unit(layer=l, index=j, position=0, activation=1.0) for l in range(2) for j in range(3)]
    edges = [Edge(src_layer=0, src_index=a, src_position=0, tgt_layer=1, tgt_index=b, tgt_position=0, weight=1.0 + a)
             for a in range(3) for b in range(3)]  # fmt: skip
    path = Graph(units=tuple(units), edges=tuple(edges), prompt_tokens=("hello",)).save(tmp_path / "g.json")
    assert cli_main(["cluster", "--graph", str(path), "--output", str(tmp_path / "c.json")]) == 0
    data = json.loads((tmp_path / "c.json").read_text())
    assert sum(c["size"] for c in data["clusters"]) == 6
    assert cli_main(["cluster", "--graph", str(path)]) == 0
    assert "cluster" in capsys.readouterr().out


def test_query_on_an_atlas_without_labels_says_so(planted_export: Path, tmp_path: Path, capsys) -> None:
    atlas = tmp_path / "unlabeled.duckdb"
    assert cli_main(["build-db", "--export", str(planted_export), "--output", str(atlas)]) == 0
    capsys.readouterr()
    with CircuitDatabase(atlas) as db:
        stats = db.stats()
        assert stats.metadata["labeled_neurons"] == "0" and stats.neurons == 48
    assert cli_main(["query", str(atlas), "rhyming"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("no matching units: the atlas holds 0 labels (48 neurons)") and "circuits label" in line
    assert cli_main(["query", str(atlas), "rhyming", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("note: the atlas holds 0 labels")

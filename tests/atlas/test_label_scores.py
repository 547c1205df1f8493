"""Label scores and logit links in the atlas: build-db stores them (``labels``, ``neurons.score_*``,
``logit_edges``), queries filter on them (``min_score``) and every path shows them: the
database, AtlasService through a real server, and ``circuits query``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from circuits.client import AtlasClient
from circuits_atlas import ClusterSettings, build_atlas
from circuits_atlas.database import CircuitDatabase
from circuits_atlas.server import AtlasSettings, build_server
from circuits_core.errors import InvalidArgument
from circuits_server.serving import ServerSettings

#: (layer, neuron) -> (output detection, output simulation, input detection, input simulation)
SCORES = {(0, 10): (0.95, 0.9, 0.55, 0.1), (1, 11): (0.6, 0.3, None, None), (2, 12): (0.5, 0.0, 0.85, 0.7)}


@pytest.fixture(scope="module")
def scored_atlas(planted_export: Path, planted_labels: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scored")
    export = root / "export"
    shutil.copytree(planted_export, export)
    pq.write_table(pa.table({
        "src_layer": pa.array([3, 3, 2], pa.int32()), "src_neuron": pa.array([10, 10, 12], pa.int32()),
        "token_id": pa.array([7, 9, 7], pa.int64()), "token": [" Paris", " Rome", " Paris"],
        "count": pa.array([5, 1, 4], pa.int64()), "weight_sum": [2.5, 0.2, -2.0], "weight_abs_sum": [2.5, 0.2, 2.0],
    }), export / "logits.parquet")  # fmt: skip
    lines = [json.loads(line) for line in planted_labels.read_text().splitlines() if line.strip()]
    for rec in lines:
        key = (rec["layer"], rec["neuron"])
        if key in SCORES:
            od, os_, idet, isim = SCORES[key]
            rec.update(output_score_detection=od, output_score_simulation=os_, output_score_contexts=20,
                       output_score_positives=9)
            rec.setdefault("input_label", f"input of L{key[0]}/N{key[1]}")
            if idet is not None:
                rec.update(input_score_detection=idet, input_score_simulation=isim, input_score_contexts=20,
                           input_score_positives=10)
    labels = root / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = root / "atlas.duckdb"
    build_atlas(export_dir=export, output_path=out, labels_path=labels,
                clustering=ClusterSettings(min_edge_count=5, num_trials=2), min_edge_count=3)
    return out


def test_build_stores_label_scores_and_logit_links(scored_atlas: Path):
    import duckdb

    con = duckdb.connect(str(scored_atlas), read_only=True)
    try:
        rows = con.execute("SELECT layer, neuron, label_pass, score_detection, score_simulation, score_contexts "
                           "FROM labels WHERE score_contexts > 0 ORDER BY ALL").fetchall()
        best = dict(((l, n), (d, s)) for l, n, d, s in con.execute(
            "SELECT layer, neuron, score_detection, score_simulation FROM neurons WHERE score_detection IS NOT NULL").fetchall())
        logits = con.execute("SELECT src_layer, src_neuron, token, count, mean_weight FROM logit_edges ORDER BY ALL").fetchall()
        meta = dict(con.execute("SELECT key, value FROM metadata").fetchall())
    finally:
        con.close()
    want = []
    for (l, n), (od, os_, idet, isim) in SCORES.items():
        want.append((l, n, "output", od, os_, 20))
        if idet is not None:
            want.append((l, n, "input", idet, isim, 20))
    assert rows == sorted(want)
    assert best == {k: (max(v[0], v[2] or 0), max(v[1], v[3] or 0)) for k, v in SCORES.items()}
    # min_edge_count=3 drops the once-seen link; mean weight = sum / count.
    assert logits == [(2, 12, " Paris", 4, -0.5), (3, 10, " Paris", 5, 0.5)]
    assert meta["scored_labels"] == "5" and meta["logit_links"] == "2"


def test_search_filters_on_scores_and_units_carry_them(scored_atlas: Path):
    with CircuitDatabase(scored_atlas) as db:
        everything = db.search("enzyme", 100)
        assert len(everything) > 3
        good = db.search("enzyme", 100, min_score=0.8)
        assert {(h.unit.layer, h.unit.index) for h in good} == {(0, 10), (2, 12)}
        unit = db.get_unit(2, 12)
        by_source = {l.source: l for l in unit.labels}
        assert by_source["progressive_input"].score_detection == 0.85
        assert by_source["progressive_input"].score_simulation == 0.7
        assert by_source["progressive_input"].score_contexts == 20 and by_source["progressive_input"].score_positives == 10
        unscored = db.get_unit(0, 12)
        assert all(l.score_detection is None and l.score_contexts == 0 for l in unscored.labels)
        with pytest.raises(InvalidArgument, match="min_score"):
            db.search("enzyme", 10, min_score=1.5)


def test_atlas_service_and_cli_show_scores(scored_atlas: Path, capsys):
    srv = build_server(AtlasSettings(duckdb_path=str(scored_atlas), server=ServerSettings(port=0, max_workers=4))).start()
    srv.set_serving(True)
    try:
        with AtlasClient(srv.address, timeout=10) as client:
            hits = client.search("enzyme", 50, min_score=0.8)
            assert {(h.unit.layer, h.unit.index) for h in hits} == {(0, 10), (2, 12)}
            unit = client.get_unit(0, 10)
            output = next(l for l in unit.labels if l.source == "progressive_output")
            assert (output.score_detection, output.score_simulation, output.score_contexts) == (0.95, 0.9, 20)
        from circuits.cli import main

        capsys.readouterr()
        assert main(["query", "--remote", srv.address, "enzyme", "--min-score", "0.8", "--json"]) == 0
        remote = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert {r["unit_id"] for r in remote} == {"L0/N10", "L2/N12"}
    finally:
        srv.stop(grace=1)
    capsys.readouterr()
    from circuits.cli import main

    assert main(["query", str(scored_atlas), "enzyme", "--min-score", "0.8"]) == 0
    table = capsys.readouterr().out
    assert "det/sim" in table and "0.95/0.90" in table and "0.85/0.70" in table
    assert main(["query", str(scored_atlas), "enzyme", "--min-score", "0.8", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["unit_id"] for r in records} == {"L0/N10", "L2/N12"}
    assert any(l["score_detection"] == 0.85 for r in records for l in r["labels"])

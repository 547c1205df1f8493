"""The neighbour index beside the atlas (circuits_atlas.neighbours) answers GetEdgesForUnit exactly
as the DuckDB path does, and is refused (with a fallback to DuckDB) when missing, stale or corrupt."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from circuits.client import AtlasClient
from circuits_server.serving import ServerSettings
from circuits_atlas import CircuitDatabase
from circuits_atlas.build import build_atlas
from circuits_atlas.neighbours import (
    MAGIC,
    NeighbourIndex,
    NeighbourIndexUnusable,
    index_path,
    verify_index,
)
from circuits_atlas.server import AtlasSettings, build_server


LAYERS, NEURONS = 5, 40


@pytest.fixture(scope="module")
def random_atlas(tmp_path_factory: pytest.TempPathFactory, random_export) -> Path:
    root = tmp_path_factory.mktemp("nbr")
    export = random_export(root / "export", layers=LAYERS, neurons=NEURONS, edges=3000, seed=7)
    out = root / "atlas.duckdb"
    build_atlas(export_dir=export, output_path=out, clustering=None, min_edge_count=1, model="random")
    return out


def copy_atlas(atlas: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(atlas, dest / atlas.name)
    if index_path(atlas).exists():
        shutil.copy(index_path(atlas), index_path(dest / atlas.name))
    return dest / atlas.name


def all_answers(db: CircuitDatabase, units, cases) -> list:
    return [db.get_edges_for_unit(l, n, d, limit=lim, min_count=mc) for l, n in units for d, lim, mc in cases]


CASES = [(d, lim, mc) for d in ("downstream", "upstream", "both") for lim in (0, 1, 3, 7, 1000) for mc in (0, 1, 2, 4, 6, 9)]


def test_build_writes_the_index_and_it_is_used(random_atlas: Path) -> None:
    path = index_path(random_atlas)
    assert path.is_file() and path.read_bytes()[:8] == MAGIC
    assert not list(random_atlas.parent.glob(".*"))  # no temporary files left
    with CircuitDatabase(random_atlas) as db:
        assert db.neighbours is not None, db.neighbour_index_note
        header = verify_index(path, build_id=db.stats().metadata["build_id"], deep=True)
        assert header["edges"] == db.stats().edges == 3000


def test_index_answers_equal_the_duckdb_path(random_atlas: Path) -> None:
    rng = random.Random(3)
    units = [(l, n) for l in range(LAYERS) for n in (0, 1, 2)]  # hubs
    units += [(rng.randrange(LAYERS), rng.randrange(NEURONS)) for _ in range(60)]
    units += [(LAYERS + 3, 0), (0, NEURONS + 5), (2**31 - 1, 2**31 - 1)]  # absent units: no edges
    with CircuitDatabase(random_atlas) as fast, CircuitDatabase(random_atlas, neighbour_index=False) as sql:
        assert fast.neighbours is not None and sql.neighbours is None
        got, want = all_answers(fast, units, CASES), all_answers(sql, units, CASES)
    assert got == want
    # The comparison is not vacuous: long runs, truncation by limit and by min_count all occur.
    sizes = [len(a) for a in want]
    assert max(sizes) > 50 and sum(1 for a in want if not a) > 10
    hub = want[[i for i, (u, c) in enumerate((u, c) for u in units for c in CASES) if u == (0, 0) and c == ("downstream", 1000, 0)][0]]
    assert len({e.count for e in hub}) > 3 and len(hub) > len({(e.count, abs(e.weight_abs_sum / e.count)) for e in hub})


def test_index_order_checked_by_brute_force(random_atlas: Path) -> None:
    """Independent of both query paths: every stored edge, sorted in Python by the documented order."""
    import duckdb

    con = duckdb.connect(str(random_atlas), read_only=True)
    try:
        rows = con.execute("SELECT src_layer, src_neuron, tgt_layer, tgt_neuron, count, weight_sum, weight_abs_sum, "
                           "weight_sq_sum, weight_min, weight_max, mean_weight, mean_abs_weight FROM edges").fetchall()  # fmt: skip
    finally:
        con.close()
    with CircuitDatabase(random_atlas) as db:
        for layer, neuron in [(0, 0), (1, 1), (3, 7), (4, 5)]:
            for side, own, other in ((0, (0, 1), (2, 3)), (1, (2, 3), (0, 1))):
                mine = [r for r in rows if (r[own[0]], r[own[1]]) == (layer, neuron)]
                mine.sort(key=lambda r: (-r[4], -r[11], r[other[0]], r[other[1]]))
                assert db.neighbours.edges_of(layer, neuron, side, 10_000, 0) == [tuple(r[:11]) for r in mine]


def test_missing_index_falls_back_to_duckdb(random_atlas: Path, tmp_path: Path, caplog) -> None:
    atlas = copy_atlas(random_atlas, tmp_path)
    index_path(atlas).unlink()
    with CircuitDatabase(random_atlas) as ref, CircuitDatabase(atlas) as db:
        assert db.neighbours is None and "no neighbour index" in db.neighbour_index_note
        assert all_answers(db, [(0, 0), (2, 5)], CASES[:12]) == all_answers(ref, [(0, 0), (2, 5)], CASES[:12])
    assert "fall back to DuckDB" in caplog.text


def test_stale_index_of_another_build_is_not_used(random_atlas: Path, tmp_path: Path, random_export) -> None:
    export = random_export(tmp_path / "export", layers=LAYERS, neurons=NEURONS, edges=3000, seed=8)
    other = tmp_path / "other" / "atlas.duckdb"
    build_atlas(export_dir=export, output_path=other, clustering=None, min_edge_count=1)
    atlas = copy_atlas(random_atlas, tmp_path / "a")
    shutil.copy(index_path(other), index_path(atlas))  # same edge count, another atlas
    with CircuitDatabase(atlas) as db, CircuitDatabase(atlas, neighbour_index=False) as sql:
        assert db.neighbours is None and "stale neighbour index" in db.neighbour_index_note
        assert all_answers(db, [(0, 1)], CASES) == all_answers(sql, [(0, 1)], CASES)
    # Rebuilding over the file replaces both: the new index belongs to the new atlas.
    build_atlas(export_dir=export, output_path=atlas, clustering=None, min_edge_count=1)
    with CircuitDatabase(atlas) as db:
        assert db.neighbours is not None


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[8:16], "little")
    header = json.loads(data[16 : 16 + header_len])
    if how == "truncated":
        del data[-100:]
    elif how == "magic":
        data[0:8] = b"NOTANIDX"
    elif how == "header":
        data[16] = ord("x")  # the JSON no longer parses
    elif how == "offsets":
        s = header["sections"]["out_offsets"]
        at = s["offset"] + 8 * 5
        data[at : at + 8] = (10**9).to_bytes(8, "little")
    elif how == "keys":
        s = header["sections"]["in_keys"]
        data[s["offset"] : s["offset"] + 16] = data[s["offset"] + 8 : s["offset"] + 16] + data[s["offset"] : s["offset"] + 8]
    elif how == "in_order":
        s = header["sections"]["in_order"]
        data[s["offset"] : s["offset"] + 4] = (2**32 - 1).to_bytes(4, "little")
    elif how == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "magic", "header", "offsets", "keys", "in_order", "empty"])
def test_corrupt_index_is_refused_and_duckdb_answers(random_atlas: Path, tmp_path: Path, how: str) -> None:
    atlas = copy_atlas(random_atlas, tmp_path)
    _corrupt(index_path(atlas), how)
    with CircuitDatabase(atlas) as db, CircuitDatabase(atlas, neighbour_index=False) as sql:
        assert db.neighbours is None and "corrupt neighbour index" in db.neighbour_index_note, db.neighbour_index_note
        assert all_answers(db, [(0, 0), (1, 3)], CASES) == all_answers(sql, [(0, 0), (1, 3)], CASES)


def test_corruption_found_by_a_lookup_drops_the_index(random_atlas: Path, tmp_path: Path) -> None:
    """Records of the wrong unit (undetectable by the structural checks at open) are caught by
    the per-lookup check; the deep check (sha256) finds any flipped byte."""
    atlas = copy_atlas(random_atlas, tmp_path)
    path = index_path(atlas)
    data = bytearray(path.read_bytes())
    header = json.loads(data[16 : 16 + int.from_bytes(data[8:16], "little")])
    rec = header["sections"]["records"]["offset"]
    data[rec : rec + 4] = (77).to_bytes(4, "little")  # first record's src_layer
    path.write_bytes(bytes(data))
    with CircuitDatabase(atlas, neighbour_index=False) as sql:
        build_id = sql.stats().metadata["build_id"]
        want = sql.get_edges_for_unit(0, 0, "both", limit=50)
    with pytest.raises(NeighbourIndexUnusable, match="sha256"):
        verify_index(path, build_id=build_id, deep=True)
    with CircuitDatabase(atlas) as db:
        assert db.neighbours is not None
        first = int(np.frombuffer(data, np.int64, 1, header["sections"]["out_keys"]["offset"])[0])
        l, n = divmod(first, 1 << 32)
        got = db.get_edges_for_unit(l, n, "both", limit=50)
        assert db.neighbours is None and "holds another unit" in db.neighbour_index_note
        with CircuitDatabase(atlas, neighbour_index=False) as sql:
            assert got == sql.get_edges_for_unit(l, n, "both", limit=50)
        assert db.get_edges_for_unit(0, 0, "both", limit=50) == want


def test_failed_build_keeps_the_old_atlas_and_index(random_atlas: Path, tmp_path: Path, monkeypatch, random_export) -> None:
    atlas = copy_atlas(random_atlas, tmp_path)
    before = (atlas.read_bytes(), index_path(atlas).read_bytes())
    import circuits_atlas.build as build_mod

    def boom(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build_mod, "write_index", boom)  # a failure inside the index step
    export = random_export(tmp_path / "export", layers=LAYERS, neurons=NEURONS, edges=500, seed=9)
    with pytest.raises(RuntimeError, match="disk full"):
        build_atlas(export_dir=export, output_path=atlas, clustering=None, min_edge_count=1)
    assert (atlas.read_bytes(), index_path(atlas).read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted([atlas.name, index_path(atlas).name])


def test_open_reports_version_and_missing_build_id(random_atlas: Path, tmp_path: Path) -> None:
    with pytest.raises(NeighbourIndexUnusable, match="stale"):
        NeighbourIndex.open(index_path(random_atlas), build_id=None)
    with pytest.raises(NeighbourIndexUnusable, match="no neighbour index"):
        NeighbourIndex.open(tmp_path / "nothing.neighbours", build_id="x")


def test_server_answers_from_the_index(random_atlas: Path) -> None:
    db = CircuitDatabase(random_atlas)
    assert db.neighbours is not None
    srv = build_server(AtlasSettings(duckdb_path=str(random_atlas), server=ServerSettings(port=0, max_workers=4)),
                       database=db).start()
    try:
        with AtlasClient(srv.address, timeout=10) as client, CircuitDatabase(random_atlas, neighbour_index=False) as sql:
            for layer, neuron in [(0, 0), (1, 2), (3, 11)]:
                for direction, limit, min_count in [("both", 100, 0), ("upstream", 3, 2), ("downstream", 5, 4)]:
                    assert client.get_edges_for_unit(layer, neuron, direction, limit=limit, min_count=min_count) == \
                        sql.get_edges_for_unit(layer, neuron, direction, limit=limit, min_count=min_count)
    finally:
        srv.stop(grace=1)


def test_index_only_indexes_an_atlas_built_before_the_index(random_atlas: Path, tmp_path: Path, capsys) -> None:
    """An old atlas (no build_id, no index) gets both from `circuits build-db --index-only`."""
    import duckdb

    from circuits.cli import main as cli_main

    atlas = copy_atlas(random_atlas, tmp_path)
    index_path(atlas).unlink()
    con = duckdb.connect(str(atlas))
    con.execute("DELETE FROM metadata WHERE key = 'build_id'")
    con.close()
    with CircuitDatabase(atlas) as db:
        assert db.neighbours is None and "no neighbour index" in db.neighbour_index_note
    assert cli_main(["build-db", "--index-only", "--output", str(atlas)]) == 0
    assert "3000 edges" in capsys.readouterr().out
    with CircuitDatabase(atlas) as db, CircuitDatabase(random_atlas, neighbour_index=False) as sql:
        assert db.neighbours is not None and len(db.stats().metadata["build_id"]) == 32
        assert all_answers(db, [(0, 0), (2, 9)], CASES) == all_answers(sql, [(0, 0), (2, 9)], CASES)
    # Again: the same build_id is kept, the index is rewritten in place.
    with CircuitDatabase(atlas, neighbour_index=False) as db:
        build_id = db.stats().metadata["build_id"]
    assert cli_main(["build-db", "--index-only", "--output", str(atlas)]) == 0
    assert verify_index(index_path(atlas), build_id=build_id, deep=True)["build_id"] == build_id
    capsys.readouterr()
    assert cli_main(["build-db", "--index-only", "--output", str(tmp_path / "nope.duckdb")]) == 2
    assert capsys.readouterr().err.startswith("error: ")

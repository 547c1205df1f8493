"""Connectivity in the atlas: projections and weight-edge tables equal the connectivity folder,
``aggregation.method: weight_graph | output_projection`` builds the edge table from weights and
Infomap clusters it exactly as it clusters the same edges directly, the new AtlasService RPCs
through a real server on port 0, and the CLI (connectivity, build-db, query --unit) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from circuits.cli import main as cli_main
from circuits_atlas import CircuitDatabase, ClusterSettings, build_atlas, cluster_full_model
from circuits_attribution.connectivity import compute_connectivity
from circuits_core.connectivity import PARTS, ConnectivitySpec
from circuits_core.connectivity_files import ConnectivityFolder
from circuits_core.errors import FailedPrecondition, InvalidArgument, NotFound
from circuits_core.exports import UNIT_COLUMNS


@pytest.fixture(scope="module")
def folder(make_model, tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conn") / "c"
    spec = ConnectivitySpec(parts=PARTS, top_k=6, edges_per_polarity=8, similarity_k=4, dtype="float64")
    compute_connectivity(make_model("llama"), tokenizer, spec, out, model_name="tiny-llama")
    return out


def tiny_export(out: Path) -> Path:
    """A minimal aggregator export (three RelP edges among four units)."""
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "src_layer": pa.array([0, 1, 1], pa.int32()), "src_neuron": pa.array([1, 2, 2], pa.int32()),
        "tgt_layer": pa.array([1, 2, 3], pa.int32()), "tgt_neuron": pa.array([2, 3, 4], pa.int32()),
        "count": pa.array([5, 6, 7], pa.int64()),
        **{name: pa.array([0.5, -0.25, 1.0], pa.float64())
           for name in ("weight_sum", "weight_abs_sum", "weight_sq_sum", "weight_min", "weight_max")},
    }), out / "edges.parquet")
    pq.write_table(pa.table({
        "layer": pa.array([0, 1, 2, 3], pa.int32()), "neuron": pa.array([1, 2, 3, 4], pa.int32()),
        "graph_count": pa.array([3, 3, 3, 3], pa.int64()), "observation_count": pa.array([3, 3, 3, 3], pa.int64()),
        **{name: pa.array([0.0] * 4, pa.float64()) for name in UNIT_COLUMNS[4:]},
    }), out / "units.parquet")
    pq.write_table(pa.table({
        "graph_id": pa.array([f"g{i}" for i in range(7)]), "source": pa.array(["test"] * 7),
        "corpus_index": pa.array(list(range(7)), pa.int64()),
    }), out / "ledger.parquet")
    return out


@pytest.fixture(scope="module")
def relp_atlas(folder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("relp-atlas")
    out = root / "atlas.duckdb"
    build_atlas(export_dir=tiny_export(root / "export"), output_path=out, connectivity_dir=folder,
                clustering=ClusterSettings(enabled=False), min_edge_count=1)
    return out


@pytest.fixture(scope="module")
def weight_atlas(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("weight-atlas") / "atlas.duckdb"
    build_atlas(export_dir=None, output_path=out, connectivity_dir=folder, edge_source="weight_graph",
                clustering=ClusterSettings(num_trials=2, seed=7))
    return out


def test_projection_and_weight_tables_equal_the_folder(relp_atlas, folder):
    conn = ConnectivityFolder.open(folder)
    output = {(r["layer"], r["neuron"]): r for r in conn.output_projections().to_pylist()}
    inputs = {(r["layer"], r["neuron"]): r for r in conn.input_projections().to_pylist()}
    weights = conn.weight_edges().to_pylist()
    with CircuitDatabase(relp_atlas) as db:
        assert db.stats().edges == 3  # RelP edges from the export, untouched
        for key in [(0, 0), (1, 17), (3, 95)]:
            proj = db.get_unit_projections(*key)
            assert [t.token_id for t in proj.promotes] == output[key]["promote_ids"]
            assert [t.token for t in proj.suppresses] == output[key]["suppress_tokens"]
            assert [t.weight for t in proj.input_tokens] == pytest.approx(inputs[key]["top_weights"])
            assert proj.output_norm == pytest.approx(output[key]["output_norm"])
        # upstream: the folder's edges into the unit, excitatory (strongest first) then inhibitory
        target = (3, 5)
        up = db.get_weight_edges(*target, direction="upstream", limit=100)
        expected = [w for w in weights if (w["tgt_layer"], w["tgt_neuron"]) == target]
        expected.sort(key=lambda w: (-w["polarity"], -abs(w["strength"])))
        assert [(e.src_layer, e.src_neuron, e.polarity) for e in up] == [(w["src_layer"], w["src_neuron"], w["polarity"]) for w in expected]
        assert [e.strength for e in up] == pytest.approx([w["strength"] for w in expected])
        assert all(e.strength == pytest.approx(e.c_up + e.c_gate) for e in up)
        # downstream: every folder edge out of the unit
        source = (1, 9)
        down = db.get_weight_edges(*source, direction="downstream", limit=1000)
        assert sorted((e.tgt_layer, e.tgt_neuron, e.polarity) for e in down) == sorted(
            (w["tgt_layer"], w["tgt_neuron"], w["polarity"]) for w in weights if (w["src_layer"], w["src_neuron"]) == source)
        only_inhibitory = db.get_weight_edges(*target, direction="upstream", polarity=-1, limit=3)
        assert len(only_inhibitory) == 3 and all(e.polarity == -1 for e in only_inhibitory)
        both = db.get_weight_edges(*target, direction="both", limit=2)
        assert len(both) <= 8
        with pytest.raises(NotFound):
            db.get_unit_projections(7, 0)
        with pytest.raises(InvalidArgument):
            db.get_weight_edges(1, 1, polarity=2)
        meta = db.stats().metadata
        assert meta["edge_source"] == "relp" and meta["connectivity_model"] == "tiny-llama"
        # neurons without an output_norm label got it from the projections
        assert db._rows("SELECT output_norm FROM neurons WHERE layer = 1 AND neuron = 2")[0][0] == pytest.approx(output[(1, 2)]["output_norm"])


def test_weight_graph_atlas_clusters_the_weight_edges_like_infomap_directly(weight_atlas, folder):
    conn = ConnectivityFolder.open(folder)
    weights = conn.weight_edges()
    with CircuitDatabase(weight_atlas) as db:
        stats = db.stats()
        assert stats.neurons == 4 * 96 and stats.edges == weights.num_rows and stats.clusters > 0
        assert stats.metadata["edge_source"] == "weight_graph" and stats.metadata["min_edge_count"] == "1"
        rows = db._rows("SELECT src_layer, src_neuron, tgt_layer, tgt_neuron, count, mean_weight FROM edges")
        atlas_paths = dict(((l, n), p) for l, n, p in db._rows("SELECT layer, neuron, cluster_path FROM neurons WHERE cluster_path IS NOT NULL"))
    got = {(r[0], r[1], r[2], r[3]): r[5] for r in rows}
    want = dict(zip(zip(*(weights.column(c).to_pylist() for c in ("src_layer", "src_neuron", "tgt_layer", "tgt_neuron"))),
                    weights.column("strength").to_pylist()))
    assert got.keys() == want.keys() and all(r[4] == 1 for r in rows)
    assert [got[k] for k in want] == pytest.approx(list(want.values()))
    # the same edges straight into cluster_full_model: identical assignment
    strength = np.asarray(weights.column("strength").to_pylist())
    direct = cluster_full_model(
        {"src_layer": weights.column("src_layer").to_numpy(), "src_neuron": weights.column("src_neuron").to_numpy(),
         "tgt_layer": weights.column("tgt_layer").to_numpy(), "tgt_neuron": weights.column("tgt_neuron").to_numpy(),
         "count": np.ones(len(strength), dtype=np.int64), "weight_sum": strength, "weight_abs_sum": np.abs(strength)},
        {"layer": np.repeat(np.arange(4), 96), "neuron": np.tile(np.arange(96), 4)},
        min_edge_count=1, num_trials=2, seed=7,
    )
    assert dict(zip(zip(direct.layers.tolist(), direct.neurons.tolist()), direct.path_strings)) == atlas_paths


def test_output_projection_atlas_uses_similarity_edges(folder, tmp_path):
    out = tmp_path / "sim.duckdb"
    build_atlas(export_dir=None, output_path=out, connectivity_dir=folder, edge_source="output_projection",
                clustering=ClusterSettings(num_trials=1))
    pairs = ConnectivityFolder.open(folder).projection_edges()
    with CircuitDatabase(out) as db:
        assert db.stats().edges == pairs.num_rows
        weights = sorted(r[0] for r in db._rows("SELECT mean_weight FROM edges"))
    assert weights == pytest.approx(sorted(pairs.column("similarity").to_pylist()))
    assert all(0 < w <= 1 + 1e-9 for w in weights)


def test_build_errors(folder, tmp_path):
    with pytest.raises(InvalidArgument, match="connectivity folder"):
        build_atlas(export_dir=None, output_path=tmp_path / "a.duckdb", edge_source="weight_graph")
    with pytest.raises(InvalidArgument, match="edge source"):
        build_atlas(export_dir=None, output_path=tmp_path / "a.duckdb", connectivity_dir=folder, edge_source="magic")
    partial = tmp_path / "partial"
    compute = ConnectivityFolder.create_or_resume  # a folder that lacks the weight edges
    from circuits_core.connectivity import ModelShape

    compute(partial, ModelShape(model="m", num_layers=1, d_mlp=2, d_model=2, vocab_size=3), ConnectivitySpec(parts=("output",)))
    with pytest.raises(FailedPrecondition, match="--parts weights"):
        build_atlas(export_dir=None, output_path=tmp_path / "a.duckdb", connectivity_dir=partial, edge_source="weight_graph")
    assert not (tmp_path / "a.duckdb").exists()


def test_atlas_without_connectivity_says_so(tmp_path):
    out = tmp_path / "plain.duckdb"
    build_atlas(export_dir=tiny_export(tmp_path / "export"), output_path=out, clustering=None, min_edge_count=1)
    with CircuitDatabase(out) as db:
        with pytest.raises(FailedPrecondition, match="--connectivity"):
            db.get_unit_projections(1, 2)
        with pytest.raises(FailedPrecondition, match="--connectivity"):
            db.get_weight_edges(1, 2)


def test_rpcs_through_a_real_server(relp_atlas, tmp_path, capsys):
    import grpc

    from circuits_atlas.server import AtlasSettings, build_server
    from circuits_core._proto.circuits.v1 import atlas_pb2, atlas_pb2_grpc
    from circuits_sdk.atlas import AtlasClient
    from circuits_server.serving import ServerSettings

    server = build_server(AtlasSettings(duckdb_path=str(relp_atlas), server=ServerSettings(port=0))).start()
    server.set_serving(True)
    try:
        with AtlasClient(server.address, timeout=10) as client, CircuitDatabase(relp_atlas) as db:
            assert client.get_unit_projections(2, 7) == db.get_unit_projections(2, 7)
            for direction in ("upstream", "downstream", "both"):
                assert client.get_weight_edges(2, 7, direction, limit=5) == db.get_weight_edges(2, 7, direction, 5)
            assert client.get_weight_edges(2, 7, polarity=1) == db.get_weight_edges(2, 7, polarity=1)
            with pytest.raises(NotFound):
                client.get_unit_projections(9, 9)
            with pytest.raises(InvalidArgument):
                client.get_weight_edges(2, 7, polarity=5)
        assert cli_main(["query", "--remote", server.address, "--unit", "L2/N7", "--json"]) == 0
        with grpc.insecure_channel(server.address) as channel:
            stub = atlas_pb2_grpc.AtlasServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.GetUnitProjections(atlas_pb2.GetUnitProjectionsRequest(layer=-1, index=0), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(grace=1)
    shown = json.loads(capsys.readouterr().out)
    with CircuitDatabase(relp_atlas) as db:
        assert [t["token_id"] for t in shown["projections"]["promotes"]] == [t.token_id for t in db.get_unit_projections(2, 7).promotes]
    plain = tmp_path / "plain.duckdb"
    build_atlas(export_dir=tiny_export(tmp_path / "export"), output_path=plain, clustering=None, min_edge_count=1)
    server = build_server(AtlasSettings(duckdb_path=str(plain), server=ServerSettings(port=0))).start()
    server.set_serving(True)
    try:
        with AtlasClient(server.address, timeout=10) as client:
            with pytest.raises(FailedPrecondition):
                client.get_weight_edges(1, 2)
    finally:
        server.stop(grace=1)


def one_error_line(capsys, message: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_cli_connectivity_build_db_and_query_unit(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "conn"
    argv = ["connectivity", "--model", str(tiny_model_dir), "--output", str(out), "--dtype", "float64",
            "--parts", "output", "input", "weights", "--top-k", "5", "--edges-per-polarity", "4", "--quiet"]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    assert "top promoted tokens" in captured.out and "L3/N" in captured.out
    assert "weights" in captured.err and "total" in captured.err
    assert cli_main(argv) == 0  # a second run resumes every layer
    assert "layers resumed" in capsys.readouterr().err
    atlas = tmp_path / "atlas.duckdb"
    assert cli_main(["build-db", "--connectivity", str(out), "--edges-from", "weight_graph", "--output", str(atlas),
                     "--num-trials", "1"]) == 0
    capsys.readouterr()
    assert cli_main(["query", str(atlas), "--unit", "L3/N5"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("L3/N5") and "promotes:" in shown and "input tokens:" in shown
    assert "weight upstream excitatory" in shown and "weight upstream inhibitory" in shown
    assert cli_main(["query", str(atlas), "--unit", "3/5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["unit_id"] == "L3/N5" and len(data["projections"]["promotes"]) == 5
    assert {e["polarity"] for e in data["weight_edges"]} == {1, -1}

    for argv, message in (
        (["connectivity", "--model", str(tiny_model_dir), "--output", str(out), "--top-k", "7", "--dtype", "float64",
          "--parts", "output", "--quiet"], "cannot be resumed"),
        (["connectivity", "--output", str(tmp_path / "x"), "--parts", "everything"], "unknown part"),
        (["connectivity", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "y")], "does not exist"),
        (["connectivity", "--output", str(tmp_path / "z"), "--top-k", "0"], "top_k"),
        (["build-db", "--edges-from", "weight_graph", "--output", str(tmp_path / "b.duckdb")], "--connectivity"),
        (["build-db", "--connectivity", str(tmp_path / "none"), "--edges-from", "weight_graph",
          "--output", str(tmp_path / "b.duckdb")], "no such folder"),
        (["query", str(atlas), "--unit", "L3-N5"], "expected L/N"),
        (["query", str(atlas), "--unit", "L9/N5"], "not in the atlas"),
    ):
        assert cli_main(argv) == 2, argv
        one_error_line(capsys, message)

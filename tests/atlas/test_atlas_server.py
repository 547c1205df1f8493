"""The atlas through a real gRPC server on port 0 with the real client (and raw gRPC for abuse)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from circuits_core._proto.circuits.v1 import atlas_pb2, atlas_pb2_grpc
from circuits.cli import main as cli_main
from circuits.client import AtlasClient
from circuits_core.errors import InvalidArgument, NotFound
from circuits_server.serving import ServerSettings
from circuits_atlas import CircuitDatabase
from circuits_atlas.server import AtlasSettings, build_server


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def server(planted_atlas: Path):
    before = sha256(planted_atlas)
    srv = build_server(AtlasSettings(duckdb_path=str(planted_atlas), server=ServerSettings(port=0, max_workers=8))).start()
    srv.set_serving(True)
    yield srv
    srv.stop(grace=1)
    assert sha256(planted_atlas) == before  # serving never writes to the atlas


@pytest.fixture()
def client(server):
    with AtlasClient(server.address, timeout=10) as c:
        yield c


def test_health_and_stats(server, client, planted_atlas: Path) -> None:
    with grpc.insecure_channel(server.address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="circuits.v1.AtlasService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stats = client.stats()
    with CircuitDatabase(planted_atlas) as db:
        assert stats == db.stats()


def test_search_finds_planted_labels_and_right_neighbours(client, planted_atlas: Path, planted_export: Path) -> None:
    hits = client.search("enzyme catalysis", limit=50)
    assert len(hits) == 16 and hits[0].score > 0
    assert all(h.unit.label.startswith("enzyme catalysis") for h in hits)
    with CircuitDatabase(planted_atlas) as db:
        assert hits == db.search("enzyme catalysis", 50)  # server == domain object
    unit = hits[0].unit
    edges = client.get_edges_for_unit(unit.layer, unit.index, "both", limit=100)
    con = duckdb.connect()
    want = con.execute(
        "SELECT src_layer, src_neuron, tgt_layer, tgt_neuron, count FROM read_parquet(?) "
        "WHERE count >= 3 AND ((src_layer = $2 AND src_neuron = $3) OR (tgt_layer = $2 AND tgt_neuron = $3)) ORDER BY ALL",
        [str(planted_export / "edges.parquet"), unit.layer, unit.index],
    ).fetchall()
    con.close()
    got = sorted((e.src_layer, e.src_index, e.tgt_layer, e.tgt_index, e.count) for e in edges)
    assert got == want and len(got) > 0
    neighbours = {(e.tgt_layer, e.tgt_index) for e in edges} | {(e.src_layer, e.src_index) for e in edges}
    neighbours.discard(unit.key)
    labels = {client.get_unit(*k).label.split(" (")[0] for k in neighbours}
    assert labels == {"enzyme catalysis in biochemistry"}
    down = client.get_edges_for_unit(unit.layer, unit.index, "downstream", limit=2, min_count=1)
    assert len(down) <= 2 and all((e.src_layer, e.src_index) == unit.key for e in down)
    assert client.get_edges_for_unit(unit.layer, unit.index, min_count=10**9) == []


def test_get_cluster_and_not_found(client) -> None:
    unit = client.get_unit(0, 50)
    assert unit.label.startswith("capital") and unit.appearance_count > 0 and unit.cluster
    members = client.get_cluster(unit.cluster.split(".")[0], limit=100)
    assert unit in members.units and members.cluster.size == len(members.units)
    assert client.get_unit(40, 40) is None  # as CircuitDatabase.get_unit
    with pytest.raises(NotFound):
        client.get_cluster("12345")
    with pytest.raises(InvalidArgument):
        client.get_cluster("1 OR 1=1")


def test_client_and_database_answer_alike(client, planted_atlas: Path) -> None:
    """AtlasClient (gRPC) and CircuitDatabase (in process) are the same AtlasQueries: same method
    names, defaults and results, errors included."""
    from circuits_core.capabilities import AtlasQueries

    with CircuitDatabase(planted_atlas) as db:
        assert isinstance(client, AtlasQueries) and isinstance(db, AtlasQueries)
        top = db.search("capital")[0].unit
        calls = [
            ("search", ("capital",)), ("search", ("enzyme catalysis", 3)), ("search", ("no-such-word-anywhere",)),
            ("get_unit", top.key), ("get_unit", (40, 40)), ("get_unit_card", top.key), ("get_unit_card", (40, 40)),
            ("get_edges_for_unit", top.key), ("get_edges_for_unit", (*top.key, "upstream", 2, 1)),
            ("get_cluster", (top.cluster.split(".")[0],)), ("get_cluster", (top.cluster, 2)), ("stats", ()),
        ]
        for name, args in calls:
            assert getattr(client, name)(*args) == getattr(db, name)(*args), name
        for name, args, error in [("get_cluster", ("12345",), NotFound), ("get_cluster", ("1 OR 1=1",), InvalidArgument),
                                  ("search", ("",), InvalidArgument), ("get_edges_for_unit", (0, 1, "sideways"), InvalidArgument)]:
            for implementation in (client, db):
                with pytest.raises(error):
                    getattr(implementation, name)(*args)


@pytest.mark.parametrize("text", ["'; DROP TABLE neurons; --", "%", "x" * 100_000, "", "\u0000", "enzyme' --"])
def test_hostile_search_text(client, text: str) -> None:
    try:
        hits = client.search(text, limit=5)
    except InvalidArgument:
        assert text.strip("\x00 ") == "" or len(text) > 1000
    else:
        assert isinstance(hits, list)
    assert client.stats().neurons == 48


def test_bad_requests_are_invalid_argument(server, client) -> None:
    with pytest.raises(InvalidArgument):
        client.search("enzyme", limit=-5)
    with pytest.raises(InvalidArgument):
        client.get_edges_for_unit(-3, 1)
    with grpc.insecure_channel(server.address) as ch:
        stub = atlas_pb2_grpc.AtlasServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetEdgesForUnit(atlas_pb2.GetEdgesForUnitRequest(layer=0, index=10, direction=7), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # field 1 (text), wire type 2, length 4, bytes that are not UTF-8
        raw = ch.unary_unary("/circuits.v1.AtlasService/SearchUnits")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\x0a\x04\xff\xfe\xc3\x28", timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff", timeout=5)  # not a protobuf at all
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # results are capped by the server's limit
        big = stub.SearchUnits(atlas_pb2.SearchUnitsRequest(text="in", limit=10**9), timeout=5)
        assert len(big.units) <= 1000


def test_concurrent_clients_agree(server) -> None:
    def work(i: int):
        with AtlasClient(server.address, timeout=20) as c:
            return [h.unit.key for h in c.search(("enzyme", "capital", "rhyming")[i % 3], 20)], len(
                c.get_edges_for_unit(1, 11 if i % 2 else 51)
            )

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(work, range(48)))
    for i, r in enumerate(results):
        assert r == results[i % 6]


def test_cli_query_remote(server, capsys) -> None:
    assert cli_main(["query", "--remote", server.address, "rhyming", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "rhyming words in poetry" in out
    assert cli_main(["query", "--remote", server.address, "x" * 5000]) == 2
    assert "error:" in capsys.readouterr().err


def test_serve_main_rejects_missing_atlas(tmp_path: Path, capsys) -> None:
    assert cli_main(["serve", "atlas", "--duckdb", str(tmp_path / "no.duckdb"), "--port", "0", "--insecure"]) == 2
    assert "not found" in capsys.readouterr().err


def test_served_by_the_module_entry_point(planted_atlas: Path) -> None:
    """`python -m circuits_atlas` (what `circuits serve atlas` runs) serves, answers, stops on SIGTERM."""
    import re
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "circuits_atlas", "--duckdb", str(planted_atlas), "--port", "0", "--host", "127.0.0.1", "--insecure",
         "--metrics-port", "0", "--grace", "1"],  # fmt: skip
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        match = re.search(r"serving on (\S+)", line)
        assert match, line + proc.stderr.read()
        with AtlasClient(match.group(1), timeout=10) as c:
            assert c.stats().neurons == 48
            assert c.search("rhyming", 3)[0].unit.label.startswith("rhyming")
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def test_unit_card_matches_the_tables_and_the_server(client, planted_atlas: Path) -> None:
    """GetUnitCard: domain object vs a direct SQL recomputation, and the server vs the domain object."""
    from circuits_atlas.duck import connect

    con = connect(planted_atlas, read_only=True)  # the server's settings: DuckDB refuses others on an open file
    try:
        with CircuitDatabase(planted_atlas) as db:
            for layer, index in [(0, 10), (1, 52), (3, 93), (2, 91)]:
                card = db.get_unit_card(layer, index)
                assert card is not None and client.get_unit_card(layer, index) == card
                assert card.unit == db.get_unit(layer, index)
                obs, mean_act, cluster_path = con.execute(
                    "SELECT observation_count, mean_activation, cluster_path FROM neurons WHERE layer = ? AND neuron = ?",
                    [layer, index]).fetchone()  # fmt: skip
                assert card.stats.observation_count == obs and card.stats.mean_activation == pytest.approx(mean_act)
                out_degree = con.execute("SELECT count(*) FROM edges WHERE src_layer = ? AND src_neuron = ?", [layer, index]).fetchone()[0]
                in_degree = con.execute("SELECT count(*) FROM edges WHERE tgt_layer = ? AND tgt_neuron = ?", [layer, index]).fetchone()[0]
                assert (card.downstream_edges, card.upstream_edges) == (out_degree, in_degree)
                assert card.cluster is not None and card.cluster.cluster_path == cluster_path == card.unit.cluster
                assert card.cluster == db.get_cluster(cluster_path, 1).cluster
            assert db.get_unit_card(40, 40) is None
    finally:
        con.close()
    assert client.get_unit_card(40, 40) is None  # as CircuitDatabase.get_unit_card
    with pytest.raises(InvalidArgument, match="layer"):
        client.get_unit_card(-1, 3)

"""Label files and the PostgreSQL neurondb source, against a real PostgreSQL server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from circuits import Graph, Unit
from circuits_core.config import LabelingSection
from circuits_core.errors import CorruptInput, NotFound, Unavailable
from circuits_core.labels import (
    FileLabelSource,
    LabelRecord,
    NeuronDB,
    PgSettings,
    iter_label_file,
    label_source_from_config,
    read_label_file,
    write_label_file,
)


def _settings(pg: dict, **over) -> PgSettings:
    return PgSettings(**{**{k: pg[k] for k in ("host", "port", "user", "password", "database")}, **over})


def test_label_file_round_trip_and_errors(tmp_path: Path) -> None:
    records = [
        LabelRecord(layer=1, neuron=2, label="capital cities", description="fires on capitals", source="goodfire"),
        LabelRecord(layer=3, neuron=4, label="France", input_label="country names", polarity=-1),
    ]
    path = write_label_file(records, tmp_path / "labels.jsonl")
    assert list(iter_label_file(path)) == [records[0], LabelRecord(**{**records[1].to_json(), "source": "file"})]
    (tmp_path / "list.json").write_text(json.dumps([r.to_json() for r in records]))
    assert set(read_label_file(tmp_path / "list.json")) == {(1, 2), (3, 4)}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"layer": 1, "neuron": 2, "label": "x"}\n{"layer": "one", "neuron": 2, "label": "x"}\n')
    with pytest.raises(CorruptInput, match=r"bad.jsonl:2: field 'layer' must be an integer"):
        read_label_file(bad)
    bad.write_text('{"layer": 1, "neuron": 2}\n')
    with pytest.raises(CorruptInput, match="needs a 'label', an 'input_label' or a 'description'"):
        read_label_file(bad)
    bad.write_text("not json\n")
    with pytest.raises(CorruptInput, match=r"bad.jsonl:1: not a JSON object"):
        read_label_file(bad)


def test_config_selects_the_source(tmp_path: Path) -> None:
    write_label_file([LabelRecord(layer=0, neuron=1, label="x")], tmp_path / "g.jsonl")
    src = label_source_from_config(LabelingSection(method="goodfire", labels_file="g.jsonl"), base_dir=tmp_path)
    assert isinstance(src, FileLabelSource) and src.labels_for([(0, 1), (5, 5)])[(0, 1)].source == "goodfire"
    assert isinstance(label_source_from_config(LabelingSection(method="neurondb")), NeuronDB)
    assert label_source_from_config(LabelingSection(method="none")) is None


def test_neurondb_import_query_and_graph_labels(postgres, tmp_path: Path) -> None:
    db = NeuronDB(_settings(postgres, table="desc_graph"))
    db.create_table()
    lines = [
        {"layer": 2, "neuron": 7, "polarity": "positive", "description": "capital cities"},
        {"layer": 2, "neuron": 7, "polarity": "negative", "description": "not a capital"},
        {"layer": 3, "neuron": 1, "description": "the token France"},
    ]
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps(line) for line in lines))
    assert db.import_records(iter_label_file(src, default_source="neurondb")) == 3
    assert db.import_records(iter_label_file(src, default_source="neurondb")) == 3  # idempotent upsert
    found = db.fetch([(2, 7), (3, 1), (9, 9)])
    assert [r.polarity for r in found[(2, 7)]] == [1, -1]
    assert (9, 9) not in found
    labels = db.labels_for([(2, 7), (3, 1)])
    assert labels[(2, 7)].label == "capital cities" and labels[(3, 1)].source == "neurondb"
    graph = Graph(units=[Unit(layer=2, index=7, position=0), Unit(layer=3, index=1, position=1)], prompt="p")
    labelled = graph.with_labels({k: r.label for k, r in labels.items()})
    clerps = [n["clerp"] for n in labelled.to_legacy()["nodes"]]
    assert clerps == ["L2/N7: capital cities", "L3/N1: the token France"]
    db.close()


def test_neurondb_failures_are_one_clear_line(postgres) -> None:
    with pytest.raises(Unavailable, match="password authentication failed") as err:
        NeuronDB(_settings(postgres, password="wrong")).connect()
    assert "wrong" not in str(err.value)
    with pytest.raises(NotFound, match="table 'missing_table' does not exist"):
        NeuronDB(_settings(postgres, table="missing_table")).fetch([(1, 1)])
    with pytest.raises(Unavailable, match="Connection refused|timeout"):
        NeuronDB(_settings(postgres, port=1)).connect()


def test_cli_import_query_and_errors(postgres, tmp_path: Path) -> None:
    env = {**os.environ, "PG_HOST": postgres["host"], "PG_PORT": str(postgres["port"]),
           "PG_USER": postgres["user"], "PG_PASSWORD": postgres["password"], "PG_DATABASE": postgres["database"]}
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"layer": 5, "neuron": 6, "description": "enzyme names"}) + "\n")
    cli = [sys.executable, "-m", "circuits.cli", "neurondb"]
    out = subprocess.run([*cli, "import", str(src), "--create", "--table", "cli_desc"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([*cli, "query", "5:6", "--table", "cli_desc", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout)["L5/N6"][0]["label"] == "enzyme names"
    bad = subprocess.run([*cli, "query", "5:6"], env={**env, "PG_PASSWORD": "nope"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert "nope" not in bad.stderr


def test_100k_descriptions_for_a_5k_neuron_graph_set(postgres) -> None:
    db = NeuronDB(_settings(postgres, table="desc_big"))
    db.create_table()
    records = (
        LabelRecord(layer=i // 4000, neuron=i % 4000, label=f"description {i}", polarity=1)
        for i in range(100_000)
    )
    assert db.import_records(records) == 100_000
    wanted = [((i * 7919) % 100_000 // 4000, (i * 7919) % 4000) for i in range(5_000)]
    started = time.perf_counter()
    found = db.fetch(wanted)
    elapsed = time.perf_counter() - started
    print(f"\nfetched {len(found):,} descriptions for {len(set(wanted)):,} neurons in {elapsed * 1000:.0f} ms")
    assert len(found) == len(set(wanted))
    started = time.perf_counter()
    everything = db.fetch([(i // 4000, i % 4000) for i in range(100_000)])
    elapsed = time.perf_counter() - started
    print(f"fetched {sum(map(len, everything.values())):,} descriptions (all) in {elapsed * 1000:.0f} ms")
    assert len(everything) == 100_000
    db.close()


def test_neurondb_descriptions_become_labeler_evidence(postgres, tmp_path: Path) -> None:
    from circuits_core.config import Config, LabelingSection
    from circuits_labeler.build import open_evidence
    from circuits_labeler.evidence import write_evidence_parquet

    db = NeuronDB(_settings(postgres, table="desc_evidence"))
    db.create_table()
    db.import_records([LabelRecord(layer=1, neuron=4, label="", description="fires on enzyme names", polarity=1)])
    db.close()
    write_evidence_parquet(tmp_path / "export", edges=[(0, 2, 1, 4, 3, 1.5)], units=[(0, 2, 3), (1, 4, 3)])
    section = LabelingSection(
        method="progressive", evidence_path=str(tmp_path / "export"), neurondb_evidence=True,
        pg_host=postgres["host"], pg_port=postgres["port"], pg_user=postgres["user"],
        pg_password=postgres["password"], pg_database=postgres["database"], pg_table="desc_evidence",
    )
    evidence = open_evidence(Config(labeling=section))
    prior = {(u.layer, u.neuron): u.prior_description for u in evidence.units()}
    assert prior[(1, 4)] == "fires on enzyme names"
    assert prior[(0, 2)] == ""


def _export_with_neurons(tmp_path: Path) -> Path:
    """Aggregate two small graphs with the real CLI; return the Parquet export folder."""
    from circuits import Edge, GraphMetadata
    from circuits.cli import main
    from circuits_core.graphio import write_graph

    graphs = tmp_path / "graphs"
    for n in range(2):
        units = [Unit(layer=1, index=4, position=0, activation=1.0, attribution=0.5),
                 Unit(layer=2, index=7, position=1, activation=2.0, attribution=0.7)]
        edges = [Edge(src_layer=1, src_index=4, src_position=0, tgt_layer=2, tgt_index=7, tgt_position=1, weight=0.3 + n)]
        write_graph(Graph(units=units, edges=edges, prompt=f"p{n}", graph_id=f"g{n}",
                          metadata=GraphMetadata(slug=f"s{n}", scan="m")), graphs / f"graph_{n}.pb.gz")
    export = tmp_path / "export"
    assert main(["aggregate", str(graphs), "--state", str(tmp_path / "agg.duckdb"), "--export", str(export)]) == 0
    return export


def test_build_db_takes_labels_from_neurondb(postgres, tmp_path: Path, monkeypatch) -> None:
    from circuits.cli import main
    from circuits_atlas import CircuitDatabase

    db = NeuronDB(_settings(postgres, table="desc_atlas"))
    db.create_table()
    db.import_records([LabelRecord(layer=2, neuron=7, label="", description="capital cities", polarity=1)])
    db.close()
    export = _export_with_neurons(tmp_path)
    config = tmp_path / "atlas.yaml"
    config.write_text(
        "aggregation:\n  export_dir: export\n  min_edge_count: 1\n"
        "clustering:\n  enabled: false\n"
        "labeling:\n  method: neurondb\n  pg_table: desc_atlas\n"
        "output:\n  duckdb: atlas.duckdb\n"
    )
    for key in ("host", "port", "user", "password", "database"):
        monkeypatch.setenv(f"PG_{key.upper()}", str(postgres[key]))
    assert main(["build-db", "--config", str(config)]) == 0
    with CircuitDatabase(tmp_path / "atlas.duckdb", read_only=True) as atlas:
        assert atlas.get_unit(2, 7).label == "capital cities"
        assert atlas.get_unit(1, 4).label == ""

    # wrong password: one clear error, exit 2, and no (partial) atlas written
    (tmp_path / "atlas.duckdb").unlink()
    monkeypatch.setenv("PG_PASSWORD", "not-the-password")
    assert main(["build-db", "--config", str(config)]) == 2
    assert not (tmp_path / "atlas.duckdb").exists()

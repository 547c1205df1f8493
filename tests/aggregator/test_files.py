"""Graph files: every format counts the same, corrupt files are reported and skipped, resume."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from circuits.cli import main as cli_main
from circuits_core.errors import CorruptInput
from circuits_core.graphio import write_graph
from circuits_aggregator import InMemoryAggregator
from circuits_core.graphio import read_graph_arrays
from circuits_aggregator.testing import random_graph

FORMATS = ("json", "json.gz", "pb", "pb.gz")


@pytest.fixture
def corpus():
    rng = np.random.default_rng(11)
    return [random_graph(rng, corpus_index=i) for i in range(24)]


def _write(directory, corpus):
    for i, g in enumerate(corpus):
        write_graph(g, directory / f"graph_{i:04d}.{FORMATS[i % 4]}")


def test_all_formats_equal_brute_force(tmp_path, corpus, brute) -> None:
    from circuits_core.graph_index import index_entry, update_graph_index

    _write(tmp_path / "g", corpus)
    # the viewers' index `circuits graph` keeps beside JSON graphs is not a graph
    update_graph_index(tmp_path / "g", index_entry(corpus[0].to_legacy()))
    with InMemoryAggregator(tmp_path / "state.duckdb") as agg:
        report = agg.process_directory(tmp_path / "g", checkpoint_interval=5)
        assert report.ingested == 24 and not report.corrupt
        agg.export(tmp_path / "e")
    edges, units, ledger = brute.export_rows(tmp_path / "e")
    brute.assert_matches(edges, units, corpus)
    assert sorted((r["corpus_index"], r["source"]) for r in ledger) == [
        (i, f"graph_{i:04d}.{FORMATS[i % 4]}") for i in range(24)
    ]


def test_legacy_json_without_graph_id_uses_content_hash(tmp_path, corpus) -> None:
    data = corpus[0].to_legacy()
    del data["metadata"]["graph_id"]
    text = json.dumps(data)
    (tmp_path / "a.json").write_text(text)
    (tmp_path / "b.json.gz").write_bytes(gzip.compress(text.encode()))
    a, b = read_graph_arrays(tmp_path / "a.json"), read_graph_arrays(tmp_path / "b.json.gz")
    assert a.graph_id == b.graph_id and len(a.graph_id) == 32
    with InMemoryAggregator() as agg:
        report = agg.process_directory(tmp_path)
        assert (report.ingested, report.duplicates) == (1, 1)


def _corruptions(tmp_path, corpus) -> dict[str, bytes]:
    """name -> bytes of broken graph files."""
    good_json = json.dumps(corpus[0].to_legacy()).encode()
    write_graph(corpus[1], tmp_path / "x.pb")
    good_pb = (tmp_path / "x.pb").read_bytes()
    (tmp_path / "x.pb").unlink()
    # The first unit ends right before the second unit's tag: a cut at a field boundary.
    from circuits_core import wire

    msg = wire.graph_to_proto(corpus[1])
    head = msg.__class__(graph_id=msg.graph_id, model=msg.model, prompt=msg.prompt)
    head.prompt_tokens.extend(msg.prompt_tokens)
    head.units.add().CopyFrom(msg.units[0])
    boundary = head.SerializeToString()
    bare_pb = wire.graph_to_bytes(corpus[1])  # a file from before compact files were framed
    assert bare_pb.startswith(boundary) and good_pb.endswith(bare_pb)
    header = len(good_pb) - len(bare_pb)
    dangling = json.loads(good_json)
    dangling["links"].append({"source": "nope", "target": dangling["nodes"][0]["node_id"], "weight": 1.0})
    return {
        "trunc.json": good_json[: len(good_json) // 2],
        "trunc.json.gz": gzip.compress(good_json)[:-9],
        "trunc.pb": good_pb[: len(good_pb) - 7],
        "boundary.pb": boundary,
        "boundary_framed.pb": good_pb[: header + len(boundary)],
        "flipped.pb": good_pb[:-3] + bytes([good_pb[-3] ^ 1]) + good_pb[-2:],
        "trunc.pb.gz": gzip.compress(good_pb)[:40],
        "empty.json": b"",
        "garbage.pb.gz": b"\x1f\x8b not gzip at all",
        "dangling.json": json.dumps(dangling).encode(),
        "list.json": b"[1, 2, 3]",
    }


def test_corrupt_files_are_reported_and_skipped(tmp_path, corpus, brute) -> None:
    _write(tmp_path / "g", corpus[:8])
    bad = _corruptions(tmp_path, corpus)
    for name, payload in bad.items():
        (tmp_path / "g" / name).write_bytes(payload)
        with pytest.raises(CorruptInput, match=name.replace(".", r"\.")):
            read_graph_arrays(tmp_path / "g" / name)
    with InMemoryAggregator() as agg:
        report = agg.process_directory(tmp_path / "g", checkpoint_interval=3)
        assert report.ingested == 8
        assert sorted(src for src, _ in report.corrupt) == sorted(bad)
        assert all(src in msg for src, msg in report.corrupt)
        agg.export(tmp_path / "e")
    brute.assert_matches(*brute.export_rows(tmp_path / "e")[:2], corpus[:8])


def test_cli_resume_after_partial_run_equals_single_pass(tmp_path, corpus, brute, capsys) -> None:
    _write(tmp_path / "g", corpus)
    (tmp_path / "g" / "broken.json").write_text('{"metadata": ')
    state = tmp_path / "state.duckdb"
    args = ["aggregate", str(tmp_path / "g"), "--state", str(state), "--no-progress", "--checkpoint-interval", "4"]
    assert cli_main([*args, "--max-graphs", "9"]) == 0
    assert cli_main(args) == 2  # a non-empty state needs --resume
    assert "--resume" in capsys.readouterr().err
    assert cli_main([*args, "--resume", "--export", str(tmp_path / "e")]) == 0
    out, err = capsys.readouterr()
    assert "aggregated 15 new graphs" in out and "1 corrupt" in out and "broken.json" in err
    edges, units, ledger = brute.export_rows(tmp_path / "e")
    assert len(ledger) == 24
    brute.assert_matches(edges, units, corpus)


def test_cli_merge_and_bad_arguments(tmp_path, corpus, brute, capsys) -> None:
    halves = (corpus[:10], corpus[10:])
    for n, part in enumerate(halves):
        _write(tmp_path / f"g{n}", part)
        assert cli_main(["aggregate", str(tmp_path / f"g{n}"), "--state", str(tmp_path / f"s{n}.duckdb"),
                         "--no-progress", "--export", str(tmp_path / f"e{n}")]) == 0  # fmt: skip
    assert cli_main(["aggregate", "--merge", str(tmp_path / "e0"), str(tmp_path / "e1"),
                     "--export", str(tmp_path / "m")]) == 0  # fmt: skip
    brute.assert_matches(*brute.export_rows(tmp_path / "m")[:2], corpus)
    capsys.readouterr()
    assert cli_main(["aggregate", "--merge", str(tmp_path / "e0")]) == 2
    assert cli_main(["aggregate", str(tmp_path / "missing"), "--state", str(tmp_path / "x.duckdb")]) == 2
    assert cli_main(["aggregate", "--merge", str(tmp_path / "g0"), "--export", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 3 and "Traceback" not in err


def test_an_empty_folder_and_a_failed_merge_leave_nothing_behind(tmp_path, corpus, capsys) -> None:
    """No graph file: one error line, exit 2, and no state created. A merge that fails (here: the
    same graphs in both exports) leaves no empty output folder."""
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "graph-metadata.json").write_text("{}")  # an index alone is not a graph
    state = tmp_path / "state.duckdb"
    assert cli_main(["aggregate", str(empty), "--state", str(state), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {empty}: no graph file (*.json, *.json.gz, *.pb, *.pb.gz) found; nothing to aggregate"]
    assert not state.exists()
    _write(tmp_path / "g", corpus[:4])
    assert cli_main(["aggregate", str(tmp_path / "g"), "--state", str(state), "--no-progress",
                     "--export", str(tmp_path / "e")]) == 0  # fmt: skip
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert cli_main(["aggregate", "--merge", str(tmp_path / "e"), str(tmp_path / "e"), "--export", str(merged)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: graph(s) ") and "appear in more than one export" in line
    assert not merged.exists()

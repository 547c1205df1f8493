"""Differential tests: every reader of a file format accepts and rejects the same files, with
the same message, and reads the same content from the files it accepts.

One set of valid and broken fixture files per format (graph files in every encoding, label
files, aggregator exports) goes through every reader of that format in the code base, including
the CLI commands that read it; a reader that disagrees with the others on any file fails.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from circuits import Edge, Graph, GraphMetadata, Unit
from circuits.cli import main as cli_main
from circuits_core import wire
from circuits_core.aggregator_types import EdgeColumns, GraphArrays, graph_arrays_from_graph
from circuits_core.errors import CircuitsError
from circuits_core.exports import EDGE_COLUMNS
from circuits_core.graphio import frame_pb, read_graph, read_graph_arrays, read_viewer_json, write_graph


@dataclass(frozen=True)
class Outcome:
    """What one reader made of one file: the content it read, or the error it raised."""

    content: Any = None
    error: str = ""  # "ClassName: message" of the CircuitsError


def outcome(read: Callable[[], Any]) -> Outcome:
    try:
        return Outcome(content=read())
    except CircuitsError as exc:
        return Outcome(error=f"{type(exc).__name__}: {exc}")


def cli_outcome(argv: list[str], capsys) -> Outcome:
    """Exit code 0 -> Outcome(content=stdout); 2 -> the error line (class unknown: 'CLI: msg')."""
    capsys.readouterr()
    code = cli_main(argv)
    out, err = capsys.readouterr()
    if code == 0:
        return Outcome(content=out)
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return Outcome(error=lines[0].removeprefix("error: "))


def assert_same_verdict(outcomes: dict[str, Outcome], name: str) -> None:
    """All readers accept, or all reject with the same message (CLI readers: same text)."""
    accepted = {reader for reader, o in outcomes.items() if not o.error}
    assert accepted in (set(), set(outcomes)), f"{name}: accepted by {sorted(accepted)} only: {outcomes}"
    if not accepted:
        messages = {o.error.split(": ", 1)[1] if not reader.startswith("cli") else o.error for reader, o in outcomes.items()}
        classes = {o.error.split(": ", 1)[0] for reader, o in outcomes.items() if not reader.startswith("cli")}
        assert len(messages) == 1 and len(classes) == 1, f"{name}: readers disagree: {outcomes}"
        assert "\n" not in next(iter(messages)) and name.split("/")[-1] in next(iter(messages))


# ==========================================================================================
# Graph files
# ==========================================================================================
def _graph() -> Graph:
    units = [
        Unit(layer=-1, index=11, position=0, kind="embedding", token="The", activation=1.0, attribution=0.3),
        Unit(layer=-1, index=12, position=1, kind="embedding", token=" capital", activation=1.0),
    ]
    units += [
        Unit(layer=layer, index=100 + 7 * layer + p, position=p, activation=0.5 + layer, attribution=0.1 * p,
             label="capital cities" if layer == 2 else "", token=("The", " capital")[p])
        for layer in range(5) for p in range(2)
    ]  # fmt: skip
    units.append(Unit(layer=5, index=42, position=1, kind="logit", token=" Paris", probability=0.75, attribution=1.0))
    rng = np.random.default_rng(3)
    edges = []
    for n in range(40):
        s, t = (int(i) for i in rng.choice(len(units) - 1, size=2, replace=False))
        a, b = units[s], units[t + 1]
        edges.append(Edge(src_layer=a.layer, src_index=a.index, src_position=a.position, tgt_layer=b.layer,
                          tgt_index=b.index, tgt_position=b.position, weight=float(rng.normal()),
                          raw_weight=None if n % 3 == 0 else float(rng.normal())))  # fmt: skip
    return Graph(units=units, edges=edges, prompt="The capital", prompt_tokens=("The", " capital"), model="tiny",
                 graph_id="g-differential", metadata=GraphMetadata(slug="diff", scan="tiny", corpus_index=7))  # fmt: skip


def _pb_message_variants(graph: Graph) -> dict[str, bytes]:
    """Serialized messages, each broken in one way the decoder must catch."""
    msg = wire.graph_to_proto(graph)
    out = {}
    m = type(msg)()
    m.CopyFrom(msg)
    m.edges.weight[5] = math.nan
    out["nan_weight"] = m.SerializeToString()
    m.CopyFrom(msg)
    m.edges.src[0] = len(m.units) + 3
    out["edge_out_of_range"] = m.SerializeToString()
    m.CopyFrom(msg)
    m.units[3].kind = 0
    out["kind_unset"] = m.SerializeToString()
    m.CopyFrom(msg)
    m.units[4].CopyFrom(m.units[3])
    out["duplicate_unit"] = m.SerializeToString()
    m.CopyFrom(msg)
    m.metadata.extra_json = "{not json"
    out["bad_extra_json"] = m.SerializeToString()
    m.CopyFrom(msg)
    m.edges.tgt.append(0)
    out["ragged_edges"] = m.SerializeToString()
    m.CopyFrom(msg)
    m.units[5].layer = 5000
    out["neuron_layer_too_big"] = m.SerializeToString()
    # a cut at a field boundary: graph header and 3 of 13 units, nothing after
    head = type(msg)(graph_id=msg.graph_id, model=msg.model, prompt=msg.prompt)
    head.prompt_tokens.extend(msg.prompt_tokens)
    for unit in msg.units[:3]:
        head.units.add().CopyFrom(unit)
    out["field_boundary"] = head.SerializeToString()
    return out


def _legacy_variants(graph: Graph) -> dict[str, Any]:
    """Parsed legacy JSON documents, each broken in one way (None = the text is replaced)."""
    good = graph.to_legacy()

    def changed(edit: Callable[[dict], None]) -> dict:
        data = json.loads(json.dumps(good))
        edit(data)
        return data

    neuron = next(i for i, n in enumerate(good["nodes"]) if n["feature_type"] == "mlp_neuron")
    return {
        "unknown_feature_type": changed(lambda d: d["nodes"][neuron].__setitem__("feature_type", "cross layer transcoder")),
        "missing_ctx_idx": changed(lambda d: d["nodes"][neuron].pop("ctx_idx")),
        "missing_weight": changed(lambda d: d["links"][4].pop("weight")),
        "nan_weight": changed(lambda d: d["links"][4].__setitem__("weight", math.nan)),
        "bool_weight": changed(lambda d: d["links"][4].__setitem__("weight", True)),
        "dangling_link": changed(lambda d: d["links"][2].__setitem__("target", "9_9_9")),
        "duplicate_node_id": changed(lambda d: d["nodes"].append(dict(d["nodes"][neuron]))),
        "duplicate_unit_key": changed(lambda d: d["nodes"].append({**d["nodes"][neuron], "node_id": "dup", "jsNodeId": "dup"})),
        "neuron_layer_too_big": changed(lambda d: d["nodes"][neuron].__setitem__("layer", "5000")),
        "feature_beyond_int64": changed(lambda d: d["nodes"][0].__setitem__("feature", 10**30)),
        "token_id_beyond_int32": changed(lambda d: d["nodes"][0].__setitem__("feature", 1 << 40)),
        "no_links": changed(lambda d: d.pop("links")),
        "not_an_object": [1, 2, 3],
    }


@pytest.fixture(scope="module")
def graph_files(tmp_path_factory) -> dict[str, tuple[Path, Graph | None]]:
    """name -> (file, the graph it holds or None when the file is broken)."""
    root = tmp_path_factory.mktemp("graph-files")
    graph = _graph()
    files: dict[str, tuple[Path, Graph | None]] = {}
    for name in ("good.json", "good.json.gz", "good.pb", "good.pb.gz"):
        files[name] = (write_graph(graph, root / name), graph)
    bare = wire.graph_to_bytes(graph)
    (root / "unframed.pb").write_bytes(bare)
    files["unframed.pb"] = (root / "unframed.pb", graph)
    no_id = Graph(units=graph.units, edges=graph.edge_table, prompt=graph.prompt, prompt_tokens=graph.prompt_tokens,
                  model=graph.model, metadata=graph.metadata)  # fmt: skip
    files["no_id.json"] = (write_graph(no_id, root / "no_id.json"), no_id)

    framed = (root / "good.pb").read_bytes()
    broken: dict[str, bytes] = {
        "empty.pb": b"",
        "empty.json": b"",
        "bad_gzip.pb.gz": b"\x1f\x8b\x08\x00 this is not deflate data",
        "cut_gzip.json.gz": (root / "good.json.gz").read_bytes()[:-12],
        "cut.json": (root / "good.json").read_bytes()[:300],
        "not_json.json": b"\xff\xfe not json",
        "cut_mid_field.pb": bare[: len(bare) // 2 + 1],
        "cut_mid_field_framed.pb": framed[: len(framed) // 2 + 1],
        "cut_framed_header.pb": framed[:10],
        "bit_flip_framed.pb": framed[:-40] + bytes([framed[-40] ^ 0x10]) + framed[-39:],
        "trailing_bytes_framed.pb": framed + b"\x00\x00",
        "future_version.pb": framed[:8] + (99).to_bytes(4, "little") + framed[12:],
        "not_a_graph.pb": b"\x0a\xff\xff\xff\xff\x0f garbage",
    }
    variants = _pb_message_variants(graph)
    for name, payload in variants.items():
        broken[f"{name}.pb"] = frame_pb(payload)
    broken["field_boundary_unframed.pb"] = variants["field_boundary"]
    broken["field_boundary_cut_frame.pb"] = framed[: len(framed) - len(bare) + len(variants["field_boundary"])]
    for name, data in _legacy_variants(graph).items():
        broken[f"{name}.json"] = json.dumps(data, allow_nan=True).encode()
    broken["unknown_feature_type.json.gz"] = gzip.compress(broken["unknown_feature_type.json"], mtime=0)
    for name, payload in broken.items():
        (root / name).write_bytes(payload)
        files[name] = (root / name, None)
    return files


def _arrays_key(a: GraphArrays) -> tuple:
    return (a.graph_id, a.corpus_index, *(getattr(a, f.name).tobytes() for f in fields(a) if f.name.startswith(("unit_", "edge_"))))


def _graph_readers(path: Path, tmp: Path, capsys) -> dict[str, Outcome]:
    """Every reader of graph files in the code base, as content that must agree across them."""
    from circuits_aggregator import InMemoryAggregator

    def via_aggregator_directory() -> tuple:
        folder = tmp / "dir"
        folder.mkdir()
        (folder / path.name).write_bytes(path.read_bytes())
        with InMemoryAggregator() as agg:
            report = agg.process_directory(folder)
            if report.corrupt:
                (_source, message), = report.corrupt
                from circuits_core.errors import CorruptInput

                raise CorruptInput(message.replace(str(folder / path.name), str(path)))
            stats = agg.stats()
            return report.ingested, stats.total_edge_observations, sum(e.weight_sum for e in agg.get_edges())

    def same_aggregate(counted: tuple, graph: Graph) -> bool:
        arrays = graph_arrays_from_graph(graph, graph_id="x")
        ingested, observations, weight_sum = counted
        return (ingested, observations) == (1, arrays.n_edges) and math.isclose(
            weight_sum, float(arrays.edge_weight.sum()), rel_tol=1e-12, abs_tol=1e-12
        )

    readers = {
        "read_graph": outcome(lambda: read_graph(path)),
        "Graph.load": outcome(lambda: Graph.load(path)),
        "read_graph_arrays": outcome(lambda: read_graph_arrays(path, source="s")),
        "read_viewer_json": outcome(lambda: read_viewer_json(path)),
        "aggregate_directory": outcome(via_aggregator_directory),
        "cli view": cli_outcome(["view", str(path), "--output", str(tmp / "page.html")], capsys),
        "cli cluster": cli_outcome(["cluster", "--graph", str(path), "--json", "--num-trials", "1"], capsys),
    }
    # Content: everything is derived from, and must equal, what read_graph made of the file.
    graph = readers["read_graph"].content
    if graph is not None:
        readers["Graph.load"] = Outcome(content=readers["Graph.load"].content == graph)
        arrays = readers["read_graph_arrays"].content
        readers["read_graph_arrays"] = Outcome(
            content=_arrays_key(arrays) == _arrays_key(graph_arrays_from_graph(graph, source="s", graph_id=arrays.graph_id))
        )
        viewer = readers["read_viewer_json"].content
        readers["read_viewer_json"] = Outcome(content=Graph.from_legacy(viewer) == graph)
        readers["aggregate_directory"] = Outcome(content=same_aggregate(readers["aggregate_directory"].content, graph))
        readers["cli view"] = Outcome(content=(tmp / "page.html").is_file())
        readers["cli cluster"] = Outcome(content="clusters" in json.loads(readers["cli cluster"].content))
        readers["read_graph"] = Outcome(content=True)
    return readers


def _each(fixtures: dict[str, Any], tmp_path: Path):
    """``(name, fixture, a fresh folder)`` for every fixture, in name order."""
    for n, (name, fixture) in enumerate(sorted(fixtures.items())):
        tmp = tmp_path / f"r{n}"
        tmp.mkdir()
        yield name, fixture, tmp


def test_every_graph_reader_agrees_on_every_file(graph_files, tmp_path, capsys) -> None:
    for name, (path, expected), tmp in _each(graph_files, tmp_path):
        outcomes = _graph_readers(path, tmp, capsys)
        assert_same_verdict(outcomes, path.name)
        if expected is None:
            assert all(o.error for o in outcomes.values()), name
        else:
            assert all(o.content is True for o in outcomes.values()), (name, outcomes)
            assert read_graph(path) == expected, name


def test_truncation_is_caught_at_every_byte(graph_files) -> None:
    """Every proper prefix of a framed compact file is rejected; the full file reads back."""
    path, graph = graph_files["good.pb"]
    data = path.read_bytes()
    cut = path.with_name("cut-every-byte.pb")
    for end in range(len(data)):
        cut.write_bytes(data[:end])
        with pytest.raises(CircuitsError):
            read_graph(cut)
        with pytest.raises(CircuitsError):
            read_graph_arrays(cut)
    cut.write_bytes(data)
    assert read_graph(cut) == graph


def test_unframed_files_cut_at_any_field_boundary_are_rejected(graph_files) -> None:
    """Old unframed files: every cut between two top-level fields is caught (no metadata)."""
    from circuits_core._proto.circuits.v1 import graph_pb2

    path, graph = graph_files["unframed.pb"]
    full = wire.graph_to_proto(graph)
    cut = path.with_name("boundary.pb")
    partial = graph_pb2.Graph()
    boundaries = 0
    for field_desc, value in full.ListFields():
        if field_desc.name == "metadata":
            break
        items = value if field_desc.is_repeated else [value]
        for item in items:
            target = getattr(partial, field_desc.name)
            if not field_desc.is_repeated:
                if field_desc.message_type:
                    target.CopyFrom(item)
                else:
                    setattr(partial, field_desc.name, item)
            elif field_desc.message_type:
                target.add().CopyFrom(item)
            else:
                target.append(item)
            cut.write_bytes(partial.SerializeToString())
            boundaries += 1
            for reader in (read_graph, read_graph_arrays):
                with pytest.raises(CircuitsError, match="no metadata"):
                    reader(cut)
    assert boundaries > len(graph.units)


# ==========================================================================================
# Label files
# ==========================================================================================
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, make_model, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


GRAPH_FILE = "relp-the-capital-of-france-is.json"
GRAPH_ARGS = ["graph", "the capital of france is", "--raw", "--tau", "0.05", "--dtype", "float64", "--max-nodes", "40"]


@pytest.fixture(scope="module")
def graph_neurons(tiny_model_dir, tmp_path_factory) -> list[tuple[int, int]]:
    """Neurons of the tiny model's graph for the CLI prompt (the label files name them)."""
    out = tmp_path_factory.mktemp("unlabelled")
    assert cli_main([*GRAPH_ARGS, "--model", str(tiny_model_dir), "--output-dir", str(out)]) == 0
    keys = sorted({u.key for u in read_graph(out / GRAPH_FILE).neurons})
    assert len(keys) >= 4
    return keys


@pytest.fixture(scope="module")
def label_files(graph_neurons, tmp_path_factory) -> dict[str, tuple[Path, dict | None]]:
    """name -> (file, {key: (label, input_label)} expected, or None when broken)."""
    from circuits_labeler.prompts import ParsedAnswer
    from circuits_labeler.store import LabelStore

    root = tmp_path_factory.mktemp("label-files")
    a, b, c, d = graph_neurons[:4]
    files: dict[str, tuple[Path, dict | None]] = {}

    store = LabelStore()  # a real labeler output: both passes, output only, input only
    answer = lambda label, t="semantic": ParsedAnswer(label=label, description=f"about {label}", type=t, confidence="high")  # noqa: E731
    store.set(a, label_pass="output", answer=answer("capital cities"), appearance_count=3)
    store.set(a, label_pass="input", answer=answer("country names", "context"))
    store.set(b, label_pass="output", answer=answer("France"))
    store.set(c, label_pass="input", answer=answer("the word 'capital'", "token"))
    store.write_jsonl(root / "labeler_output.jsonl", model="stub-llm")
    files["labeler_output.jsonl"] = (root / "labeler_output.jsonl", {
        a: ("capital cities", "country names"), b: ("France", ""), c: ("", "the word 'capital'")})  # fmt: skip

    def write(name: str, text: str, expected: dict | None) -> None:
        (root / name).write_text(text, encoding="utf-8")
        files[name] = (root / name, expected)

    seed = {"feature_metadata": {"layer": a[0], "neuron": a[1], "max_activation": 2.5},
            "labels": [{"text": "seed label", "metadata": {"parsed_response": {"description": "seed description"}}}]}
    write("seed_form.jsonl", json.dumps(seed) + "\n\n", {a: ("seed label", "")})
    write("json_list.json", json.dumps([{"layer": b[0], "neuron": b[1], "label": "listed", "source": "goodfire"},
                                         {"layer": c[0], "neuron": c[1], "description": "only a description"}]),
          {b: ("listed", ""), c: ("only a description", "")})  # fmt: skip
    write("string_keys.jsonl", json.dumps({"layer": f"L{d[0]}", "neuron": str(d[1]), "label": "strings",
                                           "extra": [1, 2], "polarity": "negative"}) + "\n", {d: ("strings", "")})  # fmt: skip
    write("later_line_wins.jsonl", "\n".join(json.dumps({"layer": a[0], "neuron": a[1], "label": t}) for t in ("old", "new")),
          {a: ("new", "")})  # fmt: skip
    write("input_description_only.jsonl", json.dumps({"layer": b[0], "neuron": b[1], "input_description": "fires on France"}),
          {b: ("", "fires on France")})  # fmt: skip
    # broken
    good_line = json.dumps({"layer": a[0], "neuron": a[1], "label": "x"})
    write("not_json.jsonl", good_line + "\nnot json\n", None)
    write("missing_layer.jsonl", json.dumps({"neuron": 1, "label": "x"}), None)
    write("negative_neuron.jsonl", json.dumps({"layer": 1, "neuron": -4, "label": "x"}), None)
    write("label_not_text.jsonl", json.dumps({"layer": 1, "neuron": 4, "label": 17}), None)
    write("no_text.jsonl", json.dumps({"layer": 1, "neuron": 4, "source": "x"}), None)
    write("bad_polarity.jsonl", json.dumps({"layer": 1, "neuron": 4, "label": "x", "polarity": 3}), None)
    write("list_with_number.json", json.dumps([{"layer": 1, "neuron": 4, "label": "x"}, 5]), None)
    write("pretty_printed.jsonl", json.dumps({"layer": 1, "neuron": 4, "label": "x"}, indent=2), None)
    write("nan_count.jsonl", '{"layer": 1, "neuron": 4, "label": "x", "appearance_count": NaN}', None)
    (root / "not_utf8.jsonl").write_bytes(good_line.encode() + b"\n" + b'{"layer": 1, "neuron": 2, "label": "\xff"}\n')
    files["not_utf8.jsonl"] = (root / "not_utf8.jsonl", None)
    return files


@pytest.fixture(scope="module")
def small_export(tmp_path_factory) -> Path:
    from circuits_aggregator import InMemoryAggregator
    from circuits_aggregator.testing import random_graph

    rng = np.random.default_rng(2)
    out = tmp_path_factory.mktemp("export")
    with InMemoryAggregator() as agg:
        for i in range(6):
            agg.add_graph(random_graph(rng, graph_id=f"g{i}"))
        agg.export(out)
    return out


def _label_readers(path: Path, keys: list, tmp: Path, tiny_model_dir: Path, small_export: Path, capsys) -> dict[str, Outcome]:
    """Every reader of label files: core, `circuits graph --labels`, the atlas build, the labeler."""
    from circuits_atlas.build import build_atlas
    from circuits_core.labels import FileLabelSource, read_label_file
    from circuits_labeler.store import LabelStore

    def core() -> dict:
        return {k: (r.label, r.input_label) for k, r in read_label_file(path).items()}

    def file_source() -> dict:
        return {k: (r.label, r.input_label) for k, r in FileLabelSource(path).labels_for(keys).items()}

    def atlas() -> dict:
        report = build_atlas(export_dir=small_export, output_path=tmp / "atlas.duckdb", labels_path=path,
                             clustering=None, min_edge_count=1)  # fmt: skip
        rows = _query(report.path, "SELECT layer, neuron, coalesce(label, ''), coalesce(input_label, '') FROM neurons "
                                   "WHERE label IS NOT NULL OR input_label IS NOT NULL")  # fmt: skip
        return {(layer, neuron): (label, input_label) for layer, neuron, label, input_label in rows}

    def labeler() -> dict:
        return {
            e.key: (e.output.label if e.output else "", e.input.label if e.input else "")
            for e in LabelStore.read_jsonl(path).all()
        }

    readers = {"core": outcome(core), "FileLabelSource": outcome(file_source), "atlas build": outcome(atlas),
               "labeler store": outcome(labeler)}  # fmt: skip
    out = tmp / "graph"
    cli = cli_outcome([*GRAPH_ARGS, "--model", str(tiny_model_dir), "--output-dir", str(out), "--labels", str(path)], capsys)
    if not cli.error:
        cli = Outcome(content={u.key: (u.label, u.input_label) for u in read_graph(out / GRAPH_FILE).neurons
                               if u.label or u.input_label})  # fmt: skip
    readers["cli graph --labels"] = cli
    # The graph shows the neurons it has; compare every reader on those.
    for name in ("core", "atlas build", "labeler store"):
        if readers[name].content is not None:
            readers[f"{name} (graph neurons)"] = Outcome(content={k: v for k, v in readers[name].content.items() if k in keys})
    return readers


def test_every_label_reader_agrees_on_every_file(label_files, graph_neurons, tiny_model_dir, small_export, tmp_path, capsys):
    for name, (path, expected), tmp in _each(label_files, tmp_path):
        outcomes = _label_readers(path, graph_neurons, tmp, tiny_model_dir, small_export, capsys)
        assert_same_verdict(outcomes, path.name)
        if expected is None:
            continue
        assert outcomes["core"].content == expected, name
        assert outcomes["labeler store"].content == expected, name
        assert outcomes["atlas build"].content == expected, name
        on_graph = {k: v for k, v in expected.items() if k in graph_neurons}
        for reader in ("FileLabelSource", "cli graph --labels", "core (graph neurons)", "atlas build (graph neurons)",
                       "labeler store (graph neurons)"):  # fmt: skip
            assert outcomes[reader].content == on_graph, (name, reader)


def test_labeler_output_round_trips_through_the_core_reader(label_files) -> None:
    from circuits_core.labels import read_label_file
    from circuits_labeler.store import LabelStore

    path, _expected = label_files["labeler_output.jsonl"]
    store = LabelStore.read_jsonl(path)
    again = path.with_name("again.jsonl")
    store.write_jsonl(again, model="stub-llm")
    assert again.read_bytes() == path.read_bytes()
    records = read_label_file(path)
    input_only = [r for r in records.values() if not r.label]
    assert len(input_only) == 1 and input_only[0].source == "progressive_input" and input_only[0].passes == ("input",)


# ==========================================================================================
# Aggregator exports
# ==========================================================================================
@pytest.fixture(scope="module")
def export_dirs(small_export, tmp_path_factory) -> dict[str, tuple[Path, bool]]:
    """name -> (export directory, valid?)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("exports")
    tables = {name: pq.read_table(small_export / f"{name}.parquet") for name in ("edges", "units", "ledger")}
    dirs: dict[str, tuple[Path, bool]] = {"aggregator_export": (small_export, True)}

    def make(name: str, valid: bool, **replace: Any) -> None:
        folder = root / name
        folder.mkdir()
        for table_name, table in tables.items():
            value = replace.get(table_name, table)
            if value is None:
                continue
            if isinstance(value, bytes):
                (folder / f"{table_name}.parquet").write_bytes(value)
            else:
                pq.write_table(value, folder / f"{table_name}.parquet")
        dirs[name] = (folder, valid)

    edges, units, ledger = tables["edges"], tables["units"], tables["ledger"]
    make("extra_column", True, units=units.append_column("description", pa.array(["d"] * units.num_rows)))
    make("no_rows", True, edges=edges.slice(0, 0), units=units.slice(0, 0), ledger=ledger.slice(0, 0))
    make("missing_ledger", False, ledger=None)
    make("missing_units", False, units=None)
    make("missing_edge_column", False, edges=edges.drop(["weight_abs_sum"]))
    make("count_as_text", False, edges=edges.set_column(4, "count", pa.array([str(c) for c in edges.column("count").to_pylist()])))
    make("graph_id_as_number", False, ledger=ledger.set_column(0, "graph_id", pa.array(range(ledger.num_rows))))
    make("edges_not_parquet", False, edges=b"PAR1 this is not parquet")
    make("duplicate_graph_ids", False, ledger=pa.concat_tables([ledger, ledger.slice(0, 2)]))
    make("null_graph_id", False, ledger=ledger.set_column(0, "graph_id", pa.array([None] + ledger.column("graph_id").to_pylist()[1:], pa.string())))
    return dirs


def _query(atlas: Path, sql: str) -> list[tuple]:
    import duckdb

    con = duckdb.connect(str(atlas), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _export_readers(folder: Path, tmp: Path, capsys) -> dict[str, Outcome]:
    """Every reader of aggregator exports: merge (API and CLI), the atlas build, the labeler evidence."""
    from circuits_aggregator.merge import merge_exports
    from circuits_atlas.build import build_atlas
    from circuits_labeler.evidence import DuckDBEvidence

    def merged() -> set:
        merge_exports([folder], tmp / "merged")
        return _edge_keys(tmp / "merged")

    def atlas() -> set:
        report = build_atlas(export_dir=folder, output_path=tmp / "atlas.duckdb", clustering=None, min_edge_count=1)
        return set(_query(report.path, "SELECT src_layer, src_neuron, tgt_layer, tgt_neuron, count FROM edges"))

    def evidence() -> set:
        ev = DuckDBEvidence(folder)
        try:
            return {(layer, n, *other.key, other.count) for layer in range(ev.max_layer() + 1)
                    for n, others in ev.downstream(layer, limit=10**6).items() for other in others}  # fmt: skip
        finally:
            ev.close()

    readers = {"merge_exports": outcome(merged), "build_atlas": outcome(atlas), "DuckDBEvidence": outcome(evidence)}
    readers["cli aggregate --merge"] = cli_outcome(["aggregate", "--merge", str(folder), "--export", str(tmp / "cli")], capsys)
    if not readers["cli aggregate --merge"].error:
        readers["cli aggregate --merge"] = Outcome(content=_edge_keys(tmp / "cli"))
    return readers


def _edge_keys(export: Path) -> set[tuple[int, ...]]:
    """(src_layer, src_neuron, tgt_layer, tgt_neuron, count) of every row of an export's edges."""
    import pyarrow.parquet as pq

    table = pq.read_table(export / "edges.parquet")
    return set(zip(*(table.column(c).to_pylist() for c in ("src_layer", "src_neuron", "tgt_layer", "tgt_neuron", "count"))))


def test_every_export_reader_agrees_on_every_directory(export_dirs, tmp_path, capsys) -> None:
    for name, (folder, valid), tmp in _each(export_dirs, tmp_path):
        outcomes = _export_readers(folder, tmp, capsys)
        assert_same_verdict(outcomes, folder.name)
        if valid:
            truth = _edge_keys(folder)
            assert all(o.content == truth for o in outcomes.values()), (name, outcomes)
        else:
            assert all(o.error for o in outcomes.values()), (name, outcomes)


def test_exports_of_two_shards_sharing_a_graph_are_refused_by_every_multi_export_reader(small_export, tmp_path) -> None:
    import shutil

    from circuits_aggregator.merge import merge_exports
    from circuits_core.errors import InvalidArgument
    from circuits_labeler.evidence import DuckDBEvidence

    shards = tmp_path / "shards"
    for shard in ("a", "b"):
        shutil.copytree(small_export, shards / shard)
    with pytest.raises(InvalidArgument, match="more than one export") as merge_err:
        merge_exports([shards / "a", shards / "b"], tmp_path / "m")
    with pytest.raises(InvalidArgument, match="more than one export") as evidence_err:
        DuckDBEvidence(shards)
    assert str(merge_err.value) == str(evidence_err.value)


def test_edge_columns_follow_the_export_column_order() -> None:
    assert tuple(f.name for f in fields(EdgeColumns)) == EDGE_COLUMNS

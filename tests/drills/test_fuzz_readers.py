"""Hostile input for every file reader: corrupted graph JSON/compact files, config YAML, label files.

Each reader must either parse or raise a CircuitsError with a one-line message; nothing else may
escape (no KeyError/TypeError/AttributeError tracebacks), and the input file is never modified.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuits import Edge, Graph, GraphMetadata, Unit, UnitLabel
from circuits_core.config import load_config
from circuits_core.errors import CircuitsError
from circuits_core.graphio import read_graph, read_graph_arrays, write_graph
from circuits_core.labels import read_label_file

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _sample_graph() -> Graph:
    units = (
        Unit(layer=-1, index=5, position=0, kind="embedding", token="The", activation=1.0),
        Unit(layer=0, index=3, position=0, activation=0.5, attribution=0.1, label="x", input_label="y",
             appearance_count=2, cluster="1.2", labels=(UnitLabel(text="x", source="human"),)),
        Unit(layer=1, index=9, position=0, kind="logit", token=" Paris", probability=0.4),
    )
    edges = (
        Edge(src_layer=-1, src_index=5, src_position=0, tgt_layer=0, tgt_index=3, tgt_position=0, weight=0.1),
        Edge(src_layer=0, src_index=3, src_position=0, tgt_layer=1, tgt_index=9, tgt_position=0, weight=0.2),
    )
    return Graph(units=units, edges=edges, prompt="p", prompt_tokens=("The",),
                 metadata=GraphMetadata(slug="s", scan="m"))


def _check_reader(path: Path, reader) -> None:
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        reader(path)
    except CircuitsError as exc:
        assert "\n" not in str(exc) and str(exc)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


@FUZZ
@given(data=st.data())
def test_graph_json_with_replaced_fields(data, tmp_path: Path) -> None:
    legacy = _sample_graph().to_legacy()
    section = data.draw(st.sampled_from(["metadata", "nodes", "links", "root"]))
    value = data.draw(json_values)
    if section == "root":
        legacy = value
    elif section == "metadata":
        legacy["metadata"][data.draw(st.sampled_from(["prompt", "prompt_tokens", "target_position", "info"]))] = value
    else:
        items = legacy[section]
        item = items[data.draw(st.integers(0, len(items) - 1))]
        item[data.draw(st.sampled_from(sorted(item)))] = value
    path = tmp_path / "g.json"
    path.write_text(json.dumps(legacy))
    _check_reader(path, read_graph)
    assert _verdict(read_graph, path) == _verdict(read_graph_arrays, path)


@FUZZ
@given(cut=st.integers(0, 4000), flip=st.integers(0, 4000), byte=st.integers(0, 255),
       name=st.sampled_from(["g.json", "g.json.gz", "g.pb", "g.pb.gz"]))
def test_truncated_and_bit_flipped_graph_files(tmp_path: Path, cut: int, flip: int, byte: int, name: str) -> None:
    path = write_graph(_sample_graph(), tmp_path / name)
    raw = bytearray(path.read_bytes())
    raw = raw[: cut % (len(raw) + 1)]
    if raw:
        raw[flip % len(raw)] = byte
    path.write_bytes(bytes(raw))
    _check_reader(path, read_graph)
    _check_reader(path, read_graph_arrays)
    assert _verdict(read_graph, path) == _verdict(read_graph_arrays, path)


def _verdict(reader, path: Path) -> str:
    """"" when ``reader`` accepts the file, else its error message (readers must agree)."""
    try:
        reader(path)
    except CircuitsError as exc:
        return str(exc)
    return ""


@FUZZ
@given(text=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_config_yaml_garbage(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    _check_reader(path, load_config)


@FUZZ
@given(lines=st.lists(json_values.map(json.dumps) | st.text(max_size=30), max_size=5))
def test_label_file_garbage(tmp_path: Path, lines: list[str]) -> None:
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(lines))
    _check_reader(path, read_label_file)

"""Round trips of the domain types through legacy JSON and protobuf, and malformed-input errors."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from viewer_requirements import viewer_problems

from circuits import Edge, Graph, GraphMetadata, Unit, UnitLabel
from circuits_core import wire
from circuits_core.errors import CorruptInput
from circuits_core.graphio import read_graph, write_graph

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "neuronpedia-graph-schema.json").read_text())

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
text = st.text(max_size=12)


@st.composite
def graphs(draw) -> Graph:
    n_tokens = draw(st.integers(1, 6))
    tokens = tuple(draw(st.lists(text, min_size=n_tokens, max_size=n_tokens)))
    units: dict[tuple, Unit] = {}
    for p in range(n_tokens):
        tok_id = draw(st.integers(0, 50_000))
        u = Unit(layer=-1, index=tok_id, position=p, kind="embedding", token=tokens[p], activation=1.0)
        units[u.node_key] = u
    n_neurons = draw(st.integers(0, 12))
    for _ in range(n_neurons):
        layer = draw(st.integers(0, 7))
        u = Unit(
            layer=layer,
            index=draw(st.integers(0, 20_000)),
            position=draw(st.integers(0, n_tokens - 1)),
            label=draw(st.text(max_size=60).filter(lambda s: ":" not in s)),
            input_label=draw(text),
            activation=draw(finite),
            attribution=draw(finite),
            appearance_count=draw(st.integers(0, 10**6)),
            labels=tuple(draw(st.lists(st.builds(UnitLabel, text=text, source=text), max_size=2))),
            cluster=draw(st.sampled_from(["", "1", "1.2.3"])),
        )
        units.setdefault(u.node_key, u)
    logit_layer = 8
    for j in range(draw(st.integers(1, 3))):
        u = Unit(
            layer=logit_layer,
            index=draw(st.integers(0, 50_000)),
            position=n_tokens - 1,
            kind="logit",
            token=draw(text),
            probability=draw(st.floats(0, 1)),
        )
        units.setdefault(u.node_key, u)
    unit_list = list(units.values())
    edges = []
    if len(unit_list) > 1:
        for _ in range(draw(st.integers(0, 20))):
            s, t = draw(st.sampled_from(unit_list)), draw(st.sampled_from(unit_list))
            edges.append(
                Edge(
                    src_layer=s.layer, src_index=s.index, src_position=s.position,
                    tgt_layer=t.layer, tgt_index=t.index, tgt_position=t.position,
                    weight=draw(finite), raw_weight=draw(st.none() | finite),
                )
            )
    metadata = GraphMetadata(
        slug=draw(st.text(alphabet="abcXYZ019_.-", min_size=1, max_size=10)),
        # a viewer model id (Neuronpedia's rule); other names are mapped on writing (test_viewer_fields)
        scan=draw(st.text(alphabet="abcXYZ019_.-", min_size=1, max_size=10)),
        target_position=n_tokens - 1,
        node_threshold=draw(st.none() | st.floats(0, 1)),
        metric_value=draw(st.none() | finite),
        nodes_exceeded=draw(st.booleans()),
        max_n_logits=draw(st.integers(0, 10)),
        create_time_ms=draw(st.integers(0, 2**40)),
        corpus_index=draw(st.integers(-1, 10**6)),
    )
    return Graph(
        units=tuple(unit_list),
        edges=tuple(edges),
        prompt=draw(text),
        prompt_tokens=tokens,
        model=draw(text),
        graph_id=draw(st.text(alphabet="0123456789abcdef", max_size=32)),
        metadata=metadata,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_protobuf_round_trip_is_lossless(graph: Graph) -> None:
    msg = wire.graph_to_proto(graph)
    decoded = type(msg)()
    decoded.ParseFromString(msg.SerializeToString())
    assert wire.graph_from_proto(decoded) == graph


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_legacy_round_trip_preserves_graph_and_validates(graph: Graph) -> None:
    legacy = graph.to_legacy()
    jsonschema.validate(legacy, SCHEMA)
    assert viewer_problems(legacy) == []  # circuit-tracer's model and frontend, Neuronpedia's upload
    # through real JSON text, as files carry it
    parsed = Graph.from_legacy(json.loads(json.dumps(legacy)))
    assert parsed == graph
    assert parsed.to_legacy() == legacy


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(graph=graphs())
def test_graph_files_round_trip_in_every_format(graph: Graph, tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("g")
    for name in ("g.json", "g.json.gz", "g.pb", "g.pb.gz"):
        assert read_graph(write_graph(graph, folder / name)) == graph


def _minimal() -> dict:
    return Graph(
        units=(
            Unit(layer=2, index=7, position=0, activation=1.5, attribution=0.25, label="capital cities"),
            Unit(layer=3, index=11, position=0, kind="logit", token=" Paris", probability=0.8),
        ),
        edges=(Edge(src_layer=2, src_index=7, src_position=0, tgt_layer=3, tgt_index=11, tgt_position=0, weight=0.25),),
        prompt="The capital of France is",
        prompt_tokens=("The",),
    ).to_legacy()


def test_legacy_node_encodings_follow_the_spec() -> None:
    legacy = _minimal()
    neuron, logit = legacy["nodes"]
    assert neuron["node_id"] == "2_7_0" and neuron["feature_type"] == "mlp_neuron"
    assert neuron["clerp"] == "L2/N7: capital cities" and neuron["layer"] == "2"
    assert logit["node_id"] == "L_11_0" and logit["isLogit"] is True
    assert logit["clerp"] == 'Output " Paris" (p=0.800)'
    assert neuron["attribution"] == 0.25 and neuron["influence"] == 1.0 and logit["influence"] is None
    assert legacy["metadata"]["slug"] == "relp-the-capital-of-france-is"
    jsonschema.validate(legacy, SCHEMA)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("nodes"), "missing field 'nodes'"),
        (lambda d: d["metadata"].pop("prompt"), "metadata: missing field 'prompt'"),
        (lambda d: d["nodes"][0].pop("ctx_idx"), "node '2_7_0': missing field 'ctx_idx'"),
        (lambda d: d["nodes"][0].__setitem__("ctx_idx", "zero"), "'ctx_idx' must be int, got str"),
        (lambda d: d["nodes"][0].__setitem__("feature", 1.5), "'feature' must be int/NoneType, got float"),
        (lambda d: d["nodes"][0].__setitem__("activation", "big"), "'activation' must be a number or null"),
        (lambda d: d["links"][0].__setitem__("source", "9_9_9"), "links[0]: source '9_9_9' is not a node"),
        (lambda d: d["links"][0].__setitem__("target", "nope"), "links[0]: target 'nope' is not a node"),
        (lambda d: d["links"][0].__setitem__("weight", None), "'weight' must be int/float, got NoneType"),
        (lambda d: d["nodes"].append(dict(d["nodes"][0])), "duplicate node_id '2_7_0'"),
        (lambda d: d["nodes"][0].__setitem__("feature_type", "transcoder"), "unsupported feature_type"),
        (lambda d: d["metadata"].__setitem__("prompt_tokens", [1, 2]), "prompt_tokens must be a list of strings"),
    ],
)
def test_malformed_legacy_json_names_what_is_wrong(mutate, message: str) -> None:
    data = copy.deepcopy(_minimal())
    mutate(data)
    with pytest.raises(CorruptInput) as err:
        Graph.from_legacy(data, source="g.json")
    assert message in str(err.value)
    assert str(err.value).startswith("g.json")
    assert "\n" not in str(err.value)


def test_corrupt_files_raise_corrupt_input_naming_the_file(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"metadata": ')
    truncated = tmp_path / "cut.pb.gz"
    truncated.write_bytes(write_graph(Graph.from_legacy(_minimal()), tmp_path / "ok.pb.gz").read_bytes()[:20])
    for path in (bad_json, truncated):
        with pytest.raises(CorruptInput, match=path.name):
            read_graph(path)


def test_edge_table_with_bad_indices_is_rejected() -> None:
    from circuits_core.errors import InvalidArgument

    msg = wire.graph_to_proto(Graph.from_legacy(_minimal()))
    msg.edges.src[0] = 99
    with pytest.raises(InvalidArgument, match="unit index"):
        wire.graph_from_proto(msg)
    msg.edges.src.append(0)
    with pytest.raises(InvalidArgument, match="differ in length"):
        wire.graph_from_proto(msg)


def test_seed_api_constructors() -> None:
    unit = Unit(layer=24, index=5326, label="capital cities")
    edge = Edge(src_layer=1, src_index=2, tgt_layer=3, tgt_index=4, weight=0.5)
    graph = Graph(units=[unit], edges=[], prompt="p")
    assert unit.unit_id == "L24/N5326" and edge.weight == 0.5 and graph.units == (unit,)
    assert math.isclose(Edge(src_layer=0, src_index=0, tgt_layer=1, tgt_index=0, weight=1, count=4, weight_abs_sum=2).mean_abs_weight, 0.5)

"""One trace request type: its defaults are written once, its field docs are the CLI help, and the
proto, config, worker and CLI all map to it."""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field

import pytest

from circuits_core import wire
from circuits_core._proto.circuits.v1 import attribution_pb2
from circuits_core.config import GraphsSection, config_from_mapping
from circuits_core.errors import ConfigError, InvalidArgument
from circuits_core.fieldargs import add_field_arguments, field_docs, field_values
from circuits_core.tracing import TraceRequest, TraceSettings, parse_prompt_line, trace_settings_of

SETTINGS = [f.name for f in dataclasses.fields(TraceSettings)]
REQUEST = [f.name for f in dataclasses.fields(TraceRequest)]


def _words(text: str) -> str:
    return " ".join(text.split())


def _help(parser: argparse.ArgumentParser) -> str:
    return _words(parser.format_help())


# -- field docs are the CLI help -------------------------------------------------------------------
def test_every_request_field_has_a_doc_and_a_graph_flag_showing_it() -> None:
    from circuits.cli import build_parser

    docs = field_docs(TraceRequest)
    assert set(docs) == set(REQUEST), f"undocumented: {set(REQUEST) - set(docs)}"
    graph = build_parser()._subparsers._group_actions[0].choices["graph"]  # noqa: SLF001 - the real parser
    dests = {action.dest: action for action in graph._actions}  # noqa: SLF001
    text = _help(graph)
    for name in REQUEST:
        assert name in dests, f"no flag for {name}"
        assert _words(docs[name]) in text, f"--help lacks the doc of {name}"
    assert dests["prompt"].option_strings == [] and dests["k"].option_strings == ["--k"]
    assert "(default: 5)" in text and "(default: 0.005)" in text and "(default: 500)" in text


def test_analyze_and_worker_flags_come_from_the_same_docs() -> None:
    from circuits.cli import build_parser

    analyze = build_parser()._subparsers._group_actions[0].choices["analyze"]  # noqa: SLF001
    parsers = [analyze]
    try:
        from circuits_attribution.worker import build_parser as worker_parser
    except ImportError:
        pass
    else:
        parsers.append(worker_parser())
    docs = field_docs(TraceSettings)
    for parser in parsers:
        text = _help(parser)
        dests = {action.dest for action in parser._actions}  # noqa: SLF001
        for name in SETTINGS:
            assert name in dests and _words(docs[name]) in text, (parser.prog, name)
    assert "default: config graphs.k, else 5" in _help(analyze)


def test_flags_not_given_leave_the_defaults_to_the_type() -> None:
    parser = argparse.ArgumentParser()
    add_field_arguments(parser, TraceRequest)
    assert TraceRequest(**field_values(parser.parse_args(["hi"]), TraceRequest)) == TraceRequest(prompt="hi")
    args = parser.parse_args(["hi", "--k", "2", "--target-tokens", "a", "b", "--raw", "--target-position", "-1"])
    assert field_values(args, TraceRequest) == {
        "prompt": "hi", "k": 2, "target_tokens": ("a", "b"), "raw": True, "target_position": -1,
    }
    args = parser.parse_args(["hi", "--contrastive", "a", "b"])
    assert TraceRequest(**field_values(args, TraceRequest)).contrastive == ("a", "b")
    # raw is tri-state: unset (the model's own prompt form), --raw, --chat; the two exclude each other
    assert TraceRequest(prompt="hi").raw is None and "raw" not in field_values(parser.parse_args(["hi"]), TraceRequest)
    assert field_values(parser.parse_args(["hi", "--chat"]), TraceRequest) == {"prompt": "hi", "raw": False}
    with pytest.raises(SystemExit):
        parser.parse_args(["hi", "--raw", "--chat"])
    args = parser.parse_args(["hi", "--max-nodes", "9", "--over-max-nodes", "skip_edges"])
    assert TraceRequest(**field_values(args, TraceRequest)).over_max_nodes == "skip_edges"
    with pytest.raises(SystemExit):
        parser.parse_args(["hi", "--over-max-nodes", "drop"])
    with pytest.raises(InvalidArgument, match="over_max_nodes must be one of prune, skip_edges"):
        TraceRequest(prompt="hi", over_max_nodes="drop")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Sample:
    #: The thing
    #: on two lines.
    name: str
    #: A count (100% sure).
    count: int = 3
    undocumented: float = 1.5
    #: Pick some.
    picks: tuple[str, ...] = field(default=(), metadata={"metavar": "PICK"})
    #: Not a field comment: the next line is code.

    #: Switch it on.
    on: bool = False


def test_field_docs_read_the_comment_block_above_each_field() -> None:
    assert field_docs(_Sample) == {
        "name": "The thing on two lines.", "count": "A count (100% sure).", "picks": "Pick some.", "on": "Switch it on.",
    }
    parser = argparse.ArgumentParser(prog="sample")
    assert add_field_arguments(parser, _Sample, exclude=("undocumented",)) == ["name", "count", "picks", "on"]
    text = _help(parser)
    assert "A count (100% sure). (default: 3)" in text and "--picks PICK [PICK ...]" in text and "--on" in text
    assert "undocumented" not in text
    with pytest.raises(TypeError, match="unsupported field type"):

        @dataclass
        class Bad:
            #: A mapping.
            table: dict[str, int] = field(default_factory=dict)

        add_field_arguments(argparse.ArgumentParser(), Bad)


# -- one set of defaults -------------------------------------------------------------------------
def test_the_config_section_and_the_engine_config_inherit_the_request_settings() -> None:
    defaults = trace_settings_of(TraceSettings())
    assert defaults["k"] == 5 and defaults["tau"] == 0.005 and defaults["max_nodes"] == 500
    assert issubclass(TraceRequest, TraceSettings) and issubclass(GraphsSection, TraceSettings)
    assert trace_settings_of(GraphsSection()) == defaults
    assert trace_settings_of(TraceRequest(prompt="x")) == defaults
    assert trace_settings_of(config_from_mapping({}).graphs) == defaults
    cfg = config_from_mapping({"graphs": {"k": 2, "contrastive": ["a", "b"], "prompts": ["p"]}})
    assert cfg.graphs.request("p") == TraceRequest(prompt="p", k=2, contrastive=("a", "b"))
    with pytest.raises(ConfigError, match=r"graphs: k must be"):
        config_from_mapping({"graphs": {"k": 0}})
    attributor = pytest.importorskip("circuits_attribution.attributor")
    assert issubclass(attributor.RelPConfig, TraceSettings)
    assert trace_settings_of(attributor.RelPConfig()) == defaults


def test_an_unset_proto_field_takes_the_one_default() -> None:
    decoded = wire.trace_request_from_proto(attribution_pb2.TraceRequest(prompt="hi"))
    assert decoded == TraceRequest(prompt="hi")
    requests = [
        TraceRequest(prompt="hi"),
        TraceRequest(prompt="hi", k=2, tau=0.0, max_nodes=0, raw=True, answer_prefix="a", target_position=-2,
                     corpus_index=7, slug="s"),
        TraceRequest(prompt="hi", target_tokens=("x", "y")),
        TraceRequest(prompt="hi", contrastive=("x", "y"), target_position=0),
        TraceRequest(prompt="hi", raw=False, over_max_nodes="skip_edges"),
    ]
    assert wire.trace_request_to_proto(TraceRequest(prompt="hi")).HasField("raw") is False
    for request in requests:
        assert wire.trace_request_from_proto(wire.trace_request_to_proto(request)) == request


def test_a_target_mode_replaces_the_inherited_one() -> None:
    base = TraceSettings(target_tokens=("a",), k=3)
    assert base.request("p", contrastive=("b", "c")) == TraceRequest(prompt="p", contrastive=("b", "c"), k=3)
    assert base.updated(target_tokens=()) == TraceSettings(k=3)
    with pytest.raises(InvalidArgument, match="cannot be combined"):
        TraceRequest(prompt="p", target_tokens=("a",), contrastive=("b", "c"))


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('"just a prompt"', TraceRequest(prompt="just a prompt", k=2, corpus_index=4)),
        ('{"prompt": "p", "k": 1, "id": 9}', TraceRequest(prompt="p", k=1, corpus_index=4)),
        ('{"prompt": "p", "corpus_index": 0, "target_tokens": ["t"]}', TraceRequest(prompt="p", k=2, corpus_index=0, target_tokens=("t",))),
    ],
)
def test_prompt_lines_fill_what_they_do_not_set(line: str, expected: TraceRequest) -> None:
    parsed = parse_prompt_line(line, where="f:5", defaults=TraceSettings(k=2), corpus_index=4)
    assert parsed.request == expected


@pytest.mark.parametrize(
    ("line", "message"),
    [("{", "f:5: invalid JSON"), ('{"prompt": "p", "colour": 1}', "f:5: unknown key(s) colour"),
     ('{"prompt": "p", "k": "3"}', "f:5: k must be"), ('{"prompt": "p", "id": [1]}', "f:5: 'id' must be"),
     ("[1]", "f:5: expected a JSON object")],
)
def test_bad_prompt_lines_name_the_line(line: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        parse_prompt_line(line, where="f:5")

"""ECHO: error messages never carry unbounded input; strings are checked at the edge (issue 25, item 6).

A status message travels in HTTP/2 headers (16 KB by default): a message quoting a 100k-character
path used to reach the client as RESOURCE_EXHAUSTED instead of INVALID_ARGUMENT, a NUL in an
export path ended as INTERNAL with a traceback in the log, and a 10 MB slug was accepted and
echoed back. Now every string field of every request is checked by kind (names, paths, prompts,
other text: length and NUL / control characters) before a servicer runs, echoed values are cut
by ``circuits_core.errors.echo``, and every status message is bounded (``clip_message``).
"""

from __future__ import annotations

import logging

import grpc
import pytest
from circuits_core.errors import MAX_MESSAGE_CHARS, echo, error_line
from circuits_core.limits import DEFAULT_LIMITS
from drill_support import ENFORCED_LIMITS, record_drill

CHECKS: list[str] = []


def _status(fn) -> tuple[str, str]:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""
    return "OK", ""


def _assert_short_invalid(code: str, details: str, *needles: str) -> None:
    assert code == "INVALID_ARGUMENT", (code, details[:300])
    assert len(details) <= MAX_MESSAGE_CHARS and "\n" not in details, len(details)
    for needle in needles:
        assert needle in details, details


@pytest.fixture()
def aggregator(tmp_path):
    from circuits_aggregator import AggregateStore
    from circuits_aggregator.server import AggregatorServerSettings, build_server
    from circuits_server.serving import ServerSettings

    server = build_server(AggregatorServerSettings(server=ServerSettings(port=0), export_root=str(tmp_path)),
                          store=AggregateStore(tmp_path / "state.duckdb")).start()  # fmt: skip
    server.set_serving(True)
    yield server
    server.stop(0.5)


def test_export_paths_long_or_with_nul_are_invalid_argument(aggregator, tmp_path, caplog) -> None:
    from circuits_core._proto.circuits.v1 import aggregator_pb2, aggregator_pb2_grpc

    with grpc.insecure_channel(aggregator.address) as channel, caplog.at_level(logging.INFO):
        export = aggregator_pb2_grpc.AggregatorServiceStub(channel).Export
        long_path = str(tmp_path / ("x" * 100_000))
        code, details = _status(lambda: export(aggregator_pb2.ExportRequest(directory=long_path), timeout=30))
        _assert_short_invalid(code, details, "max_path_chars=4096")
        nul_path = str(tmp_path / "out\x00evil")
        code, details = _status(lambda: export(aggregator_pb2.ExportRequest(directory=nul_path), timeout=30))
        _assert_short_invalid(code, details, "control characters", "\\x00")
        # Just under the path limit, outside the export root: refused, and the echo is cut.
        code, details = _status(lambda: export(aggregator_pb2.ExportRequest(directory="/" + "y" * 4000), timeout=30))
        _assert_short_invalid(code, details, "outside the export root", "(4001 chars)")
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.ERROR]
    CHECKS.extend(["100k path", "NUL path", "4k path echo"])
    ENFORCED_LIMITS.append("max_path_chars")


def test_names_and_text_fields_are_bounded(aggregator) -> None:
    from circuits_core._proto.circuits.v1 import aggregator_pb2_grpc, graph_pb2

    with grpc.insecure_channel(aggregator.address) as channel:
        ingest = aggregator_pb2_grpc.AggregatorServiceStub(channel).Ingest
        for graph, needle in (
            (graph_pb2.Graph(graph_id="g" * 1000), "max_name_chars=512"),
            (graph_pb2.Graph(graph_id="g1", metadata=graph_pb2.GraphMetadata(slug="s" * 10_000_000)), "max_name_chars=512"),
            (graph_pb2.Graph(graph_id="bad\x07id"), "control characters"),
            (graph_pb2.Graph(graph_id="g2", metadata=graph_pb2.GraphMetadata(extra_json="{" + " " * 70_000 + "}")),
             "max_text_chars=65536"),
        ):  # fmt: skip
            code, details = _status(lambda: list(ingest(iter([graph]), timeout=60)))
            _assert_short_invalid(code, details, needle)
    assert aggregator.stream_guard.active()["total"] == 0
    CHECKS.extend(["1000-char graph_id", "10 MB slug", "control char in id", "70k extra_json"])
    ENFORCED_LIMITS.extend(["max_name_chars", "max_text_chars"])


def test_trace_with_huge_contrastive_token_is_invalid_argument(tiny_engine) -> None:
    from circuits_core._proto.circuits.v1 import attribution_pb2, attribution_pb2_grpc
    from circuits_attribution.server import AttributionSettings, build_server
    from circuits_server.serving import ServerSettings

    server = build_server(AttributionSettings(server=ServerSettings(port=0), model="tiny"), tiny_engine).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            trace = attribution_pb2_grpc.AttributionServiceStub(channel).Trace
            # Several words: more than one token for the engine, which refuses it quoting the token.
            for token, needle in (("red " * 37_500, "max_text_chars=65536"), ("red " * 5_000, "")):
                target = attribution_pb2.TraceTarget(contrastive_positive=token.strip(), contrastive_negative="paris")
                request = attribution_pb2.TraceRequest(prompt="the capital of france is", target=target)
                code, details = _status(lambda: trace(request, timeout=120))
                # Under the field limit the engine's own message quotes the token: still bounded.
                _assert_short_invalid(code, details, needle)
            slug = attribution_pb2.TraceRequest(prompt="the capital of france is", slug="s" * 10_000_000)
            code, details = _status(lambda: trace(slug, timeout=120))
            _assert_short_invalid(code, details, "slug", "max_name_chars=512")
            nul = attribution_pb2.TraceRequest(prompt="the capital\x00 of france is")
            code, details = _status(lambda: trace(nul, timeout=120))
            _assert_short_invalid(code, details, "prompt", "NUL")
    finally:
        server.stop(0.5)
    CHECKS.extend(["150k contrastive token", "20k contrastive token", "10 MB slug (Trace)", "NUL in prompt"])


def test_echo_and_error_line_bound_everything() -> None:
    huge = "\x00" * 10 + "x" * 1_000_000
    shown = echo(huge)
    assert len(shown) < 200 and "\\x00" in shown and "(1000010 chars)" in shown
    line = error_line(ValueError("first\nsecond " + "y" * 100_000))
    assert line.startswith("error: first second") and "\n" not in line and len(line) <= MAX_MESSAGE_CHARS + 7
    assert DEFAULT_LIMITS.max_name_chars < DEFAULT_LIMITS.max_path_chars < DEFAULT_LIMITS.max_text_chars
    CHECKS.append("echo/error_line")


def test_cli_error_is_one_bounded_line(tmp_path, capsys) -> None:
    from circuits.cli import main

    code = main(["query", str(tmp_path / ("q" * 5000 + ".duckdb")), "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and len(err[0]) <= MAX_MESSAGE_CHARS + 7, err
    CHECKS.append("CLI error line")


def test_zz_echo_summary() -> None:
    if not CHECKS:
        pytest.skip("no echo drill ran")
    record_drill("echo: bounded errors, strings checked at edge", requests=len(CHECKS), errors=0,
                 note=f"{len(CHECKS)} cases: INVALID_ARGUMENT, one short line")  # fmt: skip

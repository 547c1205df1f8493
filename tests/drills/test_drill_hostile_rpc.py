"""HOSTILE INPUT: every RPC of every service gets random bytes and random field values.

Requests go through a raw channel (identity serializers), so nothing client-side cleans them up:
random bytes, mutated valid messages, and well-formed messages whose fields are drawn from
extreme values (NaN, huge ints, unknown enum numbers, control characters, SQL, path traversal).
Every answer must be OK or a clear status (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED,
FAILED_PRECONDITION, OUT_OF_RANGE) with a one-line message -- never INTERNAL/UNKNOWN, never a
crash, and no data change: the atlas file keeps its hash and the aggregator's statistics move
only when a graph was acknowledged. Also fuzzes the attribution worker's prompts JSONL reader.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import grpc
import pytest
from drill_support import file_sha256, record_drill
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "OUT_OF_RANGE"}
TALLY: dict[str, dict[str, int]] = {}
_TALLY_LOCK = threading.Lock()


def fuzz_settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])  # fmt: skip


# -- random messages from the descriptors ---------------------------------------------------------
HOSTILE_TEXT = st.sampled_from([
    "", " ", "L1/N2", "1.2", "-1", "../../../etc/passwd", "/proc/self/environ", "'; DROP TABLE neurons; --",
    "%", "_", "\\", "\x00", "\u202e\u0000\ud7ff", "a" * 2048, "enzyme OR 1=1", "NaN", "9" * 40, "..", "*",
])  # fmt: skip
I32 = st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 3, 1000])
I64 = st.integers(-(2**63), 2**63 - 1) | st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63)])
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)


def _scalar(field) -> st.SearchStrategy:
    from google.protobuf.descriptor import FieldDescriptor as F

    t = field.type
    if t == F.TYPE_STRING:
        return st.text(max_size=40) | HOSTILE_TEXT
    if t == F.TYPE_BYTES:
        return st.binary(max_size=40)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        extremes = st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e308, 5e-324])
        return extremes | st.floats(width=32 if t == F.TYPE_FLOAT else 64)
    if t == F.TYPE_ENUM:
        return st.integers(-3, 12)  # proto3 enums are open: unknown numbers arrive as-is
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return I32
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return I64
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return U32
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return U64
    raise AssertionError(f"unhandled field type {t}")


def message_dict(descriptor, depth: int = 0) -> st.SearchStrategy[dict]:
    """Dicts of field values for ``descriptor`` (each field maybe unset; nested up to depth 2)."""
    from google.protobuf.descriptor import FieldDescriptor as F

    parts = {}
    for field in descriptor.fields:
        if field.type == F.TYPE_MESSAGE:
            if depth >= 2 or field.message_type.GetOptions().map_entry:
                continue
            value = message_dict(field.message_type, depth + 1)
        else:
            value = _scalar(field)
        if field.is_repeated:
            value = st.lists(value, max_size=3 if field.type == F.TYPE_MESSAGE else 6)
        parts[field.name] = st.none() | value
    return st.fixed_dictionaries(parts).map(lambda d: {k: v for k, v in d.items() if v is not None})


def _fill(message, values: dict) -> None:
    from google.protobuf.descriptor import FieldDescriptor as F

    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        if field.type == F.TYPE_MESSAGE:
            if field.is_repeated:
                for item in value:
                    _fill(getattr(message, name).add(), item)
            else:
                _fill(getattr(message, name), value)
        elif field.is_repeated:
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)


def request_bytes(method, overrides: dict | None = None) -> st.SearchStrategy[bytes]:
    """Serialized requests for ``method``: random bytes, mutated valid messages, random valid messages."""
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(method.input_type)

    def build(values: dict) -> bytes:
        msg = cls()
        _fill(msg, {**values, **(overrides or {})})
        return msg.SerializeToString()

    valid = message_dict(method.input_type).map(build)

    def mutate(args) -> bytes:
        data, seed = args
        rng = random.Random(seed)
        raw = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            choice = rng.random()
            if raw and choice < 0.4:
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            elif raw and choice < 0.7:
                del raw[rng.randrange(len(raw)):]
            else:
                raw.insert(rng.randrange(len(raw) + 1), rng.randrange(256))
        return bytes(raw)

    return st.one_of(valid, st.binary(max_size=64), st.tuples(valid, st.integers(0, 2**32)).map(mutate))


def raw_call(channel: grpc.Channel, service: str, method, payloads: list[bytes], timeout: float = 30) -> tuple[str, str, int]:
    """Send raw payloads; returns (status name, details, number of responses)."""
    path = f"/{service}/{method.name}"
    try:
        if method.client_streaming:
            call = (channel.stream_stream if method.server_streaming else channel.stream_unary)(path)
            answer = call(iter(payloads), timeout=timeout)
        else:
            call = (channel.unary_stream if method.server_streaming else channel.unary_unary)(path)
            answer = call(payloads[0], timeout=timeout)
        n = len(list(answer)) if method.server_streaming else 1
        return "OK", "", n
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or "", 0


def check_answer(service: str, method, code: str, details: str) -> None:
    with _TALLY_LOCK:
        tally = TALLY.setdefault(service.rsplit(".", 1)[-1], {})
        tally[code] = tally.get(code, 0) + 1
    assert code in ALLOWED, f"{service}/{method.name}: {code}: {details}"
    if code != "OK":
        assert details and "\n" not in details and "Traceback" not in details, (method.name, details)


def _methods(pb2_module, service: str) -> list:
    return list(pb2_module.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[-1]].methods)


# -- atlas --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def atlas_server(small_atlas):
    from circuits_server.serving import ServerSettings
    from circuits_atlas.server import AtlasSettings, build_server

    before = file_sha256(small_atlas)
    server = build_server(AtlasSettings(duckdb_path=str(small_atlas), server=ServerSettings(port=0))).start()
    server.set_serving(True)
    channel = grpc.insecure_channel(server.address)
    yield channel, small_atlas
    channel.close()
    server.stop(0.5)
    assert file_sha256(small_atlas) == before, "the atlas file changed"


def _atlas_methods():
    from circuits_core._proto.circuits.v1 import atlas_pb2

    return _methods(atlas_pb2, "circuits.v1.AtlasService")


@pytest.mark.parametrize("method_name", [m.name for m in _atlas_methods()])
def test_atlas_rpcs_survive_hostile_requests(atlas_server, method_name) -> None:
    channel, path = atlas_server
    method = next(m for m in _atlas_methods() if m.name == method_name)
    before = file_sha256(path)

    @fuzz_settings(60)
    @given(payload=request_bytes(method))
    def run(payload: bytes) -> None:
        code, details, _ = raw_call(channel, "circuits.v1.AtlasService", method, [payload])
        check_answer("circuits.v1.AtlasService", method, code, details)

    run()
    assert file_sha256(path) == before
    stats = next(m for m in _atlas_methods() if m.name == "Stats")
    assert raw_call(channel, "circuits.v1.AtlasService", stats, [b""])[0] == "OK"  # still serving


# -- aggregator ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aggregator_server(tmp_path_factory):
    import numpy as np
    from circuits_sdk.aggregator import AggregatorClient
    from circuits_server.serving import ServerSettings
    from circuits_aggregator import AggregateStore
    from circuits_aggregator.server import AggregatorServerSettings, build_server
    from circuits_aggregator.stream import BatchPolicy
    from circuits_aggregator.testing import random_graph

    tmp = tmp_path_factory.mktemp("agg-fuzz")
    store = AggregateStore(tmp / "state.duckdb")
    server = build_server(AggregatorServerSettings(server=ServerSettings(port=0), batch=BatchPolicy(max_graphs=4, max_delay_s=0.005)),
                          store=store).start()  # fmt: skip
    server.set_serving(True)
    rng = np.random.default_rng(3)
    with AggregatorClient(server.address) as client:
        client.ingest([random_graph(rng) for _ in range(20)])
    channel = grpc.insecure_channel(server.address)
    yield channel, store, tmp
    channel.close()
    server.stop(0.5)


def _aggregator_methods():
    from circuits_core._proto.circuits.v1 import aggregator_pb2

    return _methods(aggregator_pb2, "circuits.v1.AggregatorService")


def _stats_tuple(store) -> tuple:
    s = store.stats()
    return (s.graphs_processed, s.total_edge_observations, s.distinct_edges, s.distinct_units)


@pytest.mark.parametrize("method_name", [m.name for m in _aggregator_methods()])
def test_aggregator_rpcs_survive_hostile_requests(aggregator_server, method_name) -> None:
    channel, store, tmp = aggregator_server
    method = next(m for m in _aggregator_methods() if m.name == method_name)
    # Export writes files: keep hostile directories inside tmp or unwritable system places.
    overrides = None
    if method_name == "Export":
        export_dirs = st.sampled_from([str(tmp / "exports" / "x"), "/proc/no/such/dir", "/dev/null/x", str(tmp / "..")])
        payloads = st.tuples(message_dict(method.input_type), export_dirs).map(lambda a: _export_request(a[0], a[1]))
    else:
        payloads = request_bytes(method, overrides)
    n_payloads = st.integers(1, 3) if method.client_streaming else st.just(1)

    @fuzz_settings(80 if method_name == "Ingest" else 40)
    @given(batch=n_payloads.flatmap(lambda n: st.lists(payloads, min_size=n, max_size=n)))
    def run(batch: list[bytes]) -> None:
        before = _stats_tuple(store)
        code, details, _ = raw_call(channel, "circuits.v1.AggregatorService", method, batch)
        check_answer("circuits.v1.AggregatorService", method, code, details)
        after = _stats_tuple(store)
        if method_name != "Ingest" or code == "OK":
            if method_name != "Ingest":
                assert after == before, f"{method_name} changed the statistics ({code}: {details})"
            return
        # A rejected stream: graphs before the bad message may be committed (their acks were
        # lost with the stream; a re-send counts them as duplicates), the bad one never.
        committable = _leading_graphs(batch)
        assert 0 <= after[0] - before[0] <= committable, (code, details)
        if after[0] == before[0]:
            assert after == before, f"rejected Ingest changed the statistics ({code}: {details})"

    run()


def _leading_graphs(batch: list[bytes]) -> int:
    """How many messages at the head of the stream decode as a Graph with a graph_id."""
    from circuits_core._proto.circuits.v1 import graph_pb2

    n = 0
    for raw in batch:
        msg = graph_pb2.Graph()
        try:
            msg.ParseFromString(raw)
        except Exception:  # noqa: BLE001 - the first undecodable message ends the count
            break
        if not msg.graph_id:
            break
        n += 1
    return n


def _export_request(values: dict, directory: str) -> bytes:
    from circuits_core._proto.circuits.v1 import aggregator_pb2

    msg = aggregator_pb2.ExportRequest()
    _fill(msg, {k: v for k, v in values.items() if k != "directory"})
    msg.directory = directory
    return msg.SerializeToString()


# -- attribution --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def attribution_server(tiny_engine):
    from circuits_server.serving import ServerSettings
    from circuits_attribution.server import AttributionSettings, build_server

    server = build_server(AttributionSettings(server=ServerSettings(port=0, grace_seconds=1), model="tiny", max_queue=8),
                          tiny_engine).start()  # fmt: skip
    channel = grpc.insecure_channel(server.address)
    yield channel
    channel.close()
    server.stop(0.5)


def _attribution_methods():
    from circuits_core._proto.circuits.v1 import attribution_pb2

    return _methods(attribution_pb2, "circuits.v1.AttributionService")


@pytest.mark.parametrize("method_name", [m.name for m in _attribution_methods()])
def test_attribution_rpcs_survive_hostile_requests(attribution_server, method_name) -> None:
    method = next(m for m in _attribution_methods() if m.name == method_name)
    n_payloads = st.integers(1, 2) if method.client_streaming else st.just(1)
    payloads = request_bytes(method)

    @fuzz_settings(30)
    @given(batch=n_payloads.flatmap(lambda n: st.lists(payloads, min_size=n, max_size=n)))
    def run(batch: list[bytes]) -> None:
        code, details, _ = raw_call(attribution_server, "circuits.v1.AttributionService", method, batch, timeout=60)
        check_answer("circuits.v1.AttributionService", method, code, details)

    run()
    ok, _, _ = raw_call(attribution_server, "circuits.v1.AttributionService",
                        next(m for m in _attribution_methods() if m.name == "GetModelInfo"), [b""])  # fmt: skip
    assert ok == "OK"


# -- labeler ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labeler_server(tmp_path_factory):
    from circuits_core.config import config_from_mapping
    from circuits_server.serving import ServerSettings
    from circuits_labeler.build import build_labeler
    from circuits_labeler.evidence import write_evidence_parquet
    from circuits_labeler.server import build_server
    from circuits_labeler.service import LabelerService
    from circuits_labeler.testing import StandInLLMServer

    tmp = tmp_path_factory.mktemp("labeler-fuzz")
    evidence = write_evidence_parquet(tmp / "evidence", edges=[(0, 0, 1, 0, 3, 0.5), (0, 1, 1, 1, 3, -0.2)],
                                      units=[(0, 0, 3), (0, 1, 3), (1, 0, 3), (1, 1, 3)])  # fmt: skip
    key = tmp / "key"
    key.write_text("sk-ant-fuzz-not-a-real-key-0000\n")
    with StandInLLMServer() as llm:
        config = config_from_mapping({"labeling": {
            "backend": "anthropic", "model": "stand-in", "base_url": llm.base_url, "api_key_file": str(key),
            "evidence_path": str(evidence), "projections_path": "", "compute_projections": False,
            "cache_path": "cache.jsonl", "labels_path": "labels.jsonl", "min_effect": 0.0, "concurrency": 2,
            "retry_base_delay": 0.01, "retry_max_delay": 0.02, "request_timeout": 2.0, "cache_fsync": False,
        }}, base_dir=str(tmp))  # fmt: skip
        service = LabelerService(build_labeler(config))
        server = build_server(ServerSettings(port=0, grace_seconds=1), service=service).start()
        server.set_serving(True)
        channel = grpc.insecure_channel(server.address)
        yield channel
        channel.close()
        server.stop(0.5)
        service.labeler.cache.close()


def _labeler_methods():
    from circuits_core._proto.circuits.v1 import labeler_pb2

    return _methods(labeler_pb2, "circuits.v1.LabelerService")


@pytest.mark.parametrize("method_name", [m.name for m in _labeler_methods()])
def test_labeler_rpcs_survive_hostile_requests(labeler_server, method_name) -> None:
    method = next(m for m in _labeler_methods() if m.name == method_name)

    @fuzz_settings(30)
    @given(payload=request_bytes(method))
    def run(payload: bytes) -> None:
        code, details, _ = raw_call(labeler_server, "circuits.v1.LabelerService", method, [payload], timeout=60)
        check_answer("circuits.v1.LabelerService", method, code, details)

    run()


# -- the worker's prompts JSONL reader ---------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats() | st.text(max_size=12) | HOSTILE_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
PROMPT_KEYS = ("prompt", "id", "k", "tau", "max_nodes", "raw", "target_tokens", "contrastive", "answer_prefix",
               "target_position", "corpus_index", "slug")  # fmt: skip


@fuzz_settings(300)
@given(line=st.one_of(
    st.text(max_size=80),
    st.binary(max_size=80).map(lambda b: b.decode("utf-8", "replace")),
    st.dictionaries(st.sampled_from(PROMPT_KEYS) | st.text(max_size=6), json_values, max_size=5).map(json.dumps),
    st.fixed_dictionaries({"prompt": st.text(max_size=30)}, optional={k: json_values for k in PROMPT_KEYS[1:]}).map(json.dumps),
))  # fmt: skip
def test_prompts_jsonl_reader_accepts_or_names_the_line(line: str) -> None:
    from circuits_core.errors import CircuitsError
    from circuits_core.tracing import TraceRequest
    from circuits_attribution.worker import read_prompt_line

    try:
        parsed = read_prompt_line(line, line=7, source="prompts.jsonl")
    except CircuitsError as exc:
        message = str(exc)
        assert message.startswith("prompts.jsonl:7") and "\n" not in message, message
        return
    assert isinstance(parsed.request, TraceRequest) and isinstance(parsed.request.prompt, str)
    assert parsed.prompt_id is None or isinstance(parsed.prompt_id, (str, int))


def test_prompts_file_with_hostile_lines_is_read_line_by_line(tmp_path: Path) -> None:
    """The shard reader yields every non-blank line, whatever its bytes; each bad line is then
    refused alone with an error naming it (invalid UTF-8 included), never an escaping exception."""
    from circuits_core.errors import CircuitsError
    from circuits_attribution.worker import (
        WorkerSettings,
        read_prompt_line,
        shard_lines,
    )

    path = tmp_path / "prompts.jsonl"
    lines = [b'{"prompt": "ok"}', b"not json", b"\x00\x01", b'{"prompt": 5}', b"", b"   ", b'"just a string"',
             b"[1,2]", b'{"prompt": "caf\xff\xfe"}', b'{"prompt": "fine again"}']  # fmt: skip
    path.write_bytes(b"\n".join(lines) + b"\n")
    good, bad = [], []
    for number, text in shard_lines(path, WorkerSettings(prompts=path, output_dir=tmp_path / "out")):
        try:
            good.append((number, read_prompt_line(text, line=number, source=path.name).request.prompt))
        except CircuitsError as exc:
            assert str(exc).startswith(f"{path.name}:{number}:") and "\n" not in str(exc)
            bad.append(number)
    assert good[0] == (1, "ok") and good[-1] == (10, "fine again") and (7, "just a string") in good
    assert set(bad) >= {2, 3, 4, 8} and 9 in {n for n, _ in good} | set(bad)


def test_zz_hostile_summary() -> None:
    """One row per service in the drill table (runs after the fuzz tests of this module)."""
    for service, tally in sorted(TALLY.items()):
        bad = sum(v for k, v in tally.items() if k not in ALLOWED)
        codes = ", ".join(f"{k} {v}" for k, v in sorted(tally.items(), key=lambda kv: -kv[1]))
        record_drill(f"hostile: {service} fuzz", requests=sum(tally.values()), errors=bad, note=codes[:90])
        assert bad == 0

"""The batch worker: sharding, bad lines, resumption after SIGKILL, files and sinks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from circuits_core.errors import InvalidArgument, Unavailable
from circuits_core.graphio import is_graph_file, read_graph
from circuits_core.tracing import TraceRequest, TraceSettings
from circuits_attribution.worker import WorkerSettings, _shard_index, build_parser, ledger_path, run_worker

WORDS = "the capital of france is paris london rome city one two three four five red green blue big small cat dog sun moon".split()


def prompts_file(tmp_path: Path, count: int, *, bad: dict[int, str] | None = None) -> tuple[Path, dict[int, dict]]:
    """A JSONL file of ``count`` lines; ``bad`` replaces given 1-based lines by raw text."""
    good: dict[int, dict] = {}
    lines = []
    for number in range(1, count + 1):
        if bad and number in bad:
            lines.append(bad[number])
            continue
        words = [WORDS[(number * 7 + j * 3) % len(WORDS)] for j in range(3 + number % 4)]
        record: dict = {"prompt": " ".join(words), "id": f"p{number}"}
        if number % 5 == 0:
            record["target_tokens"] = ["paris"]
        good[number] = record
        lines.append(json.dumps(record))
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, good


def expected_id(engine, number: int, record: dict) -> str:
    request = TraceRequest(prompt=record["prompt"], target_tokens=tuple(record.get("target_tokens", ())), corpus_index=number - 1)
    return engine.trace(request).graph_id


def graph_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and is_graph_file(p))


def test_shards_cover_every_good_line_once_and_report_bad_lines(tmp_path, tiny_engine):
    bad = {3: "{not json", 6: '{"prompt": ""}', 8: '["a list"]', 9: '{"prompt": "x", "colour": 1}',
           11: '{"prompt": "big dog", "target_tokens": ["zebra"]}'}
    path, good = prompts_file(tmp_path, 12, bad=bad)
    out = tmp_path / "graphs"
    messages: list[str] = []
    reports = [
        run_worker(WorkerSettings(prompts=path, shard_index=i, shard_count=3, output_dir=out, progress=False),
                   tiny_engine, log=messages.append)
        for i in range(3)
    ]
    assert sum(r.traced for r in reports) == len(good)
    assert sum(r.bad_lines for r in reports) == 4 and sum(r.failed for r in reports) == 1
    for number, fragment in [(3, "invalid JSON"), (6, "prompt is empty"), (8, "expected a JSON object"),
                             (9, "unknown key(s) colour"), (11, "'zebra' is not in the vocabulary")]:
        assert any(m.startswith(f"{path}:{number}: ") and fragment in m for m in messages), (number, messages)
    files = graph_files(out)
    expected = {expected_id(tiny_engine, n, r): (n, r) for n, r in good.items()}
    assert {p.name for p in files} == {f"{gid}.pb.gz" for gid in expected}
    for file in files:
        graph = read_graph(file)
        number, record = expected[graph.graph_id]
        assert graph.prompt == record["prompt"]
        assert graph.metadata.corpus_index == number - 1 and graph.metadata.extra["prompt_id"] == record["id"]
        # line n belongs to shard (n - 1) % 3
        ledger = ledger_path(WorkerSettings(prompts=path, shard_index=(number - 1) % 3, shard_count=3, output_dir=out))
        assert f'"graph_id": "{graph.graph_id}"' in ledger.read_text()


def test_rerun_repeats_nothing_and_retraces_a_deleted_file(tmp_path, tiny_engine):
    path, good = prompts_file(tmp_path, 6)
    settings = WorkerSettings(prompts=path, output_dir=tmp_path / "g", progress=False)
    first = run_worker(settings, tiny_engine)
    assert first.traced == 6
    again = run_worker(settings, tiny_engine)
    assert (again.traced, again.already_done) == (0, 6)
    graph_files(tmp_path / "g")[0].unlink()
    third = run_worker(settings, tiny_engine)
    assert (third.traced, third.already_done) == (1, 5)
    assert len(graph_files(tmp_path / "g")) == 6


def test_trace_flags_fill_what_a_line_does_not_set(tmp_path, tiny_engine):
    """The worker's trace flags are generated from TraceSettings; a line's own settings win, and a
    line's target mode replaces the flags' one."""
    lines = [{"prompt": "the capital of france is"}, {"prompt": "big red dog", "k": 1},
             {"prompt": "one two three", "contrastive": ["paris", "rome"]}, {"prompt": "sun moon cat", "tau": 0.05}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = build_parser().parse_args(["--prompts", str(path), "--k", "2", "--tau", "0.02", "--target-tokens", "paris", "london"])
    from circuits_core.fieldargs import field_values

    defaults = TraceSettings(**field_values(args, TraceSettings))
    assert defaults == TraceSettings(k=2, tau=0.02, target_tokens=("paris", "london"))
    out = tmp_path / "graphs"
    report = run_worker(WorkerSettings(prompts=path, output_dir=out, progress=False, trace_defaults=defaults), tiny_engine)
    assert report.traced == 4
    by_prompt = {g.prompt: g for g in map(read_graph, graph_files(out))}
    for number, line in enumerate(lines, 1):
        request = defaults.request(line["prompt"], corpus_index=number - 1,
                                   **{k: tuple(v) if isinstance(v, list) else v for k, v in line.items() if k != "prompt"})
        assert by_prompt[line["prompt"]].graph_id == tiny_engine.trace(request).graph_id
    assert [u.token for u in by_prompt["the capital of france is"].logits] == ["paris", "london"]
    assert len(by_prompt["big red dog"].logits) == 2  # k is ignored with target tokens: the flags' tokens stay
    assert [u.token for u in by_prompt["one two three"].logits] == ["paris", "rome"]  # contrastive replaced them
    assert by_prompt["sun moon cat"].metadata.node_threshold == 0.05 and by_prompt["the capital of france is"].metadata.node_threshold == 0.02


class RecordingSink:
    def __init__(self, fail_at: int | None = None) -> None:
        self.graphs = []
        self.fail_at = fail_at

    def send(self, graph) -> None:
        if self.fail_at is not None and len(self.graphs) == self.fail_at:
            raise Unavailable("aggregator went away")
        self.graphs.append(graph)

    def close(self) -> None:
        pass


def test_sink_gets_each_graph_and_unacked_graphs_are_resent(tmp_path, tiny_engine):
    path, good = prompts_file(tmp_path, 5)
    settings = WorkerSettings(prompts=path, output_dir=tmp_path / "state", write_files=False, progress=False)
    failing = RecordingSink(fail_at=2)
    with pytest.raises(Unavailable):
        run_worker(settings, tiny_engine, sink=failing)
    resumed = RecordingSink()
    report = run_worker(settings, tiny_engine, sink=resumed)
    assert report.already_done == 2 and report.traced == 3
    assert [g.prompt for g in failing.graphs + resumed.graphs] == [good[n]["prompt"] for n in sorted(good)]
    assert graph_files(tmp_path / "state") == []  # files off


def test_shard_index_defaults_to_the_job_completion_index(monkeypatch):
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    assert _shard_index(None) == 3 and _shard_index(1) == 1
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "three")
    with pytest.raises(InvalidArgument, match="JOB_COMPLETION_INDEX"):
        _shard_index(None)
    with pytest.raises(InvalidArgument, match="shard-index"):
        WorkerSettings(prompts=Path("p"), shard_index=4, shard_count=4)


def test_sigkill_midway_then_restart_gives_each_graph_exactly_once(tmp_path, tiny_checkpoint, tiny_engine):
    count = 40
    path, good = prompts_file(tmp_path, count)
    out = tmp_path / "graphs"
    base = ["--prompts", str(path), "--output-dir", str(out), "--model", str(tiny_checkpoint), "--no-progress",
            "--shard-count", "2"]
    env_shard = {"JOB_COMPLETION_INDEX": "1"}
    import os

    env = {**os.environ, **env_shard}
    proc = subprocess.Popen([sys.executable, "-m", "circuits_attribution.worker", *base], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while (not out.exists() or len(graph_files(out)) < 3) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    before = len(graph_files(out))
    shard = {n: r for n, r in good.items() if (n - 1) % 2 == 1}
    assert 3 <= before < len(shard), "the worker was not killed midway"
    done = subprocess.run([sys.executable, "-m", "circuits_attribution", "worker", *base], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    traced = int(summary.split("traced ")[1].split(",")[0])
    already = int(summary.split("already done ")[1].split(",")[0])
    assert traced + already == len(shard) and already >= before - 1
    files = graph_files(out)
    assert {p.name for p in files} == {f"{expected_id(tiny_engine, n, r)}.pb.gz" for n, r in shard.items()}
    ledger = [json.loads(line) for line in ledger_path(
        WorkerSettings(prompts=path, shard_index=1, shard_count=2, output_dir=out)).read_text().splitlines() if line.strip()
        and line.strip().endswith("}")]
    lines = [entry["line"] for entry in ledger if "graph_id" in entry]
    assert sorted(set(lines)) == sorted(shard)
    assert len(lines) == len(set(lines))  # no line recorded twice
    for file in files:
        assert read_graph(file).prompt in {r["prompt"] for r in shard.values()}


def test_worker_streams_to_a_real_aggregator_exactly_once(tmp_path, tiny_engine):
    server_module = pytest.importorskip("circuits_aggregator.server")
    from circuits_sdk.aggregator import AggregatorClient
    from circuits_server.serving import ServerSettings
    from circuits_aggregator.store import AggregateStore
    from circuits_attribution.worker import AggregatorSink

    path, good = prompts_file(tmp_path, 4)
    server = server_module.build_server(
        server_module.AggregatorServerSettings(server=ServerSettings(port=0)), store=AggregateStore(":memory:")
    ).start()
    server.set_serving(True)
    try:
        settings = WorkerSettings(prompts=path, output_dir=tmp_path / "state", write_files=False, progress=False)
        sink = AggregatorSink(server.address)
        first = run_worker(settings, tiny_engine, sink=sink)
        ledger_path(settings).unlink()  # lose the ledger: every graph is sent again
        second = run_worker(settings, tiny_engine, sink=sink)
        sink.close()
        assert first.traced == second.traced == 4
        with AggregatorClient(server.address) as client:
            assert client.stats().graphs_processed == 4  # the re-sent graphs were counted once
    finally:
        server.stop(0.5)


def test_worker_routes_each_graph_to_the_aggregator_shard_that_owns_it(tmp_path, tiny_engine):
    """`--aggregator A,B` (the chart's value for a 2-replica StatefulSet): every graph reaches the
    shard that owns it (each shard rejects graphs it does not own), each counted once."""
    server_module = pytest.importorskip("circuits_aggregator.server")
    from circuits_core.aggregator_types import shard_of
    from circuits_sdk.aggregator import AggregatorClient
    from circuits_server.serving import ServerSettings
    from circuits_aggregator.store import AggregateStore, StoreSettings
    from circuits_attribution.worker import AggregatorSink

    path, _good = prompts_file(tmp_path, 8)
    servers = []
    for index in range(2):
        store = AggregateStore(":memory:", StoreSettings(shard_index=index, shard_count=2))
        server = server_module.build_server(
            server_module.AggregatorServerSettings(server=ServerSettings(port=0)), store=store
        ).start()
        server.set_serving(True)
        servers.append(server)
    try:
        settings = WorkerSettings(prompts=path, output_dir=tmp_path / "state", write_files=False, progress=False)
        sink = AggregatorSink(",".join(s.address for s in servers))
        report = run_worker(settings, tiny_engine, sink=sink)
        sink.close()
        assert report.traced == 8 and report.failed == 0
        expected = [sum(1 for g in report.graph_ids if shard_of(g, 2) == i) for i in range(2)]
        assert all(expected), "8 graphs should land on both shards"
        for index, server in enumerate(servers):
            with AggregatorClient(server.address) as client:
                assert client.stats().graphs_processed == expected[index]
    finally:
        for server in servers:
            server.stop(0.5)


def test_worker_names_the_shard_that_refuses_a_graph(tiny_engine):
    """Addresses in the wrong order: the shard refuses the graph and the error says which and why."""
    server_module = pytest.importorskip("circuits_aggregator.server")
    from circuits_core.aggregator_types import shard_of
    from circuits_core.errors import FailedPrecondition
    from circuits_server.serving import ServerSettings
    from circuits_aggregator.store import AggregateStore, StoreSettings
    from circuits_attribution.worker import AggregatorSink

    graph = tiny_engine.trace(TraceRequest(prompt="the capital of france is"))
    owner = shard_of(graph.graph_id, 2)
    # Both servers are the OTHER shard: whichever is listed at the owner's position refuses.
    servers = []
    for _ in range(2):
        store = AggregateStore(":memory:", StoreSettings(shard_index=1 - owner, shard_count=2))
        server = server_module.build_server(
            server_module.AggregatorServerSettings(server=ServerSettings(port=0)), store=store
        ).start()
        server.set_serving(True)
        servers.append(server)
    try:
        sink = AggregatorSink(",".join(s.address for s in servers))
        with pytest.raises(FailedPrecondition, match=rf"\(shard {owner} of 2\) does not own graph {graph.graph_id}"):
            sink.send(graph)
        sink.close()
    finally:
        for server in servers:
            server.stop(0.5)


def test_worker_rejects_bad_aggregator_addresses() -> None:
    from circuits_attribution.worker import AggregatorSink

    with pytest.raises(InvalidArgument, match="give host:port"):
        AggregatorSink(" , ")
    with pytest.raises(InvalidArgument, match="listed twice"):
        AggregatorSink("a:1,b:2,a:1")


def test_worker_streams_to_a_tls_and_token_aggregator_with_its_flags(tmp_path, tiny_checkpoint, pki, capsys):
    """`--aggregator-tls-ca/-tls-cert/-tls-key --aggregator-token-file` (what the chart passes with
    global.tls + global.auth): the worker's graphs reach a mutual-TLS, token-checking aggregator;
    a read-only token is refused (exit 2, one line, nothing counted)."""
    import os

    server_module = pytest.importorskip("circuits_aggregator.server")
    from circuits_aggregator.store import AggregateStore
    from circuits_attribution.worker import main
    from circuits_sdk.aggregator import AggregatorClient
    from circuits_server.serving import ServerSettings

    write, read = "worker-write-token-0123456789", "worker-read-token-0123456789"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{write} write\n{read} read\n")
    os.chmod(tokens, 0o600)
    (tmp_path / "write").write_text(write)
    (tmp_path / "read").write_text(read)
    secure = ServerSettings(port=0, tls_cert_file=str(pki["server.pem"]), tls_key_file=str(pki["server.key"]),
                            tls_client_ca_file=str(pki["ca.pem"]), auth_tokens_file=str(tokens))  # fmt: skip
    server = server_module.build_server(server_module.AggregatorServerSettings(server=secure),
                                        store=AggregateStore(":memory:")).start()  # fmt: skip
    server.set_serving(True)
    path, _good = prompts_file(tmp_path, 3)
    tls = ["--aggregator-tls-ca", str(pki["ca.pem"]), "--aggregator-tls-cert", str(pki["client.pem"]),
           "--aggregator-tls-key", str(pki["client.key"])]  # fmt: skip
    base = ["--prompts", str(path), "--model", str(tiny_checkpoint), "--no-progress", "--no-files",
            "--aggregator", f"localhost:{server.port}", *tls]  # fmt: skip
    try:
        assert main([*base, "--output-dir", str(tmp_path / "refused"), "--aggregator-token-file", str(tmp_path / "read")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "write" in err and err.count("\n") == 1 and read not in err, err
        assert main([*base, "--output-dir", str(tmp_path / "sent"), "--aggregator-token-file", str(tmp_path / "write")]) == 0
        assert "traced 3" in capsys.readouterr().out
        with AggregatorClient(f"localhost:{server.port}", token=read, tls_ca_file=str(pki["ca.pem"]),
                              tls_cert_file=str(pki["client.pem"]), tls_key_file=str(pki["client.key"])) as client:
            assert client.stats().graphs_processed == 3
    finally:
        server.stop(0.5)
    # credential flags without an aggregator to present them to
    assert main(["--prompts", str(path), "--model", str(tiny_checkpoint), "--output-dir", str(tmp_path / "x"), *tls]) == 2
    assert "need --aggregator" in capsys.readouterr().err

"""AttributionRunner, the transport-neutral service object: limits, cancellation, shutdown,
per-request settings and engine replicas (fakes for timing, the real engine for results)."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from circuits_core.errors import Cancelled, InvalidArgument, ResourceExhausted, Unavailable
from circuits_core.tracing import ModelInfo, TraceSpec
from circuits_attribution.service import AttributionRunner, replicas_trace_concurrently, replicate_engines, run_engine

INFO = ModelInfo(model="fake")


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def start_trace(runner: AttributionRunner, prompt: str, results: dict, **kwargs) -> threading.Thread:
    def go() -> None:
        try:
            results[prompt] = runner.trace(TraceSpec(prompt=prompt), **kwargs)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[prompt] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def normalized(graph):
    return dataclasses.replace(graph, metadata=dataclasses.replace(graph.metadata, create_time_ms=0))


def test_not_ready_until_attached(fake_engine):
    runner = AttributionRunner()
    with pytest.raises(Unavailable, match="loading"):
        runner.trace(TraceSpec(prompt="x"))
    with pytest.raises(Unavailable):
        runner.model_info
    runner.attach([fake_engine], INFO)
    fake_engine.release.set()
    assert runner.trace(TraceSpec(prompt="x")).prompt == "x"


def test_queue_bound_then_resource_exhausted_and_fifo_completion(fake_engine):
    runner = AttributionRunner(max_concurrent=1, max_queue=2)
    runner.attach([fake_engine], INFO)
    results: dict = {}
    threads = [start_trace(runner, "first", results)]
    wait_until(lambda: fake_engine.started == 1)
    threads += [start_trace(runner, "second", results), start_trace(runner, "third", results)]
    wait_until(lambda: runner.waiting == 2)
    with pytest.raises(ResourceExhausted, match=r"1 trace\(s\) running and 2 waiting"):
        runner.trace(TraceSpec(prompt="fourth"))
    assert runner.running == 1 and fake_engine.started == 1  # only one at a time
    fake_engine.release.set()
    for thread in threads:
        thread.join(5)
    assert {p: g.prompt for p, g in results.items()} == {"first": "first", "second": "second", "third": "third"}
    assert runner.waiting == 0 and runner.running == 0


def test_max_queue_zero_refuses_when_busy(fake_engine):
    runner = AttributionRunner(max_concurrent=1, max_queue=0)
    runner.attach([fake_engine], INFO)
    results: dict = {}
    thread = start_trace(runner, "busy", results)
    wait_until(lambda: fake_engine.started == 1)
    with pytest.raises(ResourceExhausted):
        runner.trace(TraceSpec(prompt="next"))
    fake_engine.release.set()
    thread.join(5)


def test_cancelled_while_queued_frees_the_queue_place(fake_engine):
    runner = AttributionRunner(max_concurrent=1, max_queue=1)
    runner.attach([fake_engine], INFO)
    results: dict = {}
    start_trace(runner, "running", results)
    wait_until(lambda: fake_engine.started == 1)
    cancel = threading.Event()
    queued = start_trace(runner, "queued", results, should_stop=cancel.is_set)
    wait_until(lambda: runner.waiting == 1)
    cancel.set()
    queued.join(5)
    assert isinstance(results["queued"], Cancelled)
    assert runner.waiting == 0
    again = start_trace(runner, "again", results)  # the place is free again
    wait_until(lambda: runner.waiting == 1)
    fake_engine.release.set()
    again.join(5)
    assert results["again"].prompt == "again"
    assert fake_engine.started == 2  # the cancelled request never reached the engine


def test_cancelled_while_running_frees_the_engine(fake_engine):
    runner = AttributionRunner(max_concurrent=1, max_queue=0)
    runner.attach([fake_engine], INFO)
    results: dict = {}
    cancel = threading.Event()
    thread = start_trace(runner, "long", results, should_stop=cancel.is_set)
    wait_until(lambda: fake_engine.started == 1)
    cancel.set()
    thread.join(5)
    assert isinstance(results["long"], Cancelled) and fake_engine.stopped == 1
    assert runner.running == 0
    fake_engine.release.set()
    assert runner.trace(TraceSpec(prompt="next")).prompt == "next"


def test_close_lets_running_work_finish_within_grace(fake_engine):
    runner = AttributionRunner(max_concurrent=1, max_queue=1)
    runner.attach([fake_engine], INFO)
    results: dict = {}
    thread = start_trace(runner, "inflight", results)
    wait_until(lambda: fake_engine.started == 1)
    threading.Timer(0.2, fake_engine.release.set).start()
    runner.close(grace=5.0)
    thread.join(5)
    assert results["inflight"].prompt == "inflight"
    with pytest.raises(Unavailable, match="shutting down"):
        runner.trace(TraceSpec(prompt="late"))


def test_close_stops_running_work_after_grace(fake_engine):
    runner = AttributionRunner(max_concurrent=1, max_queue=1)
    runner.attach([fake_engine], INFO)
    results: dict = {}
    thread = start_trace(runner, "stuck", results)
    wait_until(lambda: fake_engine.started == 1)
    started = time.monotonic()
    runner.close(grace=0.1)
    thread.join(5)
    assert time.monotonic() - started < 3
    assert isinstance(results["stuck"], Unavailable) and fake_engine.stopped == 1


@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_replicas_run_together_unless_one_at_a_time(fake_engine, one_at_a_time):
    runner = AttributionRunner(max_concurrent=2, max_queue=2)
    runner.attach(replicate_engines(fake_engine, 2), INFO, one_at_a_time=one_at_a_time)
    results: dict = {}
    cancel = threading.Event()
    threads = [start_trace(runner, p, results, should_stop=cancel.is_set if p == "b" else None) for p in ("a", "b")]
    wait_until(lambda: runner.running == 2)
    time.sleep(0.1)
    assert fake_engine.started == (1 if one_at_a_time else 2)
    if one_at_a_time:  # a request waiting for its turn on the engine can still be cancelled
        cancel.set()
        wait_until(lambda: runner.running == 1)
    fake_engine.release.set()
    for thread in threads:
        thread.join(5)
    assert results["a"].prompt == "a"
    assert isinstance(results["b"], Cancelled) if one_at_a_time else results["b"].prompt == "b"


def test_engine_errors_pass_through(fake_engine):
    runner = AttributionRunner()
    runner.attach([fake_engine], INFO)
    with pytest.raises(InvalidArgument, match="not traceable"):
        runner.trace(TraceSpec(prompt="bad"))
    assert runner.running == 0


@pytest.mark.parametrize(
    "fields",
    [{"prompt": ""}, {"prompt": "x", "k": -1}, {"prompt": "x", "tau": float("nan")}, {"prompt": "x", "contrastive": ("a",)},
     {"prompt": "x", "max_nodes": -3}, {"prompt": "x", "target_tokens": ("",)}],
)
def test_trace_spec_rejects_bad_values(fields):
    with pytest.raises(InvalidArgument):
        TraceSpec(**fields)


# -- the real engine -------------------------------------------------------------------------
PROMPT = "the capital of france is"


def test_stop_hooks_abandon_a_real_trace_and_leave_the_engine_clean(tiny_engine):
    baseline = run_engine(tiny_engine, TraceSpec(prompt=PROMPT))
    calls = []

    def stop_after_two_layers() -> bool:
        calls.append(1)
        return len(calls) > 3

    runner = AttributionRunner()
    runner.attach([tiny_engine], INFO)
    with pytest.raises(Cancelled):
        runner.trace(TraceSpec(prompt=PROMPT), should_stop=stop_after_two_layers)
    assert 3 < len(calls) < 10  # stopped inside the first forward, not at the end
    again = runner.trace(TraceSpec(prompt=PROMPT))
    assert normalized(again) == normalized(baseline)  # the model was restored (no stuck patches/hooks)


def test_per_request_settings_match_an_engine_configured_with_them(tiny_engine):
    from circuits_attribution import RelPAttributor

    before = tiny_engine.config
    spec = TraceSpec(prompt=PROMPT, tau=0.05, max_nodes=7, k=2, corpus_index=42)
    graph = run_engine(tiny_engine, spec)
    assert tiny_engine.config is before  # restored
    configured = RelPAttributor(
        tiny_engine.model, tiny_engine.tokenizer, dataclasses.replace(before, tau=0.05, max_nodes=7, k=2)
    )
    expected = configured.trace(PROMPT)
    assert graph.metadata.corpus_index == 42
    assert graph.metadata.node_threshold == 0.05 and len(graph.logits) == 2
    assert normalized(dataclasses.replace(graph, metadata=dataclasses.replace(graph.metadata, corpus_index=-1))) == normalized(expected)
    assert graph.graph_id != run_engine(tiny_engine, TraceSpec(prompt=PROMPT)).graph_id  # settings are in the id


def test_replicas_share_weights_and_trace_concurrently_like_one_engine(tiny_engine):
    replicas = replicate_engines(tiny_engine, 3)
    assert len(replicas) == 3 and replicas[0] is tiny_engine
    w0 = tiny_engine.model.model.embed_tokens.weight
    assert all(r.model.model.embed_tokens.weight is w0 for r in replicas)
    assert all(r.model is not tiny_engine.model for r in replicas[1:])
    prompts = ["the capital of france is", "big red dog a b c", "one two three four five", "sun moon cat dog"]
    expected = {p: normalized(tiny_engine.trace(p)) for p in prompts}
    runner = AttributionRunner(max_concurrent=3, max_queue=20)
    runner.attach(replicas, INFO, one_at_a_time=not replicas_trace_concurrently(tiny_engine))
    results: list = []

    def go(prompt: str) -> None:
        results.append((prompt, runner.trace(TraceSpec(prompt=prompt))))

    threads = [threading.Thread(target=go, args=(p,)) for p in prompts * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 12
    assert all(normalized(graph) == expected[prompt] for prompt, graph in results)

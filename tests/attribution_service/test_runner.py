"""AttributionRunner, the transport-neutral service object: limits, cancellation, shutdown,
per-request settings and engine replicas (fakes for timing, the real engine for results)."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from circuits_core.errors import Cancelled, InvalidArgument, ResourceExhausted, Unavailable
from circuits_core.tracing import TraceRequest
from circuits_attribution.service import AttributionRunner


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def start_call(results: dict, key: str, call) -> threading.Thread:
    """Run ``call()`` in a thread; its result (or exception) lands in ``results[key]``."""

    def go() -> None:
        try:
            results[key] = call()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[key] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def start_trace(runner: AttributionRunner, prompt: str, results: dict, **kwargs) -> threading.Thread:
    return start_call(results, prompt, lambda: runner.trace(TraceRequest(prompt=prompt), **kwargs))


def busy_runner(fake_engine, results: dict, *, max_queue: int) -> AttributionRunner:
    """A one-engine runner whose engine is held by the trace of "running"."""
    runner = AttributionRunner(max_concurrent=1, max_queue=max_queue)
    runner.attach(fake_engine)
    start_trace(runner, "running", results)
    wait_until(lambda: fake_engine.started == 1)
    return runner


def normalized(graph):
    return dataclasses.replace(graph, metadata=dataclasses.replace(graph.metadata, create_time_ms=0))


def test_not_ready_until_attached(fake_engine):
    runner = AttributionRunner()
    with pytest.raises(Unavailable, match="loading"):
        runner.trace(TraceRequest(prompt="x"))
    with pytest.raises(Unavailable):
        runner.model_info
    runner.attach(fake_engine)
    fake_engine.release.set()
    assert runner.trace(TraceRequest(prompt="x")).prompt == "x"


def test_queue_bound_then_resource_exhausted_and_fifo_completion(fake_engine):
    runner = AttributionRunner(max_concurrent=1, max_queue=2)
    runner.attach(fake_engine)
    results: dict = {}
    threads = [start_trace(runner, "first", results)]
    wait_until(lambda: fake_engine.started == 1)
    threads += [start_trace(runner, "second", results), start_trace(runner, "third", results)]
    wait_until(lambda: runner.waiting == 2)
    with pytest.raises(ResourceExhausted, match=r"1 trace\(s\) running and 2 waiting"):
        runner.trace(TraceRequest(prompt="fourth"))
    assert runner.running == 1 and fake_engine.started == 1  # only one at a time
    fake_engine.release.set()
    for thread in threads:
        thread.join(5)
    assert {p: g.prompt for p, g in results.items()} == {"first": "first", "second": "second", "third": "third"}
    assert runner.waiting == 0 and runner.running == 0


def test_max_queue_zero_refuses_when_busy(fake_engine):
    runner = AttributionRunner(max_concurrent=1, max_queue=0)
    runner.attach(fake_engine)
    results: dict = {}
    thread = start_trace(runner, "busy", results)
    wait_until(lambda: fake_engine.started == 1)
    with pytest.raises(ResourceExhausted):
        runner.trace(TraceRequest(prompt="next"))
    fake_engine.release.set()
    thread.join(5)


def test_cancelled_while_queued_frees_the_queue_place(fake_engine):
    results: dict = {}
    runner = busy_runner(fake_engine, results, max_queue=1)
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
    runner.attach(fake_engine)
    results: dict = {}
    cancel = threading.Event()
    thread = start_trace(runner, "long", results, should_stop=cancel.is_set)
    wait_until(lambda: fake_engine.started == 1)
    cancel.set()
    thread.join(5)
    assert isinstance(results["long"], Cancelled) and fake_engine.stopped == 1
    assert runner.running == 0
    fake_engine.release.set()
    assert runner.trace(TraceRequest(prompt="next")).prompt == "next"


def test_close_lets_running_work_finish_within_grace(fake_engine):
    runner = AttributionRunner(max_concurrent=1, max_queue=1)
    runner.attach(fake_engine)
    results: dict = {}
    thread = start_trace(runner, "inflight", results)
    wait_until(lambda: fake_engine.started == 1)
    threading.Timer(0.2, fake_engine.release.set).start()
    runner.close(grace=5.0)
    thread.join(5)
    assert results["inflight"].prompt == "inflight"
    with pytest.raises(Unavailable, match="shutting down"):
        runner.trace(TraceRequest(prompt="late"))


def test_close_stops_running_work_after_grace(fake_engine):
    runner = AttributionRunner(max_concurrent=1, max_queue=1)
    runner.attach(fake_engine)
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
    fake_engine.replicas_trace_concurrently = not one_at_a_time
    runner.attach(fake_engine)
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


def test_the_engine_gets_the_request_itself(fake_engine):
    """Per-request settings travel in the request: the runner hands it over unchanged."""
    runner = AttributionRunner()
    runner.attach(fake_engine)
    fake_engine.release.set()
    request = TraceRequest(prompt="x", k=2, tau=0.5, max_nodes=9, contrastive=("a", "b"), corpus_index=4, slug="s")
    runner.trace(request)
    assert fake_engine.requests == [request] and fake_engine.requests[0] is request


def test_interventions_queue_and_cancel_like_traces(fake_engine):
    from circuits_core.interventions import InterventionRequest, NeuronIntervention

    results: dict = {}
    runner = busy_runner(fake_engine, results, max_queue=1)
    request = InterventionRequest(prompt="hi", interventions=(NeuronIntervention(layer=0, index=1),))
    cancel = threading.Event()
    thread = start_call(results, "intervene", lambda: runner.intervene(request, should_stop=cancel.is_set))
    wait_until(lambda: runner.waiting == 1)
    with pytest.raises(ResourceExhausted):
        runner.intervene(request)
    cancel.set()
    thread.join(5)
    assert isinstance(results["intervene"], Cancelled) and fake_engine.started == 1
    fake_engine.release.set()
    assert runner.intervene(request).intervened[0].token == "hi"


def test_engine_errors_pass_through(fake_engine):
    runner = AttributionRunner()
    runner.attach(fake_engine)
    with pytest.raises(InvalidArgument, match="not traceable"):
        runner.trace(TraceRequest(prompt="bad"))
    assert runner.running == 0


@pytest.mark.parametrize(
    "fields",
    [{"prompt": ""}, {"prompt": "x", "k": -1}, {"prompt": "x", "tau": float("nan")}, {"prompt": "x", "contrastive": ("a",)},
     {"prompt": "x", "max_nodes": -3}, {"prompt": "x", "target_tokens": ("",)}, {"prompt": "x", "k": 0},
     {"prompt": "x", "target_tokens": ("a",), "contrastive": ("b", "c")}, {"prompt": "x", "target_tokens": "ab"}],
)
def test_trace_request_rejects_bad_values(fields):
    with pytest.raises(InvalidArgument):
        TraceRequest(**fields)


# -- the real engine -------------------------------------------------------------------------
PROMPT = "the capital of france is"


def test_stop_abandons_a_real_trace_and_leaves_the_engine_clean(tiny_engine):
    baseline = tiny_engine.trace(TraceRequest(prompt=PROMPT))
    calls = []

    def stop_after_two_layers() -> bool:
        calls.append(1)
        return len(calls) > 3

    runner = AttributionRunner()
    runner.attach(tiny_engine)
    with pytest.raises(Cancelled):
        runner.trace(TraceRequest(prompt=PROMPT), should_stop=stop_after_two_layers)
    assert 3 < len(calls) < 10  # stopped inside the first forward, not at the end
    again = runner.trace(TraceRequest(prompt=PROMPT))
    assert normalized(again) == normalized(baseline)  # the model was restored (no stuck patches/hooks)


def test_the_engine_stops_between_edge_chunks(tiny_engine):
    """Past the last forward the edge pass checks should_stop before each chunk of targets."""
    from circuits_attribution.attributor import RelPAttributor, RelPConfig

    engine = RelPAttributor(
        tiny_engine.model, tiny_engine.tokenizer, RelPConfig(edge_chunk_size=1, model_name=tiny_engine.model_name)
    )
    request = TraceRequest(prompt=PROMPT, tau=0.0)

    def stop_in_the_edge_pass() -> bool:
        return engine.last_timings.edge_chunks >= 2

    with pytest.raises(Cancelled):
        engine.trace(request, should_stop=stop_in_the_edge_pass)
    assert engine.last_timings.edge_chunks == 2  # two chunks done, the third never started
    assert normalized(engine.trace(request)) == normalized(tiny_engine.trace(request))


def test_per_request_settings_match_an_engine_configured_with_them(tiny_engine):
    from circuits_attribution import RelPAttributor

    before = tiny_engine.config
    request = TraceRequest(prompt=PROMPT, tau=0.05, max_nodes=7, k=2, corpus_index=42)
    graph = tiny_engine.trace(request)
    assert tiny_engine.config is before  # never reconfigured
    configured = RelPAttributor(
        tiny_engine.model, tiny_engine.tokenizer, dataclasses.replace(before, tau=0.05, max_nodes=7, k=2)
    )
    expected = configured.trace(PROMPT)
    assert graph.metadata.corpus_index == 42
    assert graph.metadata.node_threshold == 0.05 and len(graph.logits) == 2
    assert normalized(dataclasses.replace(graph, metadata=dataclasses.replace(graph.metadata, corpus_index=-1))) == normalized(expected)
    assert graph.graph_id != tiny_engine.trace(TraceRequest(prompt=PROMPT)).graph_id  # settings are in the id
    # the engine's defaults for trace(prompt) and TraceRequest's are the same single set
    assert normalized(tiny_engine.trace(PROMPT)) == normalized(tiny_engine.trace(TraceRequest(prompt=PROMPT)))


def test_replicas_share_weights_and_trace_concurrently_like_one_engine(tiny_engine):
    replicas = [tiny_engine, tiny_engine.replicate(), tiny_engine.replicate()]
    w0 = tiny_engine.model.model.embed_tokens.weight
    assert all(r.model.model.embed_tokens.weight is w0 for r in replicas)
    assert all(r.model is not tiny_engine.model for r in replicas[1:])
    prompts = ["the capital of france is", "big red dog a b c", "one two three four five", "sun moon cat dog"]
    expected = {p: normalized(tiny_engine.trace(p)) for p in prompts}
    assert all(normalized(replicas[2].trace(p)) == expected[p] for p in prompts[:1])
    runner = AttributionRunner(max_concurrent=3, max_queue=20)
    runner.attach(tiny_engine)
    assert runner.max_concurrent == 3
    results: list = []

    def go(prompt: str) -> None:
        results.append((prompt, runner.trace(TraceRequest(prompt=prompt))))

    threads = [threading.Thread(target=go, args=(p,)) for p in prompts * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 12
    assert all(normalized(graph) == expected[prompt] for prompt, graph in results)

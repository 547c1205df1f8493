"""LOAD: many concurrent clients against real servers.

* atlas: 64 concurrent clients (one channel each) send a fixed mix of queries to a real atlas
  server process; every call must succeed and answer what a single client gets (p50/p99 printed).
* attribution: more concurrent Trace calls than running + queued slots; the excess is refused
  at once with RESOURCE_EXHAUSTED naming the queue bound, nothing else fails, nothing hangs, and
  the server's memory returns to its baseline after repeated waves.
"""

from __future__ import annotations

import functools
import gc
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from drill_support import ENFORCED_LIMITS, PROMPTS, record_drill, rss_bytes

CLIENTS = 64
REQUESTS_PER_CLIENT = 12


@pytest.fixture(scope="module")
def atlas_process(spawn, small_atlas):
    proc = spawn("circuits_atlas", "--duckdb", str(small_atlas), name="atlas-load").start(timeout=120)
    yield proc
    assert proc.stop() == 0, proc.tail()


def _workload(address: str) -> list[tuple[str, tuple]]:
    """A fixed query mix over units, clusters and words the atlas holds."""
    from circuits_sdk.atlas import AtlasClient

    with AtlasClient(address) as atlas:
        units = [(u.layer, u.index) for u in atlas.search_units("detector", limit=50)]
        clusters = sorted({u.cluster.split(".")[0] for l, n in units[:10] for u in [atlas.get_unit(l, n)] if u.cluster})
    assert len(units) >= 20 and clusters, "the fixture atlas should hold labelled, clustered units"
    rng = random.Random(11)
    calls = []
    for i in range(CLIENTS * REQUESTS_PER_CLIENT):
        kind = ("search", "unit", "edges", "cluster", "stats")[i % 5]
        if kind == "search":
            calls.append((kind, (rng.choice(["enzyme", "capital detector", "rhyme", "colour", "music L2"]),)))
        elif kind == "unit":
            calls.append((kind, rng.choice(units)))
        elif kind == "edges":
            calls.append((kind, (*rng.choice(units), rng.choice(["upstream", "downstream", "both"]))))
        elif kind == "cluster":
            calls.append((kind, (rng.choice(clusters),)))
        else:
            calls.append((kind, ()))
    return calls


def _run(atlas, kind: str, args: tuple):
    if kind == "search":
        return [(u.layer, u.index) for u in atlas.search_units(args[0], limit=20)]
    if kind == "unit":
        u = atlas.get_unit(*args)
        return (u.layer, u.index, u.label)
    if kind == "edges":
        return [(e.src_layer, e.src_index, e.tgt_layer, e.tgt_index, e.count)
                for e in atlas.get_edges_for_unit(args[0], args[1], direction=args[2], limit=50)]  # fmt: skip
    if kind == "cluster":
        return sorted((u.layer, u.index) for u in atlas.get_cluster(args[0], limit=200).units)
    s = atlas.stats()
    return (s.neurons, s.edges)


def test_atlas_64_concurrent_clients_zero_errors(atlas_process) -> None:
    from circuits_sdk.atlas import AtlasClient

    calls = _workload(atlas_process.address)
    with AtlasClient(atlas_process.address) as atlas:
        expected = {i: _run(atlas, *call) for i, call in enumerate(calls[:CLIENTS * 2])}

    latencies: list[float] = []
    errors: list[str] = []
    mismatches: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(CLIENTS)

    def client(c: int) -> None:
        mine = list(range(c, len(calls), CLIENTS))
        with AtlasClient(atlas_process.address, timeout=60) as atlas:
            barrier.wait(timeout=60)  # every client connected: start together
            for i in mine:
                t0 = time.perf_counter()
                try:
                    answer = _run(atlas, *calls[i])
                except Exception as exc:  # noqa: BLE001 - counted, reported below
                    with lock:
                        errors.append(f"{calls[i][0]}: {type(exc).__name__}: {exc}")
                    continue
                elapsed = time.perf_counter() - t0
                with lock:
                    latencies.append(elapsed)
                    if i in expected and expected[i] != answer:
                        mismatches.append(i)

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    wall = time.perf_counter() - started
    row = record_drill(f"load: atlas, {CLIENTS} concurrent clients", latencies_s=latencies, requests=len(calls),
                       errors=len(errors), note=f"{len(calls) / wall:.0f} req/s")  # fmt: skip
    print(f"\natlas load: {row.requests} requests, {row.errors} errors, p50 {row.p50_ms:.1f} ms, "
          f"p99 {row.p99_ms:.1f} ms, {len(calls) / wall:.0f} req/s")  # fmt: skip
    assert errors == [], errors[:5]
    assert len(latencies) == len(calls)
    assert mismatches == [], "concurrent answers differ from single-client answers"
    assert atlas_process.proc.poll() is None


# -- attribution: bounded queue under overload ---------------------------------------------------
MAX_CONCURRENT = 1
MAX_QUEUE = 2
BURST = 16
WAVES = 6


def _burst(address: str, prompts: list[str]) -> tuple[list[str], list[float], list[str]]:
    """Fire len(prompts) Trace calls at once; return each outcome (OK or a status code name)."""
    import grpc
    from circuits_core import wire
    from circuits_core._proto.circuits.v1 import attribution_pb2_grpc
    from circuits_core.tracing import TraceRequest

    channels = [grpc.insecure_channel(address) for _ in prompts]
    stubs = [attribution_pb2_grpc.AttributionServiceStub(ch) for ch in channels]
    for ch in channels:
        grpc.channel_ready_future(ch).result(timeout=10)
    barrier = threading.Barrier(len(prompts))
    outcomes: list[str] = [""] * len(prompts)
    latencies: list[float] = [0.0] * len(prompts)
    messages: list[str] = []

    def one(i: int) -> None:
        request = wire.trace_request_to_proto(TraceRequest(prompt=prompts[i]))
        barrier.wait(timeout=30)
        t0 = time.perf_counter()
        try:
            stubs[i].Trace(request, timeout=60)
            outcomes[i] = "OK"
        except grpc.RpcError as exc:
            outcomes[i] = exc.code().name
            messages.append(exc.details() or "")
        latencies[i] = time.perf_counter() - t0

    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            list(pool.map(one, range(len(prompts))))
    finally:
        for ch in channels:
            ch.close()
    return outcomes, latencies, messages


def test_attribution_overload_gets_resource_exhausted_and_memory_returns(tiny_engine) -> None:
    from circuits_server.serving import ServerSettings
    from circuits_attribution.server import AttributionSettings, build_server

    # A slow engine makes the overload certain: each trace holds its slot a while.
    class Slowed:
        def __init__(self, engine) -> None:
            self.engine = engine

            @functools.wraps(engine.trace)  # same signature: the runner inspects it
            def trace(*args, **options):
                time.sleep(0.15)
                return engine.trace(*args, **options)

            self.trace = trace

        def __getattr__(self, name):
            return getattr(self.engine, name)

    server = build_server(
        AttributionSettings(server=ServerSettings(port=0, grace_seconds=1), model="tiny",
                            max_concurrent=MAX_CONCURRENT, max_queue=MAX_QUEUE),
        Slowed(tiny_engine),
    ).start()  # fmt: skip
    try:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(BURST)]
        _burst(server.address, prompts)  # warm-up wave: imports, caches, thread pools
        gc.collect()
        baseline = rss_bytes()
        totals = {"OK": 0, "RESOURCE_EXHAUSTED": 0}
        all_latencies: list[float] = []
        refused_latencies: list[float] = []
        other: list[str] = []
        started = time.perf_counter()
        for _wave in range(WAVES):
            outcomes, latencies, messages = _burst(server.address, prompts)
            all_latencies += latencies
            refused_latencies += [t for t, o in zip(latencies, outcomes) if o == "RESOURCE_EXHAUSTED"]
            for outcome in outcomes:
                if outcome in totals:
                    totals[outcome] += 1
                else:
                    other.append(outcome)
            assert any("max_queue=2" in m for m in messages), messages[:3]
        wall = time.perf_counter() - started
        gc.collect()
        after = rss_bytes()
    finally:
        server.stop(0.5)
    grown_mb = (after - baseline) / 2**20
    record_drill(f"load: attribution burst {BURST} > slots {MAX_CONCURRENT}+{MAX_QUEUE}", latencies_s=all_latencies,
                 errors=len(other), note=f"ok {totals['OK']}, exhausted {totals['RESOURCE_EXHAUSTED']}, "
                 f"rss {grown_mb:+.1f} MiB, {wall:.1f}s")  # fmt: skip
    assert other == [], f"only OK or RESOURCE_EXHAUSTED allowed, got {sorted(set(other))}"
    # Each wave: at most running + queued (+ one that finished and freed its slot meanwhile) succeed.
    assert totals["OK"] >= WAVES * MAX_CONCURRENT
    assert totals["RESOURCE_EXHAUSTED"] >= WAVES * (BURST - 2 * (MAX_CONCURRENT + MAX_QUEUE))
    assert max(all_latencies) < 30, "a call hung"
    assert sorted(refused_latencies)[len(refused_latencies) // 2] < 1.0, "refusals must be immediate, not queued"
    assert grown_mb < 40, f"RSS grew {grown_mb:.1f} MiB over {WAVES} overload waves"
    ENFORCED_LIMITS.append("max_queue")

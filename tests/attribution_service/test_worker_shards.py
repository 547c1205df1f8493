"""Shard routing: the batch worker sends each graph to aggregator shard shard_of(graph_id) mod N.

Three real aggregator server processes (one per shard), the real engine on the tiny checkpoint;
shard 1 is SIGKILLed mid-stream and restarted on the same port and state. Every graph must land
exactly once in exactly its own shard, and the merged export of the three shards must equal a
single-pass aggregation of the same graphs.
"""

from __future__ import annotations

import math
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from circuits_core.aggregator_types import shard_of
from circuits_core.errors import InvalidArgument
from circuits_attribution.worker import AggregatorSink, WorkerSettings, run_worker

from test_worker import graph_files, prompts_file

SHARDS = 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Shard:
    """``python -m circuits_aggregator`` for one shard, restartable on the same port and state."""

    def __init__(self, root: Path, index: int) -> None:
        self.index, self.state, self.port = index, root / f"shard-{index}.duckdb", _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "circuits_aggregator", "--state", str(self.state), "--host", "127.0.0.1",
             "--port", str(self.port), "--insecure", "--shard-index", str(self.index), "--shard-count", str(SHARDS),
             "--batch-ms", "5"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        said = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            said.append(line)
            if "listening on" in line:
                threading.Thread(target=lambda p=self.proc: [None for _ in p.stdout], daemon=True).start()
                return
            if self.proc.poll() is not None:
                break
        raise AssertionError(f"shard {self.index} did not start: {''.join(said)[-2000:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _rows(directory: Path, name: str, keys: tuple[str, ...]) -> dict:
    return {tuple(r[k] for k in keys): r for r in pq.read_table(directory / f"{name}.parquet").to_pylist()}


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key, row in a.items():
        other = b[key]
        for col, value in row.items():
            if isinstance(value, float) and isinstance(other[col], float):
                if not math.isclose(value, other[col], rel_tol=1e-12, abs_tol=1e-12):
                    return False
            elif value != other[col]:
                return False
    return True


def test_worker_routes_each_graph_to_its_shard_exactly_once_across_a_sigkill(tmp_path, tiny_engine) -> None:
    from circuits_sdk.aggregator import AggregatorClient
    from circuits_aggregator.directory import aggregate_directory
    from circuits_aggregator.merge import merge_exports
    from circuits_aggregator.store import AggregateStore

    path, good = prompts_file(tmp_path, 18)
    shards = [Shard(tmp_path, i) for i in range(SHARDS)]
    for shard in shards:
        shard.start()
    try:
        sink = AggregatorSink(",".join(s.address for s in shards))
        sent: list[str] = []
        killed = threading.Event()
        original_send = sink.send

        def send(graph):
            # Mid-stream: after 6 graphs, SIGKILL shard 1 and bring it back 1.5 s later (same port,
            # same state); the sink's client for shard 1 keeps re-sending until it is acknowledged.
            if len(sent) == 6 and not killed.is_set():
                killed.set()
                shards[1].kill()
                threading.Timer(1.5, shards[1].start).start()
            original_send(graph)
            sent.append(graph.graph_id)

        sink.send = send  # observe the real sink; routing and retries are its own
        settings = WorkerSettings(prompts=path, output_dir=tmp_path / "graphs", progress=False)
        report = run_worker(settings, tiny_engine, sink=sink)
        sink.close()
        assert report.traced == len(good) and killed.is_set()
        by_shard = {i: {g for g in sent if shard_of(g, SHARDS) == i} for i in range(SHARDS)}
        assert all(by_shard.values()), "every shard should own some of 18 graphs"

        exports = []
        for shard in shards:
            with AggregatorClient(shard.address) as client:
                stats = client.stats()
                assert (stats.shard_index, stats.shard_count) == (shard.index, SHARDS)
                assert stats.graphs_processed == len(by_shard[shard.index])  # exactly once, only its own
                out = tmp_path / f"shard-{shard.index}-export"
                client.export(out)
                exports.append(out)
                ledger = {r["graph_id"] for r in pq.read_table(out / "ledger.parquet").to_pylist()}
                assert ledger == by_shard[shard.index]
    finally:
        for shard in shards:
            shard.stop()

    merged = tmp_path / "merged"
    merge_exports(exports, merged)
    single = tmp_path / "single"
    with AggregateStore(tmp_path / "single.duckdb") as store:
        aggregate_directory(store, tmp_path / "graphs", progress=False)
        assert store.graphs_total == len(graph_files(tmp_path / "graphs")) == len(good)
        store.export(single)
    edge_key = ("src_layer", "src_neuron", "tgt_layer", "tgt_neuron")
    assert _same(_rows(merged, "edges", edge_key), _rows(single, "edges", edge_key))
    assert _same(_rows(merged, "units", ("layer", "neuron")), _rows(single, "units", ("layer", "neuron")))


def test_sink_refuses_bad_shard_lists() -> None:
    with pytest.raises(InvalidArgument, match="every shard"):
        AggregatorSink(" , ")
    with pytest.raises(InvalidArgument, match="twice"):
        AggregatorSink("a:1,b:2,a:1")
    sink = AggregatorSink("a:1,b:2,c:3")
    assert [sink.shard_for(g) for g in ("x", "y", "z")] == [shard_of(g, 3) for g in ("x", "y", "z")]

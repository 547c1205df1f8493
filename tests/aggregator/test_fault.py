"""FAULT: SIGKILL the aggregator server at random points while a client streams; after restarts
and client re-sends, the totals equal one clean pass - nothing lost, nothing counted twice."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from circuits_core import wire
from circuits_sdk.aggregator import AggregatorClient
from circuits_aggregator import AggregateStore
from circuits_core.aggregator_types import graph_arrays_from_graph
from circuits_aggregator.testing import random_graph


class ServerProcess:
    """`python -m circuits_aggregator` in a subprocess; learns its port from stdout."""

    def __init__(self, state, port: int = 0) -> None:
        self.state, self.port, self.proc = state, port, None

    def start(self) -> None:
        for _attempt in range(50):
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "circuits_aggregator", "--state", str(self.state), "--port", str(self.port),
                 "--batch-graphs", "64", "--batch-ms", "20", "--insecure"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            line = self.proc.stdout.readline()
            if "listening on" in line:
                self.port = int(line.rsplit(":", 1)[1])
                return
            self.proc.wait()
            time.sleep(0.1)  # port not free yet; try again
        raise RuntimeError("aggregator server did not start")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def test_sigkill_restart_resend_equals_clean_pass(tmp_path) -> None:
    rng = np.random.default_rng(31)
    corpus = [random_graph(rng, n_neurons=6, n_edges=12) for _ in range(3000)]
    messages = [wire.graph_to_proto(g) for g in corpus]

    server = ServerProcess(tmp_path / "state.duckdb")
    server.start()
    chooser = random.Random(7)
    kill_points = sorted(chooser.sample(range(200, 2800), 4))
    acked = {"n": 0}
    trigger = threading.Event()
    kills = []

    def on_ack(ack) -> None:
        acked["n"] += len(ack.graph_ids)
        if kill_points and acked["n"] >= kill_points[0]:
            kill_points.pop(0)
            trigger.set()

    def killer() -> None:
        while len(kills) < 4:
            if not trigger.wait(timeout=60):
                return
            trigger.clear()
            time.sleep(chooser.uniform(0, 0.03))  # land anywhere: mid-batch, mid-commit, between acks
            server.kill()
            kills.append(acked["n"])
            time.sleep(chooser.uniform(0.05, 0.3))
            server.start()

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        with AggregatorClient(f"127.0.0.1:{server.port}", max_in_flight=128, reconnect_timeout=60) as client:
            report = client.ingest(messages, on_ack=on_ack)
            thread.join(timeout=60)
            assert len(kills) == 4, kills
            assert report.reconnects >= 4 and report.resent > 0
            stats = client.stats()
            client.export(tmp_path / "after_faults")
    finally:
        server.stop()

    with AggregateStore(tmp_path / "clean.duckdb") as clean:
        arrays = [graph_arrays_from_graph(g) for g in corpus]
        for start in range(0, len(arrays), 500):
            clean.ingest(arrays[start : start + 500])
        clean.export(tmp_path / "clean")
        want = clean.stats()
    assert stats.graphs_processed == want.graphs_processed == 3000
    assert stats.total_edge_observations == want.total_edge_observations
    assert (stats.distinct_edges, stats.distinct_units) == (want.distinct_edges, want.distinct_units)

    import pyarrow.parquet as pq

    for name, keys in (("edges", ["src_layer", "src_neuron", "tgt_layer", "tgt_neuron"]), ("units", ["layer", "neuron"])):
        got = pq.read_table(tmp_path / "after_faults" / f"{name}.parquet").sort_by([(k, "ascending") for k in keys])
        ref = pq.read_table(tmp_path / "clean" / f"{name}.parquet").sort_by([(k, "ascending") for k in keys])
        assert got.column_names == ref.column_names
        for column in got.column_names:
            a, b = got.column(column).to_numpy(zero_copy_only=False), ref.column(column).to_numpy(zero_copy_only=False)
            if a.dtype.kind == "f":
                np.testing.assert_allclose(a.astype(float), b.astype(float), rtol=1e-9, atol=1e-9, err_msg=column)
            else:
                np.testing.assert_array_equal(a, b, err_msg=column)
    ledger = pq.read_table(tmp_path / "after_faults" / "ledger.parquet").column("graph_id").to_pylist()
    assert sorted(ledger) == sorted(g.graph_id for g in corpus)

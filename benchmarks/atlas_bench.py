#!/usr/bin/env python
"""Atlas benchmark: build time, query latency through gRPC, and Infomap overhead.

Full scale (Qwen3-32B: 64 layers x 25,600 neurons, 50M edges; Llama-8B-sized Infomap network):

    OMP_NUM_THREADS=1 python benchmarks/atlas_bench.py --layers 64 --neurons 25600 --edges 50000000 \
        --infomap-nodes 458752 --infomap-edges 5000000 --infomap-trials 20

Every size is a flag; the defaults are a reduced scale that fits a shared 2-core / 24 GB box.
Prints: build time per step (the neighbour index included); GetEdgesForUnit and SearchUnits p50/p99
through a real server (separate process) with 1 and 32 concurrent clients, error counts; the same
1-client query lists run in this process on the database object the server wraps (neighbour index,
preloaded search) with the ratio service/in-process, and on the SQL-only path (baseline) with a
check that both paths answer identically; the 1-client p50 split into its parts: database call,
servicer (request message -> response message, no gRPC), servicer + both ends' serialization and
the SDK's decoding, the service, and a bare gRPC server answering fixed bytes of the same size (the
floor of the Python gRPC runtime; service and floor in alternating rounds); GetEdgesForUnit
throughput at 8 clients with 1 vs 2 server processes from three load generators in alternating
rounds (SDK clients; lean Python clients sending pre-serialized requests without parsing answers;
h2load, nghttp2's C load generator, when installed), with client and server CPU per request;
Infomap time for cluster_full_model vs a bare Infomap run on the same links (ratio, target <= 1.5x).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

WORDS = (
    "enzyme capital city river number date month year name person country language verb noun plural past "
    "tense negation quote bracket code python function variable loop math addition digit comparison color "
    "animal food music sport science chemistry biology physics history war king queen law money market "
    "emotion anger joy question answer greeting farewell rhyme poem story weather rain sun moon star ocean"
).split()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


# ------------------------------------------------------------------------------------------
# Synthetic inputs
# ------------------------------------------------------------------------------------------
def write_export(root: Path, *, layers: int, neurons: int, edges: int, seed: int, chunk: int = 2_000_000) -> None:
    """edges/units/ledger.parquet with the aggregator's columns; edges go to 1-3 layers later."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    schema = pa.schema(
        [("src_layer", pa.int32()), ("src_neuron", pa.int32()), ("tgt_layer", pa.int32()), ("tgt_neuron", pa.int32()),
         ("count", pa.int64())] + [(n, pa.float64()) for n in ("weight_sum", "weight_abs_sum", "weight_sq_sum", "weight_min", "weight_max")]
    )  # fmt: skip
    with pq.ParquetWriter(root / "edges.parquet", schema) as writer:
        written = 0
        while written < edges:
            n = min(chunk, edges - written)
            src_layer = rng.integers(0, layers - 1, n, dtype=np.int32)
            tgt_layer = np.minimum(src_layer + rng.integers(1, 4, n, dtype=np.int32), layers - 1).astype(np.int32)
            count = rng.geometric(0.25, n).astype(np.int64)
            mean = rng.normal(0, 0.05, n)
            spread = np.abs(rng.normal(0, 0.02, n))
            wsum = mean * count
            writer.write_table(
                pa.table(
                    {
                        "src_layer": src_layer, "src_neuron": rng.integers(0, neurons, n, dtype=np.int32),
                        "tgt_layer": tgt_layer, "tgt_neuron": rng.integers(0, neurons, n, dtype=np.int32),
                        "count": count, "weight_sum": wsum, "weight_abs_sum": np.abs(mean) * count + spread,
                        "weight_sq_sum": (mean**2 + spread**2) * count, "weight_min": mean - spread, "weight_max": mean + spread,
                    },  # fmt: skip
                    schema=schema,
                )
            )
            written += n
    total = layers * neurons
    layer = np.repeat(np.arange(layers, dtype=np.int32), neurons)
    neuron = np.tile(np.arange(neurons, dtype=np.int32), layers)
    gc = rng.geometric(0.01, total).astype(np.int64)
    cols = {"layer": layer, "neuron": neuron, "graph_count": gc, "observation_count": gc * 2}
    for name in ("act_sum", "act_sq_sum", "act_min", "act_max", "attr_sum", "attr_abs_sum", "attr_sq_sum", "attr_min", "attr_max"):
        cols[name] = rng.random(total)
    pq.write_table(pa.table(cols), root / "units.parquet")
    pq.write_table(
        pa.table({"graph_id": [f"g{i}" for i in range(1000)], "source": ["bench"] * 1000, "corpus_index": np.arange(1000)}),
        root / "ledger.parquet",
    )


def write_labels(path: Path, *, layers: int, neurons: int, fraction: float, seed: int) -> int:
    rng = random.Random(seed)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for layer in range(layers):
            for neuron in range(neurons):
                if rng.random() >= fraction:
                    continue
                words = rng.sample(WORDS, 4)
                fh.write(
                    json.dumps(
                        {"layer": layer, "neuron": neuron, "label": f"{words[0]} and {words[1]} detector",
                         "input_label": f"tokens about {words[2]}", "description": f"Promotes {words[3]} continuations.",
                         "source": "progressive_output"}  # fmt: skip
                    )
                    + "\n"
                )
                n += 1
    return n


# ------------------------------------------------------------------------------------------
# Query latency through a real server
# ------------------------------------------------------------------------------------------
def start_server(atlas: Path, workers: int, processes: int = 1) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "circuits_atlas", "--duckdb", str(atlas), "--port", "0", "--host", "127.0.0.1",
         "--max-workers", str(workers), "--insecure", "--processes", str(processes)],  # loopback only; servers refuse plaintext without the flag
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    deadline = time.time() + 300
    assert proc.stdout is not None
    said: list[str] = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        said.append(line)
        # The parent's own line (helpers of --processes N log "... atlas PATH serving on ..." first,
        # before the parent has opened the atlas).
        match = re.match(r"atlas serving on (\S+)", line)
        if match:
            # Keep draining the server's output so its log never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, match.group(1)
        if proc.poll() is not None:
            raise SystemExit("atlas server exited during start: " + "".join(said)[-2000:])
    raise SystemExit("atlas server did not start")


def query_list(kind: str, count: int, *, layers: int, neurons: int, seed: int) -> list[tuple]:
    """The arguments of ``count`` queries of one client (edges: (layer, neuron); search: (text,))."""
    rng = random.Random(seed)
    if kind == "edges":
        return [(rng.randrange(layers), rng.randrange(neurons)) for _ in range(count)]
    return [(" ".join(rng.sample(WORDS, rng.choice((1, 2)))),) for _ in range(count)]


def run_query(target, kind: str, args: tuple):
    """One query on an AtlasClient or a CircuitDatabase (same method names and results)."""
    if kind == "edges":
        return target.get_edges_for_unit(args[0], args[1], "both", limit=100)
    return target.search(args[0], limit=20)


def measure(
    address: str, *, concurrency: int, requests: int, kind: str, layers: int, neurons: int, seed: int, warmup: int = 0
) -> dict:
    from circuits_sdk.atlas import AtlasClient

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    per_client = max(1, requests // concurrency)

    def worker(i: int) -> None:
        warm = query_list(kind, warmup // concurrency, layers=layers, neurons=neurons, seed=seed * 1000 + i + 500)
        timed = query_list(kind, per_client, layers=layers, neurons=neurons, seed=seed * 1000 + i)
        local: list[float] = []
        with AtlasClient(address, timeout=30) as client:
            client.stats()  # connect before timing
            for args in warm:  # untimed: fill the server's buffer pool
                run_query(client, kind, args)
            for args in timed:
                t0 = time.perf_counter()
                try:
                    run_query(client, kind, args)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(repr(exc)[:200])
                    continue
                local.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(local)

    return run_workers(worker, kind, concurrency, latencies, errors)


def run_workers(worker, kind: str, concurrency: int, latencies: list, errors: list) -> dict:
    """Run ``worker(i)`` on ``concurrency`` threads (each appends to ``latencies`` / ``errors``);
    the load figures of the run."""
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "kind": kind, "concurrency": concurrency, "requests": len(latencies) + len(errors), "errors": len(errors),
        "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
        "qps": len(latencies) / wall if wall else 0.0, "first_error": errors[0] if errors else "", "wall_s": wall,
        "answered": len(latencies),
    }  # fmt: skip


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children (Linux /proc; 0 elsewhere)."""
    return sum(process_cpu_seconds(pid).values())


def process_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of a process and of each of its children, by pid (Linux /proc;
    empty elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[1]) == pid:  # fields[1] is the parent pid
            found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    return found


def measure_in_process(db, *, requests: int, kind: str, layers: int, neurons: int, seed: int, warmup: int = 0) -> dict:
    """The 1-client query list of :func:`measure`, run on the database object the server wraps."""
    for args in query_list(kind, warmup, layers=layers, neurons=neurons, seed=seed * 1000 + 500):
        run_query(db, kind, args)
    latencies = []
    for args in query_list(kind, requests, layers=layers, neurons=neurons, seed=seed * 1000):
        t0 = time.perf_counter()
        run_query(db, kind, args)
        latencies.append(time.perf_counter() - t0)
    return {"p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99), "n": len(latencies)}


class _LocalContext:
    """What the atlas servicer reads from a grpc.ServicerContext, for calls without a server."""

    def time_remaining(self) -> None:
        return None


_METHODS = {"edges": "GetEdgesForUnit", "search": "SearchUnits"}


def request_message(kind: str, args: tuple):
    """The request the SDK sends for one query of :func:`run_query`."""
    from circuits_core import wire
    from circuits_core._proto.circuits.v1 import atlas_pb2

    if kind == "edges":
        return atlas_pb2.GetEdgesForUnitRequest(layer=args[0], index=args[1], direction=wire.edge_direction_to_proto("both"), limit=100)
    return atlas_pb2.SearchUnitsRequest(text=args[0], limit=20)


def decode_response(kind: str, raw: bytes):
    """Response bytes -> the SDK's answer (what AtlasClient returns for the query)."""
    from circuits_core import wire
    from circuits_core._proto.circuits.v1 import atlas_pb2

    if kind == "edges":
        return [wire.edge_from_proto(e) for e in atlas_pb2.GetEdgesForUnitResponse.FromString(raw).edges]
    return wire.search_hits_from_proto(atlas_pb2.SearchUnitsResponse.FromString(raw))


def measure_servicer(db, *, requests: int, kind: str, layers: int, neurons: int, seed: int, warmup: int = 0) -> dict:
    """The 1-client query list of :func:`measure` in this process, no gRPC, three ways per query
    (interleaved, so load from elsewhere on the machine hits all three alike): ``database`` the
    database call the servicer makes; ``servicer`` request message -> servicer method -> response
    message; ``codec`` that plus what the two ends do around it (request serialized and parsed,
    response serialized, parsed and turned into domain objects as the SDK does). Also counts the
    queries whose decoded answer equals the database's."""
    from circuits_core._proto.circuits.v1 import atlas_pb2
    from circuits_atlas.servicer import AtlasServicer

    servicer, context = AtlasServicer(db), _LocalContext()
    method = getattr(servicer, _METHODS[kind])
    request_type = atlas_pb2.GetEdgesForUnitRequest if kind == "edges" else atlas_pb2.SearchUnitsRequest
    for args in query_list(kind, warmup, layers=layers, neurons=neurons, seed=seed * 1000 + 500):
        method(request_message(kind, args), context)
    queries = query_list(kind, requests, layers=layers, neurons=neurons, seed=seed * 1000)
    database, bare, full, same = [], [], [], 0
    for args in queries:
        t0 = time.perf_counter()
        expected = run_query(db, kind, args)
        database.append(time.perf_counter() - t0)
        request = request_message(kind, args)
        t0 = time.perf_counter()
        method(request, context)
        bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        raw = method(request_type.FromString(request_message(kind, args).SerializeToString()), context).SerializeToString()
        answer = decode_response(kind, raw)
        full.append(time.perf_counter() - t0)
        same += answer == expected
    return {"database_ms": 1000 * percentile(database, 50), "servicer_ms": 1000 * percentile(bare, 50),
            "codec_ms": 1000 * percentile(full, 50), "same": same, "n": len(queries)}  # fmt: skip


def start_floor_server(responses: dict[str, bytes]) -> tuple[subprocess.Popen, str]:
    """A bare gRPC server (same grpc runtime, no interceptors, no servicer work) in a subprocess
    that answers each atlas method with fixed response bytes: the transport floor."""
    script = (
        "import sys, grpc, json\n"
        "from concurrent import futures\n"
        "answers = {k: bytes.fromhex(v) for k, v in json.loads(sys.stdin.readline()).items()}\n"
        "handlers = {m: grpc.unary_unary_rpc_method_handler(lambda req, ctx, a=a: a) for m, a in answers.items()}\n"
        "server = grpc.server(futures.ThreadPoolExecutor(max_workers=int(sys.argv[1])))\n"
        "server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler('circuits.v1.AtlasService', handlers),))\n"
        "port = server.add_insecure_port('127.0.0.1:0')\n"
        "server.start()\n"
        "print(f'floor serving on 127.0.0.1:{port}', flush=True)\n"
        "sys.stdin.read()\n"  # until the benchmark closes stdin
        "server.stop(0)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, "32"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps({m: r.hex() for m, r in responses.items()}) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    match = re.match(r"floor serving on (\S+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"floor server did not start: {line!r}")
    return proc, match.group(1)


def stop_floor_server(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def typical_response(db, kind: str, *, layers: int, neurons: int, seed: int, sample: int = 200) -> bytes:
    """Serialized answer of median size among the first ``sample`` queries of the 1-client list."""
    from circuits_atlas.servicer import AtlasServicer

    servicer, context = AtlasServicer(db), _LocalContext()
    method = getattr(servicer, _METHODS[kind])
    raws = sorted((method(request_message(kind, a), context).SerializeToString()
                   for a in query_list(kind, sample, layers=layers, neurons=neurons, seed=seed * 1000)), key=len)  # fmt: skip
    return raws[len(raws) // 2]


def measure_lean(address: str, *, concurrency: int, requests: int, kind: str, layers: int, neurons: int, seed: int,
                 warmup: int = 0) -> dict:
    """Load from ``concurrency`` threads that send pre-serialized requests over grpc's generic
    unary call (identity serializers) and do not parse the answers: a lighter load generator
    than the SDK client, so the server, not the client, is what runs out of CPU. The last answer
    of each thread is parsed to check it is a real response."""
    import grpc

    path = f"/circuits.v1.AtlasService/{_METHODS[kind]}"
    per_client = max(1, requests // concurrency)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        warm = [request_message(kind, a).SerializeToString()
                for a in query_list(kind, warmup // concurrency, layers=layers, neurons=neurons, seed=seed * 1000 + i + 500)]  # fmt: skip
        timed = [request_message(kind, a).SerializeToString()
                 for a in query_list(kind, per_client, layers=layers, neurons=neurons, seed=seed * 1000 + i)]  # fmt: skip
        local: list[float] = []
        raw = b""
        # Its own connection per thread, as AtlasClient has (grpc would otherwise share one TCP
        # connection per target across the process, and SO_REUSEPORT spreads connections).
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            call = channel.unary_unary(path)  # no serializers: bytes in, bytes out
            for request in warm:
                call(request, timeout=30)
            for request in timed:
                t0 = time.perf_counter()
                try:
                    raw = call(request, timeout=30)
                except grpc.RpcError as exc:
                    with lock:
                        errors.append(f"{exc.code().name}: {exc.details()}"[:200])
                    continue
                local.append(time.perf_counter() - t0)
        if raw:
            decode_response(kind, raw)  # raises if the bytes are not a response
        with lock:
            latencies.extend(local)

    return run_workers(worker, kind, concurrency, latencies, errors)


def _h2load_seconds(text: str) -> float:
    value = float(re.match(r"[0-9.]+", text).group(0))
    return value / 1e6 if text.endswith("us") else value / 1e3 if text.endswith("ms") else value


def measure_h2load(address: str, *, concurrency: int, requests: int, kind: str, layers: int, neurons: int, seed: int,
                   warmup: int = 0, answer: tuple[bytes, bytes] | None = None) -> dict:
    """Load from h2load (nghttp2's HTTP/2 load generator, C): ``concurrency`` connections, one
    call in flight on each, every call the same pre-serialized gRPC request ``answer[0]``. Its
    CPU per request is a small fraction of a Python client's, so on a small machine this is the
    figure that shows the server's own scaling. h2load does not read gRPC status trailers: every
    call must have returned exactly the expected answer bytes ``answer[1]`` (checked from the
    DATA bytes it received), otherwise the calls are counted as errors."""
    assert answer is not None, "measure_h2load needs the request and its expected answer"
    request, expected = answer
    path = f"/circuits.v1.AtlasService/{_METHODS[kind]}"
    with tempfile.NamedTemporaryFile(suffix=".grpc") as body:
        body.write(b"\x00" + len(request).to_bytes(4, "big") + request)  # one uncompressed gRPC message
        body.flush()

        def run(n: int) -> str:
            cmd = ["h2load", "-n", str(n), "-c", str(concurrency), "-m", "1", "-H", "content-type: application/grpc",
                   "-H", "te: trailers", "-d", body.name, f"http://{address}{path}"]  # fmt: skip
            return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout

        if warmup:
            run(max(warmup, concurrency))
        out = run(max(requests, concurrency))
    done = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded", out)
    data = re.search(r"traffic: .*\((\d+)\) data", out)  # "traffic: 2.20MB (2305968) total, ..., 1.97MB (2068000) data"
    wall = re.search(r"finished in ([0-9.]+(?:us|ms|s)),", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    if not (done and data and wall):
        raise SystemExit(f"could not read h2load's report: {out[-800:]}")
    total, succeeded, data_bytes = int(done.group(1)), int(done.group(2)), int(data.group(1))
    per_call = 5 + len(expected)
    answered = succeeded if data_bytes == succeeded * per_call else min(succeeded, data_bytes // per_call)
    errors = total - answered
    return {
        "kind": kind, "concurrency": concurrency, "requests": total, "errors": errors, "answered": answered,
        "p50_ms": float("nan"), "mean_ms": 1000 * _h2load_seconds(mean.group(1)) if mean else float("nan"),
        "wall_s": _h2load_seconds(wall.group(1)), "qps": answered / _h2load_seconds(wall.group(1)),
        "first_error": "" if not errors else f"{errors} calls did not return the expected {len(expected)}-byte answer "
                                              f"({data_bytes} DATA bytes for {succeeded} calls)",
    }  # fmt: skip


def client_cpu_seconds() -> float:
    """CPU seconds of this process and of its finished child processes (the h2load runs)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def fixed_edges_call(address: str, *, layers: int, neurons: int, seed: int) -> tuple[bytes, bytes]:
    """(request, answer) bytes of the first GetEdgesForUnit query of the 1-client list with a
    non-empty answer, as the server answers it (h2load repeats this one call)."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/circuits.v1.AtlasService/GetEdgesForUnit")
        for args in query_list("edges", 1000, layers=layers, neurons=neurons, seed=seed * 1000):
            request = request_message("edges", args).SerializeToString()
            answer = call(request, timeout=30)
            if decode_response("edges", answer):
                return request, answer
    raise SystemExit("no GetEdgesForUnit query with edges among the first 1000")


def alternate(measurements: dict[str, Callable[[int, int], dict]], *, rounds: int, requests: int, warmup: int) -> dict[str, dict]:
    """Run each ``measurements[name](requests, warmup)`` in alternating rounds (each round 1/rounds
    of the requests), so that load from elsewhere on a shared machine falls on all of them alike;
    every figure of the result is the median of its rounds' values (integers also summed: ``KEY_total``)."""
    rounds = max(1, rounds)
    seen: dict[str, list[dict]] = {name: [] for name in measurements}
    for _ in range(rounds):
        for name, run in measurements.items():
            r = run(max(1, requests // rounds), warmup // rounds)
            assert r.get("errors", 0) == 0, f"{name}: {r['errors']} failed requests ({r['first_error']})"
            seen[name].append(r)
    out: dict[str, dict] = {}
    for name, rs in seen.items():
        numbers = [key for key, value in rs[0].items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
        out[name] = {key: float(np.median([r[key] for r in rs])) for key in numbers}
        out[name].update({f"{key}_total": sum(r[key] for r in rs) for key in numbers if isinstance(rs[0][key], int)})
    return out


def compare_paths(fast, sql, *, requests: int, kind: str, layers: int, neurons: int, seed: int) -> tuple[int, int]:
    """How many of the first ``requests`` queries give identical answers on both database objects."""
    queries = query_list(kind, requests, layers=layers, neurons=neurons, seed=seed * 1000)
    return sum(run_query(fast, kind, a) == run_query(sql, kind, a) for a in queries), len(queries)


# ------------------------------------------------------------------------------------------
# Infomap overhead
# ------------------------------------------------------------------------------------------
def infomap_network(*, layers: int, neurons: int, edges: int, communities: int, seed: int):
    """Aggregated edges with planted communities (90% of edges inside one)."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    total = layers * neurons
    community = rng.integers(0, communities, total)
    order = np.argsort(community, kind="stable")
    starts = np.searchsorted(community[order], np.arange(communities))
    sizes = np.bincount(community, minlength=communities)
    src = rng.integers(0, total, edges)
    inside = rng.random(edges) < 0.9
    c = community[src]
    pick = starts[c] + (rng.random(edges) * sizes[c]).astype(np.int64)
    tgt = np.where(inside, order[pick], rng.integers(0, total, edges))
    keep = src != tgt
    src, tgt = src[keep], tgt[keep]
    key = np.unique(src * total + tgt)  # aggregated edges are unique pairs
    src, tgt = key // total, key % total
    n = len(src)
    count = rng.geometric(0.2, n).astype(np.int64) + 4  # all pass min_edge_count=5 except count 4... mostly
    mean = np.abs(rng.normal(0.1, 0.05, n)) + 1e-3
    table = pa.table(
        {
            "src_layer": (src // neurons).astype(np.int32), "src_neuron": (src % neurons).astype(np.int32),
            "tgt_layer": (tgt // neurons).astype(np.int32), "tgt_neuron": (tgt % neurons).astype(np.int32),
            "count": count, "weight_sum": mean * count, "weight_abs_sum": mean * count,
        }  # fmt: skip
    )
    units = pa.table(
        {"layer": np.repeat(np.arange(layers, dtype=np.int32), neurons), "neuron": np.tile(np.arange(neurons, dtype=np.int32), layers)}
    )
    return table, units


def bench_infomap(args: argparse.Namespace) -> None:
    from circuits_atlas.clustering import cluster_full_model, full_model_network, infomap_flags, run_infomap

    layers = max(1, args.infomap_nodes // args.infomap_layer_width)
    t0 = time.perf_counter()
    edges, units = infomap_network(
        layers=layers, neurons=args.infomap_layer_width, edges=args.infomap_edges, communities=args.infomap_communities, seed=args.seed
    )
    print(f"infomap input: {layers * args.infomap_layer_width:,} units, {edges.num_rows:,} edges (generated in {time.perf_counter() - t0:.1f} s)")
    # Bare Infomap: the links array is prepared outside the timing (what any caller must hand it).
    network = full_model_network(edges, units, min_edge_count=5)
    flags = infomap_flags(num_trials=args.infomap_trials, seed=args.seed, multi_level=True)
    t0 = time.perf_counter()
    bare = run_infomap(network.links, flags)
    bare_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = cluster_full_model(edges, units, num_trials=args.infomap_trials, seed=args.seed)
    full_s = time.perf_counter() - t0
    print(
        f"infomap: {len(network.layers):,} nodes, {len(network.links):,} links, trials={args.infomap_trials}: "
        f"bare add_links+run {bare_s:.2f} s (codelength {bare.codelength:.4f}); cluster_full_model {full_s:.2f} s "
        f"(codelength {result.codelength:.4f}, {result.num_top_modules} top modules, depth {result.max_depth}); "
        f"overhead {full_s / bare_s:.2f}x (target <= 1.5x)"
    )


# ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--neurons", type=int, default=25600, help="neurons per layer")
    p.add_argument("--edges", type=int, default=5_000_000, help="aggregated edges in the export (full scale 50M)")
    p.add_argument("--label-fraction", type=float, default=1.0, help="share of neurons with labels")
    p.add_argument("--requests", type=int, default=2000, help="requests per latency measurement")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--warmup", type=int, default=500, help="untimed requests before each measurement")
    p.add_argument("--reuse-atlas", action="store_true", help="keep an atlas already in --workdir (skip the build)")
    p.add_argument("--server-workers", type=int, default=32)
    p.add_argument("--memory-limit", default="6GB", help="DuckDB memory limit for the build")
    p.add_argument("--infomap-nodes", type=int, default=458_752)
    p.add_argument("--infomap-layer-width", type=int, default=14_336)
    p.add_argument("--infomap-edges", type=int, default=5_000_000)
    p.add_argument("--infomap-communities", type=int, default=4000)
    p.add_argument("--infomap-trials", type=int, default=1, help="Infomap trials (the atlas default is 20)")
    p.add_argument("--skip-build", action="store_true", help="skip build and latency (Infomap only)")
    p.add_argument("--skip-infomap", action="store_true")
    p.add_argument("--skip-latency", action="store_true", help="only the --processes throughput comparison (after any build)")
    p.add_argument("--workdir", help="keep inputs and the atlas here (default: a temp dir, removed)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                   help="server process counts compared at --process-clients clients (GetEdgesForUnit throughput)")
    p.add_argument("--process-clients", type=int, default=8)
    p.add_argument("--process-requests", type=int, default=4000, help="requests per configuration in the --processes comparison")
    p.add_argument("--process-rounds", type=int, default=5,
                   help="alternating rounds over the --processes configurations (each gets 1/rounds of the requests)")
    p.add_argument("--sql-requests", type=int, default=100,
                   help="queries timed (and compared) on the SQL-only path in process (it is slow)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite runs this; no figure means anything)")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.neurons, args.edges, args.requests, args.warmup = 4, 64, 4000, 40, 5
        args.concurrency, args.server_workers, args.sql_requests = [1, 4], 4, 20
        args.process_requests, args.process_rounds = 80, 2
        args.infomap_nodes, args.infomap_layer_width, args.infomap_edges, args.infomap_communities = 2000, 500, 8000, 20

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="atlas_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_build:
            from circuits_atlas.build import build_atlas
            from circuits_atlas.neighbours import index_path

            export = work / "export"
            labels = work / "labels.jsonl"
            atlas = work / "atlas.duckdb"
            reuse = args.reuse_atlas and atlas.exists()
            t0 = time.perf_counter()
            if not reuse and not (export / "edges.parquet").exists():
                write_export(export, layers=args.layers, neurons=args.neurons, edges=args.edges, seed=args.seed)
            if not reuse and not labels.exists():
                write_labels(labels, layers=args.layers, neurons=args.neurons, fraction=args.label_fraction, seed=args.seed)
            print(f"inputs: {args.layers} layers x {args.neurons:,} neurons, {args.edges:,} edges "
                  f"({'reusing the atlas in --workdir' if reuse else f'generated in {time.perf_counter() - t0:.1f} s'})")  # fmt: skip
            if not reuse:
                report = build_atlas(
                    export_dir=export, output_path=atlas, labels_path=labels, clustering=None, min_edge_count=3,
                    model="synthetic", memory_limit=args.memory_limit, progress=lambda s: None,
                )  # fmt: skip
                steps = ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items() if not k.startswith("total"))
                print(f"build: {report.timings['total']:.1f} s total ({steps}); {report.neurons:,} neurons, "
                      f"{report.edges:,} edges kept (count >= 3), file {atlas.stat().st_size / 2**30:.2f} GiB")  # fmt: skip
            index = index_path(atlas)
            print(f"neighbour index: {index.stat().st_size / 2**20:,.1f} MiB" if index.exists() else "neighbour index: none")
            if not args.skip_latency:
                names = {"edges": "GetEdgesForUnit", "search": "SearchUnits"}
                targets = {"edges": 1, "search": 5}
                service: dict[str, dict] = {}
                proc, address = start_server(atlas, args.server_workers)
                try:
                    for kind in ("edges", "search"):
                        for conc in args.concurrency:
                            r = measure(address, concurrency=conc, requests=args.requests, kind=kind,
                                        layers=args.layers, neurons=args.neurons, seed=args.seed, warmup=args.warmup)  # fmt: skip
                            name = names[kind]
                            if conc == 1:
                                service[kind] = r
                            print(f"{name:<16} clients={conc:<3} n={r['requests']:<6} p50 {r['p50_ms']:7.2f} ms  "
                                  f"p99 {r['p99_ms']:8.2f} ms  {r['qps']:7.1f} req/s  errors {r['errors']}  "
                                  f"(p50 target <= {targets[kind]} ms at 1 client){'  ' + r['first_error'] if r['errors'] else ''}")  # fmt: skip
                            assert r["errors"] == 0, f"{name}: {r['errors']} failed requests ({r['first_error']})"
                    print("atlas queries answered without errors")
                finally:
                    proc.terminate()
                    proc.wait(30)
                # The same 1-client query lists in this process: on the database object the server
                # wraps (neighbour index + preloaded search), and on the SQL-only path (the baseline).
                from circuits_atlas import CircuitDatabase
                from circuits_atlas.servicer import AtlasServicer

                t0 = time.perf_counter()
                with CircuitDatabase(atlas, preload=True) as fast:
                    print(f"in-process database opened with preload in {time.perf_counter() - t0:.1f} s "
                          f"(neighbour index {fast.neighbour_index_note})")  # fmt: skip
                    local = {kind: measure_in_process(fast, requests=args.requests, kind=kind, layers=args.layers,
                                                      neurons=args.neurons, seed=args.seed, warmup=args.warmup)
                             for kind in ("edges", "search")}  # fmt: skip
                    with CircuitDatabase(atlas, neighbour_index=False) as sql:
                        for kind in ("edges", "search"):
                            n_sql = min(args.requests, args.sql_requests)
                            base = measure_in_process(sql, requests=n_sql, kind=kind, layers=args.layers,
                                                      neurons=args.neurons, seed=args.seed, warmup=min(args.warmup, 20))  # fmt: skip
                            same, total = compare_paths(fast, sql, requests=n_sql, kind=kind, layers=args.layers,
                                                        neurons=args.neurons, seed=args.seed)  # fmt: skip
                            r, loc = service[kind], local[kind]
                            print(f"{names[kind]:<16} service p50 {r['p50_ms']:7.2f} ms p99 {r['p99_ms']:8.2f} ms | in-process "
                                  f"p50 {loc['p50_ms']:7.3f} ms p99 {loc['p99_ms']:8.3f} ms | ratio service/in-process "
                                  f"p50 {r['p50_ms'] / loc['p50_ms']:.2f}x (target <= 1.5x) | SQL path in-process p50 "
                                  f"{base['p50_ms']:8.2f} ms ({base['n']} queries; {base['p50_ms'] / loc['p50_ms']:.0f}x the "
                                  f"fast path); same results: {same}/{total}")  # fmt: skip
                    # Where the service's time goes: the servicer in this process (no gRPC), and a bare
                    # gRPC server that answers with fixed bytes of the median answer size (the transport
                    # and grpc-runtime floor any Python servicer pays), measured with the same SDK client.
                    answers = {_METHODS[kind]: typical_response(fast, kind, layers=args.layers, neurons=args.neurons, seed=args.seed)
                               for kind in ("edges", "search")}  # fmt: skip
                    answers["Stats"] = AtlasServicer(fast).Stats(None, _LocalContext()).SerializeToString()
                    # The service is measured again here, in alternating rounds with the floor server
                    # and the in-process parts, so that all see the same load from elsewhere on the machine.
                    floor_proc, floor_address = start_floor_server(answers)
                    again, again_address = start_server(atlas, args.server_workers)
                    try:
                        parts = {}
                        for kind in ("edges", "search"):
                            sizes = {"kind": kind, "layers": args.layers, "neurons": args.neurons, "seed": args.seed}

                            def over(address: str, n: int, warm: int, sizes: dict = sizes) -> dict:
                                return measure(address, concurrency=1, requests=n, warmup=warm, **sizes)

                            parts[kind] = alternate({
                                "service": functools.partial(over, again_address),
                                "floor": functools.partial(over, floor_address),
                                "in-process": lambda n, warm, sizes=sizes: measure_servicer(fast, requests=n, warmup=warm, **sizes),
                            }, rounds=args.process_rounds, requests=args.requests, warmup=args.warmup)  # fmt: skip
                    finally:
                        stop_floor_server(floor_proc)
                        again.terminate()
                        again.wait(30)
                    for kind in ("edges", "search"):
                        r, fl, sv = parts[kind]["service"], parts[kind]["floor"], parts[kind]["in-process"]
                        print(f"{names[kind]:<16} 1-client p50 parts: database {sv['database_ms']:.3f} ms | servicer (request "
                              f"message -> response message) {sv['servicer_ms']:.3f} ms | servicer + codec (both ends' "
                              f"serialize/parse, SDK decoding) {sv['codec_ms']:.3f} ms | service {r['p50_ms']:.3f} ms | "
                              f"gRPC floor (bare server, fixed {len(answers[_METHODS[kind]])}-byte answer, SDK client) "
                              f"{fl['p50_ms']:.3f} ms | service - servicer+codec (transport, gRPC runtime, interceptors) "
                              f"{r['p50_ms'] - sv['codec_ms']:.3f} ms; service - floor {r['p50_ms'] - fl['p50_ms']:.3f} ms; "
                              f"ratio service/database {r['p50_ms'] / sv['database_ms']:.2f}x (target <= 1.5x), floor/database "
                              f"{fl['p50_ms'] / sv['database_ms']:.2f}x; servicer answers = database "
                              f"answers: {sv['same_total']}/{sv['n_total']} (medians of {args.process_rounds} alternating rounds)")  # fmt: skip
                        assert sv["same_total"] == sv["n_total"], f"{names[kind]}: the servicer's answers differ from the database's"
            # Throughput at --process-clients clients with 1 vs N server processes, from two load
            # generators: the SDK client (AtlasClient: builds requests and parses answers into domain
            # objects, as users do) and the lean client (pre-serialized requests, answers not parsed;
            # see measure_lean). Both run in this process on the machine's cores together with the
            # server, so the client's CPU per request caps what extra server processes can add; it is
            # printed next to the server's. All servers run at once and are measured in alternating
            # rounds, so load from elsewhere on a shared machine falls on each configuration alike.
            loaders = {"SDK clients": measure, "lean clients": measure_lean}
            servers = {}
            try:
                for n_proc in args.processes:
                    servers[n_proc] = start_server(atlas, args.server_workers, n_proc)
                if shutil.which("h2load"):
                    answer = fixed_edges_call(servers[args.processes[0]][1], layers=args.layers, neurons=args.neurons, seed=args.seed)
                    loaders["h2load"] = functools.partial(measure_h2load, answer=answer)
                else:
                    print("h2load not found (Debian/Ubuntu: apt-get install nghttp2-client): the C load generator's figure is skipped")
                totals = {(name, n): {"answered": 0, "wall_s": 0.0, "client_cpu": 0.0, "server_cpu": 0.0, "n": 0, "p50": [], "mean": [],
                           "per_process": {}}
                          for name in loaders for n in args.processes}  # fmt: skip
                rounds = max(1, args.process_rounds)
                for _ in range(rounds):
                    for name, load in loaders.items():
                        for n_proc, (proc, address) in servers.items():
                            cpu0, server0 = client_cpu_seconds(), process_cpu_seconds(proc.pid)
                            r = load(address, concurrency=args.process_clients, requests=args.process_requests // rounds,
                                     kind="edges", layers=args.layers, neurons=args.neurons, seed=args.seed,
                                     warmup=args.warmup // rounds)  # fmt: skip
                            assert r["errors"] == 0, f"--processes {n_proc} ({name}): {r['errors']} failed requests ({r['first_error']})"
                            t = totals[(name, n_proc)]
                            t["client_cpu"] += client_cpu_seconds() - cpu0
                            server1 = process_cpu_seconds(proc.pid)
                            t["server_cpu"] += sum(server1.values()) - sum(server0.values())
                            for child, seconds in server1.items():  # how the kernel spread the connections
                                t["per_process"][child] = t["per_process"].get(child, 0.0) + seconds - server0.get(child, 0.0)
                            t["answered"] += r["answered"]
                            t["wall_s"] += r["wall_s"]
                            t["n"] += r["requests"] + args.warmup // rounds // args.process_clients * args.process_clients
                            t["p50"].append(r["p50_ms"])
                            t["mean"].append(r.get("mean_ms", float("nan")))
            finally:
                for proc, _address in servers.values():
                    proc.terminate()
                for proc, _address in servers.values():
                    proc.wait(60)
            first = args.processes[0]

            def spread(t: dict) -> str:
                """Each serving process's share of the server CPU (SO_REUSEPORT spreads connections, not calls)."""
                busy = sorted(t["per_process"].values(), reverse=True)
                if len(busy) < 2 or sum(busy) <= 0:
                    return ""
                return ", shares " + "/".join(f"{100 * v / sum(busy):.0f}%" for v in busy)

            for name in loaders:
                for n_proc in args.processes:
                    t, base = totals[(name, n_proc)], totals[(name, first)]
                    qps, base_qps = t["answered"] / t["wall_s"], base["answered"] / base["wall_s"]
                    latency = (f"p50 {float(np.median(t['p50'])):.2f} ms" if not np.isnan(t["p50"]).all()
                               else f"mean {float(np.median(t['mean'])):.2f} ms")  # fmt: skip
                    print(f"GetEdgesForUnit  clients={args.process_clients:<3} --processes {n_proc} ({name + '):':<14} "
                          f"{qps:7.1f} req/s {latency}  ratio to {first} process(es) "
                          f"{qps / base_qps:.2f}x (target >= 1.6x at 2); CPU per request: client "
                          f"{1000 * t['client_cpu'] / t['n']:.3f} ms, server {1000 * t['server_cpu'] / t['n']:.3f} ms "
                          f"(all its processes{spread(t)}); {rounds} alternating rounds")  # fmt: skip
            if len(args.processes) > 1:
                last = args.processes[-1]

                def rate(name: str, n: int) -> float:
                    return totals[(name, n)]["answered"] / totals[(name, n)]["wall_s"]

                print(f"process scaling {last} vs {first} at {args.process_clients} clients: "
                      + "; ".join(f"{name} {rate(name, last) / rate(name, first):.2f}x" for name in loaders)
                      + " (SDK clients: what users of AtlasClient on the same machine see; lean clients: a lighter Python "
                      "load generator" + ("; h2load: a C load generator, one fixed request, the closest to the server's own "
                                          "scaling on a machine whose cores the clients share)" if "h2load" in loaders else ")"))
        if not args.skip_infomap:
            bench_infomap(args)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

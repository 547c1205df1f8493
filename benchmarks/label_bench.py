#!/usr/bin/env python
"""Labeller benchmarks.

1. Labels per minute against the stand-in LLM server (fixed latency per request, default 50 ms)
   at concurrency 1, 8 and 32, through the real Anthropic SDK, with the fsynced answer cache.
   Baseline: concurrency 1 (ratios printed).
2. Output projections of every neuron of SmolLM2-135M (the prepared model cache; otherwise a
   random model with SmolLM2's dims: 30 layers, 576 hidden, 1536 ffn, 49152 vocab). Baseline: a
   per-neuron loop (one [V,H]x[H] product + two top-k per neuron) timed on one layer's first
   256 neurons and extrapolated.

Usage: OMP_NUM_THREADS=2 python benchmarks/label_bench.py [--latency 0.05] [--neurons 192]
       [--skip-llm] [--skip-projection] [--device cpu] [--smoke]

``--smoke`` (the test suite runs it): 16 neurons at concurrency 1 and 4, 5 ms latency, and the
projection benchmark on a random model of 2 layers (64 ffn, 512 vocab) instead of SmolLM2's dims.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def bench_llm(latency: float, neurons: int, concurrencies: list[int]) -> None:
    from circuits_core.config import config_from_mapping
    from circuits_labeler.build import build_labeler
    from circuits_labeler.evidence import write_evidence_parquet
    from circuits_labeler.testing import StandInLLMServer

    layers = 4
    per_layer = neurons // layers
    print(f"== labels/minute vs stand-in server (latency {latency * 1000:.0f} ms/request, "
          f"{layers * per_layer} neurons, output pass, fsync on) ==")
    results = {}
    with StandInLLMServer(latency=latency) as server, tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        units = [(l, n, 5) for l in range(layers) for n in range(per_layer)]
        edges = [(l, n, l + 1, n, 3, 0.1) for l in range(layers - 1) for n in range(per_layer)]
        ev = write_evidence_parquet(tmp / "ev", edges=edges, units=units)
        (tmp / "key").write_text("bench")
        for c in concurrencies:
            run_dir = tmp / f"c{c}"
            run_dir.mkdir()
            config = config_from_mapping({"labeling": {
                "base_url": server.base_url, "api_key_file": str(tmp / "key"), "evidence_path": str(ev),
                "projections_path": "", "min_effect": 0.0, "concurrency": c, "num_layers": layers,
            }}, base_dir=str(run_dir))
            labeler = build_labeler(config)
            server.reset()
            t0 = time.perf_counter()
            final = labeler.run(passes=["output"])
            elapsed = time.perf_counter() - t0
            labeler.cache.close()
            assert final.state == "done" and final.labelled == layers * per_layer, final
            rate = final.labelled / elapsed * 60
            results[c] = rate
            print(f"concurrency {c:>3}: {final.labelled} labels in {elapsed:6.2f} s = {rate:8.0f} labels/min "
                  f"({final.requests} requests)")
    base = results[concurrencies[0]]
    for c, rate in results.items():
        print(f"  speedup concurrency {c} vs {concurrencies[0]}: {rate / base:5.2f}x")


def bench_projection(device: str, *, smoke: bool = False) -> None:
    import torch

    from circuits_labeler.projection import compute_output_projections

    source = "random model with SmolLM2 dims"
    model = None
    tokenizer = None
    try:
        from circuits_attribution.models import SMOLLM2_NAME, is_prepared, load_model

        if smoke:
            source = "tiny random model (--smoke)"
        elif is_prepared():
            t0 = time.perf_counter()
            loaded = load_model(SMOLLM2_NAME, dtype="float32", device=device)
            model, tokenizer = loaded.model, loaded.tokenizer
            source = f"SmolLM2-135M-Instruct (prepared cache, loaded in {time.perf_counter() - t0:.1f} s)"
        else:
            print("SmolLM2 model cache absent: using a random model with SmolLM2 dims")
    except ImportError:
        print("circuits_attribution not installed: using a random model with SmolLM2 dims")
    if model is None:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        dims = (dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512) if smoke else
                dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152))  # fmt: skip
        cfg = LlamaConfig(**dims, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg).eval().to(device)
    n_layers = len(model.model.layers)
    n_neurons = model.model.layers[0].mlp.down_proj.weight.shape[1]
    vocab = model.get_output_embeddings().weight.shape[0]
    print(f"== output projections: {source}; {n_layers} layers x {n_neurons} neurons, vocab {vocab}, "
          f"device {device}, torch threads {torch.get_num_threads()} ==")

    # Baseline: one neuron at a time.
    with torch.no_grad():
        w_eff = model.get_output_embeddings().weight * model.model.norm.weight[None, :]
        w_down = model.model.layers[0].mlp.down_proj.weight
        sample = min(256, w_down.shape[1])
        t0 = time.perf_counter()
        for i in range(sample):
            o = w_eff @ w_down[:, i]
            torch.topk(o, 20)
            torch.topk(-o, 20)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        per_neuron = (time.perf_counter() - t0) / sample
    naive_total = per_neuron * n_layers * n_neurons
    print(f"baseline per-neuron loop: {per_neuron * 1e3:.2f} ms/neuron -> {naive_total:.1f} s for all "
          f"{n_layers * n_neurons} neurons (extrapolated from {sample})")
    for block in (256, 1536):
        t0 = time.perf_counter()
        proj = compute_output_projections(model, tokenizer=tokenizer, top_k=20, block_size=block, device=device)
        elapsed = time.perf_counter() - t0
        print(f"blocked (block {block:>4}, top 20, incl. decoding + records): {elapsed:6.1f} s for {len(proj)} neurons "
              f"= {len(proj) / elapsed:7.0f} neurons/s; {naive_total / elapsed:5.1f}x vs per-neuron loop")
        assert len(proj) == n_layers * n_neurons, f"{len(proj)} projections for {n_layers * n_neurons} neurons"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = proj.save(Path(tmp) / "proj.parquet")
        size = path.stat().st_size
        print(f"saved Parquet in {time.perf_counter() - t0:.1f} s, {size / 1e6:.1f} MB")
    if tokenizer is not None:
        p = proj.get(n_layers - 1, 0)
        print(f"example L{n_layers - 1}/N0 promotes {[t.token for t in p.promotes[:5]]} "
              f"suppresses {[t.token for t in p.suppresses[:5]]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--neurons", type=int, default=192)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--skip-llm", action="store_true")
    parser.add_argument("--skip-projection", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite runs this)")
    args = parser.parse_args()
    if args.smoke:
        args.latency, args.neurons, args.concurrency = 0.005, 16, "1,4"
    if not args.skip_llm:
        bench_llm(args.latency, args.neurons, [int(c) for c in args.concurrency.split(",")])
    if not args.skip_projection:
        bench_projection(args.device, smoke=args.smoke)


if __name__ == "__main__":
    main()

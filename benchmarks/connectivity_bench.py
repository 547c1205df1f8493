#!/usr/bin/env python
"""Weight-based connectivity benchmark: time of each part vs one dense matmul of the same size.

For SmolLM2-135M-Instruct (the prepared offline model; ``--smoke``: a tiny random Llama built from
a config) it runs ``compute_connectivity`` for the parts asked for into a temporary folder and
prints, per part, the wall time, the multiply-add work of its matmuls, the time one dense matmul
of that total size takes at the GEMM rate measured in the same process (``[B, D] @ [D, N]`` in
the same dtype and thread count), and the ratio (time / dense time: the cost of blocking, masking,
top-k and merging on top of the matmuls). Also prints the top promoted tokens of the three
last-layer neurons with the largest logit effect.

Work per part (L layers, F neurons per layer, D hidden, V vocabulary):
  output 2·L·F·D·V, input 4·L·F·D·V, weights 4·F²·D·Σ_{t<L} t, similarity 2·(L·F)²·D FLOPs.

Usage: OMP_NUM_THREADS=2 python benchmarks/connectivity_bench.py [--parts output input weights]
       [--device cpu] [--dtype float32] [--smoke]
"""

from __future__ import annotations

import argparse
import tempfile
import time


def tiny_model(dtype):
    import torch
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=512, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval(), None


def part_flops(part: str, L: int, F: int, D: int, V: int) -> float:
    if part == "output":
        return 2.0 * L * F * D * V
    if part == "input":
        return 4.0 * L * F * D * V
    if part == "weights":
        return 4.0 * F * F * D * (L * (L - 1) / 2)
    return 2.0 * (L * F) ** 2 * D


def gemm_rate(D: int, N: int, dtype, device, rows: int = 512, repeats: int = 3) -> float:
    """FLOP/s of a plain ``[rows, D] @ [D, N]`` matmul (best of ``repeats``)."""
    import torch

    a = torch.randn(rows, D, dtype=dtype, device=device)
    b = torch.randn(D, N, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        c = a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        del c
    return 2.0 * rows * D * N / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["output", "input", "weights"],
                        choices=["output", "input", "weights", "similarity"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model (seconds; what the test suite runs)")
    args = parser.parse_args()

    import torch

    from circuits_attribution.connectivity import compute_connectivity, model_shape
    from circuits_attribution.models import SMOLLM2_NAME, is_prepared, load_model, resolve_dtype
    from circuits_core.connectivity import ConnectivitySpec
    from circuits_core.connectivity_files import ConnectivityFolder

    dtype = resolve_dtype(args.dtype)
    device = torch.device(args.device)
    if args.smoke:
        model, tokenizer = tiny_model(dtype)
        name = "tiny-llama (smoke)"
    else:
        if not is_prepared():
            raise SystemExit("SmolLM2 is not prepared: run `python -m circuits_attribution.prepare_model` (or use --smoke)")
        loaded = load_model(SMOLLM2_NAME, dtype=args.dtype, device=args.device)
        model, tokenizer, name = loaded.model, loaded.tokenizer, SMOLLM2_NAME
    model.to(device)
    shape = model_shape(model, name=name)
    L, F, D, V = shape.num_layers, shape.d_mlp, shape.d_model, shape.vocab_size
    print(f"== connectivity of {name}: {L} layers x {F} neurons, hidden {D}, vocabulary {V}; "
          f"{args.device} {args.dtype}, {torch.get_num_threads()} threads ==")
    rate = gemm_rate(D, min(V, 16384), dtype, device)
    print(f"dense GEMM rate ([512, {D}] @ [{D}, {min(V, 16384)}]): {rate / 1e9:.1f} GFLOP/s")
    spec = ConnectivitySpec(parts=tuple(args.parts), dtype=args.dtype)
    total = dense_total = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        report = compute_connectivity(model, tokenizer, spec, f"{tmp}/conn", model_name=name, device=args.device)
        print(f"{'part':<11} {'seconds':>9} {'GFLOP':>9} {'dense s':>9} {'ratio':>7}")
        for part in spec.parts:
            seconds = report.seconds[part]
            flops = part_flops(part, L, F, D, V)
            dense = flops / rate
            total += seconds
            dense_total += dense
            print(f"{part:<11} {seconds:>9.2f} {flops / 1e9:>9.1f} {dense:>9.2f} {seconds / dense:>7.2f}")
        print(f"{'total':<11} {total:>9.2f} {'':>9} {dense_total:>9.2f} {total / dense_total:>7.2f}")
        if "output" in spec.parts:
            table = ConnectivityFolder.open(f"{tmp}/conn").output_projections()
            rows = [r for r in table.to_pylist() if r["layer"] == L - 1]
            rows.sort(key=lambda r: -r["logit_effect"])
            print(f"top promoted tokens of the 3 layer-{L - 1} neurons with the largest logit effect:")
            for r in rows[:3]:
                tokens = ", ".join(repr(t) for t in r["promote_tokens"][:8])
                print(f"  L{r['layer']}/N{r['neuron']} (max |o| {r['logit_effect']:.3f}): {tokens}")


if __name__ == "__main__":
    main()

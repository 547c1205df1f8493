"""A model larger than one device, traced with a device map (issue 23, part 2).

GPU case (for the throughput issue's ``benchmarks/gpu_proof.py`` to fold in): a Qwen3-32B-shaped
model (64 layers, d=5120, F=25600, 64/8 heads; random bf16 weights, nothing downloaded) is placed
by ``plan_device_map`` over the GPU and CPU memory with ``--gpu-memory`` (default: less than the
model needs, so the split is forced even on an 80-141 GB GPU), dispatched with accelerate, and one
``--tokens``-token prompt is traced with the same engine code as a one-device model; prints the
device map, seconds per graph and the GPU's peak memory.

``--tiny`` (CPU, seconds): a tiny float64 Qwen3 split over cpu and disk offload; checks that its
graph equals the one-device graph and prints seconds per graph for both.

    python benchmarks/device_map_proof.py --tiny
    python benchmarks/device_map_proof.py --gpu-memory 40GiB --tokens 256      # needs a GPU

Known limit: with CPU/disk offload, autograd keeps the weights a forward streamed to the GPU alive
until the trace's graph is freed (a linear layer saves its weight for the input gradient), so the
offloaded layers' weights are resident on the GPU during each pass; splits over several GPUs do
not have this cost.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time


def _seconds_per_graph(engine, prompt: str, repeats: int = 1):
    engine.trace(prompt)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        graph = engine.trace(prompt)
    return (time.perf_counter() - started) / repeats, graph


def tiny() -> int:
    import numpy as np

    from circuits_attribution import RelPAttributor, RelPConfig, load_model
    from circuits_attribution.placement import device_map_summary
    from circuits_attribution.testing import build_model, build_tokenizer

    folder = tempfile.mkdtemp(prefix="circuits-dm-")
    build_model("qwen3").save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu",
                  "lm_head": "disk"}
    config = RelPConfig(raw=True, model_name="tiny-qwen3", tau=0.0, edge_threshold=0.0)
    prompt = "the capital of france is paris"
    single = load_model(folder, dtype="float64")
    mapped = load_model(folder, dtype="float64", device_map=device_map)
    s_single, g_single = _seconds_per_graph(RelPAttributor(single.model, single.tokenizer, config), prompt, 3)
    s_mapped, g_mapped = _seconds_per_graph(RelPAttributor(mapped.model, mapped.tokenizer, config), prompt, 3)
    a, b = g_single.edge_table, g_mapped.edge_table
    same = len(a) == len(b) and np.allclose(a.weight, b.weight, rtol=1e-12, atol=1e-15)
    print(f"device map: {device_map_summary(device_map)}")
    print(f"one device: {s_single:.3f} s/graph; device map (cpu + disk offload): {s_mapped:.3f} s/graph "
          f"(ratio {s_mapped / s_single:.2f}); {len(a)} edges; graphs equal: {same}")
    return 0 if same else 1


def gpu(args) -> int:
    import torch
    from accelerate import dispatch_model, init_empty_weights
    from transformers import AutoModelForCausalLM, Qwen3Config

    from circuits_attribution import RelPAttributor, RelPConfig
    from circuits_attribution.placement import device_map_summary, parse_max_memory, plan_device_map
    from circuits_attribution.testing import build_tokenizer
    from circuits_core.memory import parse_size

    if not torch.cuda.is_available():
        print("not run: no device")
        return 0
    config = Qwen3Config(hidden_size=5120, intermediate_size=25600, num_hidden_layers=args.layers,
                         num_attention_heads=64, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                         max_position_embeddings=40960, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    total = sum(p.numel() * 2 for p in skeleton.parameters())
    gpu_memory = parse_size(args.gpu_memory) if args.gpu_memory else int(0.6 * total)
    limits = parse_max_memory({"0": gpu_memory, "cpu": args.cpu_memory})
    budget = parse_size(args.memory_budget)
    device_map = plan_device_map(skeleton, max_memory=limits, reserve=budget, dtype=torch.bfloat16)
    del skeleton
    print(f"model {total / 2**30:.1f} GiB bf16; map: {device_map_summary(device_map)}", flush=True)
    torch.manual_seed(0)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # random weights on CPU
    model.eval().requires_grad_(False)
    model = dispatch_model(model, device_map=device_map, offload_dir=tempfile.mkdtemp(prefix="circuits-off-"))
    print(f"built and dispatched in {time.perf_counter() - started:.0f} s", flush=True)
    tokenizer = build_tokenizer(vocab_size=config.vocab_size)
    engine = RelPAttributor(model, tokenizer, RelPConfig(raw=True, model_name="qwen3-32b-shaped", memory_budget=budget))
    prompt = " ".join(["the capital of france is paris"] * max(1, args.tokens // 6))
    torch.cuda.reset_peak_memory_stats()
    seconds, graph = _seconds_per_graph(engine, prompt)
    print(json.dumps({"case": "qwen3-32b-shaped gpu+cpu split", "seconds_per_graph": round(seconds, 2),
                      "tokens": len(graph.prompt_tokens), "edges": len(graph.edge_table),
                      "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      "device_map": device_map_summary(device_map)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", "--smoke", dest="tiny", action="store_true", help="CPU check on a tiny model (cpu + disk offload)")
    parser.add_argument("--gpu-memory", default="", help="GPU memory the map may use (default: 60%% of the model)")
    parser.add_argument("--cpu-memory", default="200GiB")
    parser.add_argument("--memory-budget", default="8GiB", help="working memory kept free on the GPU for the trace")
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args(argv)
    return tiny() if args.tiny else gpu(args)


if __name__ == "__main__":
    raise SystemExit(main())

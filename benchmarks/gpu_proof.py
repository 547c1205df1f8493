"""GPU proof at real model shapes (issue 19 item 6): RelP graphs of random-weight models with the exact
published configs of Llama-3.1-8B-Instruct and Qwen3-32B, bf16 on one GPU.

    python3 benchmarks/gpu_proof.py                 # one GPU (cuda); ~8 prompts x 2 models, < 8 min on an H200
    python3 benchmarks/gpu_proof.py --tiny          # the same code path on CPU with shrunk configs (test suite)
    python3 benchmarks/gpu_proof.py --cases llama   # a subset (llama, qwen3, smollm2, qwen3-split)
    python3 benchmarks/gpu_proof.py --cases qwen3-split --split-gpu-memory 40GiB   # device map over GPU + CPU

Needs only torch, transformers, numpy and tokenizers (present on a GPU box) plus this repository's
sources, which it puts on ``sys.path`` itself: no install, no network, no download. Configs come
from ``benchmarks/model_configs/*.json``. Models are built directly on the target device
(``torch.device`` context: parameters and buffers are allocated there and initialised there; the
host never holds the weights; the host RSS growth while building is printed as the check).

For each of Llama-3.1-8B-Instruct and Qwen3-32B shapes it traces 8 prompts of ~20 tokens (k = 5;
tau calibrated on the first prompt so graphs have ~300-500 nodes) and prints seconds per graph
traced singly and batched (B = 8), peak GPU memory, nodes/edges, and the batched-edge speed-up over
a per-target autograd loop on the same selection (with the largest difference between the two edge
sets as the check). Then SmolLM2-135M-Instruct (real weights when prepared, else random weights with
its published config): bf16 on the device against float64 on the CPU, node-score rank correlation
(Spearman) and edge cosine over the union of edges.

Cases are independent (``CASES``; :func:`run_case` takes a built engine). ``qwen3-split`` (not in
the default set: it builds the whole 64 GB bf16 model on the host first) is the device-map case of
``benchmarks/device_map_proof.py``: a Qwen3-32B-shaped model placed by ``plan_device_map`` over the GPU
(``--split-gpu-memory``, default 60% of the model, so the split is forced) and the CPU, traced with the
same engine code as a one-device model (seconds per graph, GPU peak memory, the map). With ``--tiny`` it
runs device_map_proof's CPU check instead (a tiny float64 Qwen3 over CPU + disk offload, graph equal to
the one-device graph).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIGS = HERE / "model_configs"
for _src in ("clients/python/core/src", "services/attribution/src"):
    _path = str(REPO / _src)
    if _path not in sys.path:
        sys.path.insert(0, _path)

WORDS = (
    "the river valley begins with small farming villages that grew wheat and barley along fertile banks trading "
    "pottery salt copper with nomadic herders who crossed mountains every spring over many centuries these joined "
    "into towns built walls temples wrote down laws about water land inheritance which scholars still study today"
).split()
#: name -> (config file, published name)
CASES = {
    "llama": ("llama-3.1-8b-instruct.json", "meta-llama/Llama-3.1-8B-Instruct"),
    "qwen3": ("qwen3-32b.json", "Qwen/Qwen3-32B"),
}
SMOLLM2 = ("smollm2-135m-instruct.json", "HuggingFaceTB/SmolLM2-135M-Instruct")
#: --tiny: the same architectures, shrunk (layers, widths, vocabulary); every other field as published.
TINY = {"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ProofSettings:
    device: str
    tiny: bool
    prompts: int = 8
    prompt_tokens: int = 20
    k: int = 5
    nodes_target: int = 400
    batch: int = 8
    edge_chunk_size: int = 64


def published_config(file: str, *, tiny: bool):
    """A transformers config from the published config dict (shrunk with --tiny)."""
    import transformers

    raw = {key: value for key, value in json.loads((CONFIGS / file).read_text()).items() if not key.startswith("_")}
    if tiny:
        raw.update(TINY)
        raw.update(bos_token_id=1, eos_token_id=2, pad_token_id=None)  # inside the shrunk vocabulary
        if "max_window_layers" in raw:
            raw["max_window_layers"] = TINY["num_hidden_layers"]
    raw.pop("torch_dtype", None)
    config_cls = getattr(transformers, raw["architectures"][0].replace("ForCausalLM", "Config"))
    config = config_cls(**raw)
    config._attn_implementation = "sdpa"
    return config


def build_on_device(config, *, device: str, dtype):
    """Allocate and initialise the model on ``device`` (never on the host); eval, no grads."""
    import torch
    import transformers

    model_cls = getattr(transformers, config.architectures[0])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dtype=dtype).eval()  # no-op for weights; float32 buffers stay as HF keeps them
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer (ids < vocab_size) for random-weight models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<bos>": 1}
    for word in WORDS:
        if len(vocab) < vocab_size:
            vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", unk_token="<unk>", pad_token="<unk>")


def proof_prompts(n: int, tokens: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(tokens - (i % 3))) for i in range(n)]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _host_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calibrate_tau(engine, request, target: int) -> float:
    """tau (a fraction of |metric|) that selects about ``target`` nodes on ``request`` (bisection)."""
    ids = engine.encode_prompt(request.prompt, raw=True)
    scores = engine.node_scores(ids, request)
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        count = len(engine.select_nodes(scores, dataclasses.replace(request, tau=mid)))
        if count > target:
            low = mid
        else:
            high = mid
    return high


def run_case(engine, settings: ProofSettings, *, label: str) -> dict:
    """Trace the proof prompts singly and batched, and the batched-vs-loop edge comparison."""
    import numpy as np
    import torch

    from circuits_core.tracing import TraceRequest

    cuda = settings.device.startswith("cuda")
    prompts = proof_prompts(settings.prompts, settings.prompt_tokens)
    base = TraceRequest(prompt=prompts[0], raw=True, k=settings.k, tau=0.01, max_nodes=10 * settings.nodes_target)
    tau = calibrate_tau(engine, base, settings.nodes_target)
    requests = [dataclasses.replace(base, prompt=p, tau=tau) for p in prompts]
    engine.trace(requests[0])  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _sync(settings.device)
    started = time.perf_counter()
    single = [engine.trace(r) for r in requests]
    _sync(settings.device)
    single_s = (time.perf_counter() - started) / len(requests)
    started = time.perf_counter()
    batched: list = []
    for lo in range(0, len(requests), settings.batch):
        batched.extend(engine.trace_many(requests[lo:lo + settings.batch]))
    _sync(settings.device)
    batched_s = (time.perf_counter() - started) / len(requests)
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    same_nodes = sum({(u.layer, u.index, u.position) for u in a.units} == {(u.layer, u.index, u.position) for u in b.units}
                     for a, b in zip(single, batched))  # fmt: skip

    # batched VJPs vs a per-target loop, same selection of the first prompt
    ids = engine.encode_prompt(requests[0].prompt, raw=True)
    scores = engine.node_scores(ids, requests[0])
    selection = engine.select_nodes(scores, requests[0])
    _sync(settings.device)
    t0 = time.perf_counter()
    fast = engine.compute_edges(scores, selection, batched=True)
    _sync(settings.device)
    t1 = time.perf_counter()
    loop = engine.compute_edges(scores, selection, batched=False)
    _sync(settings.device)
    t2 = time.perf_counter()

    def as_map(table) -> dict:
        keys = zip(table.src_layer.tolist(), table.src_index.tolist(), table.src_position.tolist(),
                   table.tgt_layer.tolist(), table.tgt_index.tolist(), table.tgt_position.tolist())  # fmt: skip
        return dict(zip(keys, table.raw.tolist()))

    fast_map, loop_map = as_map(fast), as_map(loop)
    keys = sorted(fast_map.keys() | loop_map.keys())
    a = np.array([fast_map.get(key, 0.0) for key in keys])
    b = np.array([loop_map.get(key, 0.0) for key in keys])
    scale = float(np.abs(b).max()) if len(b) else 1.0
    result = {
        "case": label,
        "tau": tau,
        "nodes_mean": float(np.mean([len(g.units) for g in single])),
        "edges_mean": float(np.mean([len(g.edges) for g in single])),
        "seconds_per_graph_single": single_s,
        "seconds_per_graph_batched": batched_s,
        "batch": settings.batch,
        "batched_over_single": single_s / batched_s,
        "batched_same_node_sets": f"{same_nodes}/{len(single)}",
        "peak_gpu_gb": peak_gb,
        "edge_targets": len(selection) + len(scores.metric.token_ids),
        "edges_batched_s": t1 - t0,
        "edges_loop_s": t2 - t1,
        "edge_speedup": (t2 - t1) / max(t1 - t0, 1e-9),
        "edge_max_diff_rel": float(np.abs(a - b).max() / (scale or 1.0)) if len(keys) else 0.0,
        "edge_cosine_batched_vs_loop": _cosine(a, b),
    }
    print(f"[{label}] tau={tau:.4g}: {result['nodes_mean']:.0f} nodes, {result['edges_mean']:.0f} edges per graph (mean of {len(single)})")
    print(f"[{label}] seconds per graph: single {single_s:.3f} s, batched B={settings.batch} {batched_s:.3f} s "
          f"({result['batched_over_single']:.2f}x); batched node sets identical to single: {result['batched_same_node_sets']}")
    print(f"[{label}] peak GPU memory: " + ("n/a (CPU)" if not cuda else f"{peak_gb:.1f} GiB"))
    print(f"[{label}] edges of {result['edge_targets']} targets: batched VJPs {t1 - t0:.3f} s, per-target loop {t2 - t1:.3f} s, "
          f"speed-up {result['edge_speedup']:.1f}x; check: largest difference {result['edge_max_diff_rel']:.2e} of the "
          f"largest edge, cosine {result['edge_cosine_batched_vs_loop']:.6f}")
    return result


def _cosine(a, b) -> float:
    import numpy as np

    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denominator) if denominator else 1.0


def _spearman(a, b) -> float:
    import numpy as np

    ranks_a = np.argsort(np.argsort(a)).astype(np.float64)
    ranks_b = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def smollm2_agreement(settings: ProofSettings) -> dict:
    """SmolLM2 bf16 on the device vs float64 on the CPU: node-score rank correlation, edge cosine."""
    import numpy as np
    import torch

    from circuits_attribution import RelPAttributor, RelPConfig
    from circuits_core.tracing import TraceRequest

    real = False
    if not settings.tiny:
        try:
            from circuits_attribution.models import SMOLLM2_NAME, is_prepared, load_model

            real = is_prepared()
        except Exception:  # noqa: BLE001 - the prepared model is optional here
            real = False
    if real:
        reference = load_model(SMOLLM2_NAME, dtype="float64", device="cpu")
        model64, tokenizer = reference.model, reference.tokenizer
        prompts, raw = ["The capital of France is", "Two plus two equals", "The opposite of hot is", "A dog says woof, a cat says"], False
    else:
        config = published_config(SMOLLM2[0], tiny=settings.tiny)
        config._attn_implementation = "eager"
        model64 = build_on_device(config, device="cpu", dtype=torch.float64)
        tokenizer = word_tokenizer(config.vocab_size)
        prompts, raw = proof_prompts(4, settings.prompt_tokens), True
    model16 = build_on_device(model64.config, device=settings.device, dtype=torch.bfloat16)
    model16.load_state_dict({name: tensor.to(torch.bfloat16) for name, tensor in model64.state_dict().items()}, strict=True)
    config = RelPConfig(model_name=SMOLLM2[1], raw=raw, k=settings.k, edge_chunk_size=settings.edge_chunk_size)
    reference_engine = RelPAttributor(model64, tokenizer, config)
    device_engine = RelPAttributor(model16, tokenizer, config)
    correlations, cosines = [], []
    for prompt in prompts:
        request = TraceRequest(prompt=prompt, raw=raw, k=settings.k, tau=0.005, max_nodes=500)
        ids = reference_engine.encode_prompt(prompt, raw=raw)
        s64 = reference_engine.node_scores(ids, request).scores.flatten().double().cpu().numpy()
        s16 = device_engine.node_scores(ids, request).scores.flatten().double().cpu().numpy()
        top = np.argsort(-np.abs(s64))[:2000]  # the neurons that matter (the rest is rounding noise)
        correlations.append(_spearman(s64[top], s16[top]))
        g64, g16 = reference_engine.trace(request), device_engine.trace(request)
        m64 = {(e.src_layer, e.src_index, e.src_position, e.tgt_layer, e.tgt_index, e.tgt_position): e.weight for e in g64.edges}
        m16 = {(e.src_layer, e.src_index, e.src_position, e.tgt_layer, e.tgt_index, e.tgt_position): e.weight for e in g16.edges}
        keys = sorted(m64.keys() | m16.keys())
        cosines.append(_cosine(np.array([m64.get(k, 0.0) for k in keys]), np.array([m16.get(k, 0.0) for k in keys])))
    result = {"case": "smollm2", "weights": "real" if real else "random (published config)",
              "node_rank_correlation": float(np.mean(correlations)), "edge_cosine": float(np.mean(cosines)),
              "prompts": len(prompts)}  # fmt: skip
    print(f"[smollm2] {result['weights']} weights, bf16 on {settings.device} vs float64 on cpu over {len(prompts)} prompts: "
          f"node score rank correlation {result['node_rank_correlation']:.4f} (top 2000 |score|), "
          f"edge cosine {result['edge_cosine']:.4f}")
    del model16, device_engine
    return result


def split_case(args) -> dict:
    """The device-map case (benchmarks/device_map_proof.py): GPU + CPU split, or its CPU check with --tiny."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import device_map_proof

    if args.tiny:
        code = device_map_proof.tiny()
        return {"case": "qwen3-split (tiny: cpu + disk offload)", "graphs_equal": code == 0}
    split_args = argparse.Namespace(gpu_memory=args.split_gpu_memory, cpu_memory="200GiB", memory_budget="8GiB",
                                    layers=64, tokens=args.split_tokens)
    code = device_map_proof.gpu(split_args)
    return {"case": "qwen3-split (gpu + cpu)", "exit_code": code}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", "--smoke", dest="tiny", action="store_true",
                        help="shrunk configs on CPU: the same code path, in seconds (--smoke: the benchmarks' common name)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--cases", default="llama,qwen3,smollm2",
                        help="comma-separated: llama, qwen3, smollm2, qwen3-split (device map over GPU + CPU)")
    parser.add_argument("--split-gpu-memory", default="", help="qwen3-split: GPU memory the map may use (default: 60%% of the model)")
    parser.add_argument("--split-tokens", type=int, default=128, help="qwen3-split: prompt tokens")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cpu" if args.tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device (use --tiny for the CPU code path)", file=sys.stderr)
        return 2
    if device == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in (*CASES, "smollm2", "qwen3-split")]
    if unknown:
        print(f"error: unknown case(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    settings = ProofSettings(device=device, tiny=args.tiny)
    if args.tiny:  # the same passes on fewer nodes, so the test suite runs it in seconds
        settings = dataclasses.replace(settings, prompt_tokens=12, nodes_target=120)
    import transformers

    from circuits_attribution import RelPAttributor, RelPConfig

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    print(f"gpu_proof on {gpu} ({'tiny configs' if args.tiny else 'published configs'}, bf16); torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    started = time.perf_counter()
    results = []
    for name in cases:
        if name == "smollm2":
            results.append(smollm2_agreement(settings))
            continue
        if name == "qwen3-split":
            results.append(split_case(args))
            continue
        file, published = CASES[name]
        config = published_config(file, tiny=args.tiny)
        rss_before = _host_rss_mb()
        t0 = time.perf_counter()
        model = build_on_device(config, device=device, dtype=torch.bfloat16)
        _sync(device)
        n_params = sum(p.numel() for p in model.parameters())
        build_s = time.perf_counter() - t0
        host_growth = _host_rss_mb() - rss_before
        print(f"[{name}] {published}{' (tiny)' if args.tiny else ''}: {config.num_hidden_layers} layers, d={config.hidden_size}, "
              f"F={config.intermediate_size}, {n_params / 1e9:.2f}B parameters built on {device} in {build_s:.1f} s; "
              f"host peak RSS grew {host_growth:.0f} MB (weights are {n_params * 2 / 2**20:.0f} MB)")
        tokenizer = word_tokenizer(config.vocab_size)
        engine = RelPAttributor(model, tokenizer, RelPConfig(model_name=published, raw=True, k=settings.k,
                                                             edge_chunk_size=settings.edge_chunk_size))  # fmt: skip
        result = run_case(engine, settings, label=name)
        result.update(parameters=n_params, build_s=build_s, host_rss_growth_mb=host_growth)
        results.append(result)
        del engine, model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    total = time.perf_counter() - started
    print(f"total {total:.1f} s (budget on one H200: 480 s)")
    failures = []
    for result in results:
        if result.get("graphs_equal") is False:
            failures.append(f"{result['case']}: the device-map graph differs from the one-device graph")
        if "edge_cosine_batched_vs_loop" in result and result["edge_cosine_batched_vs_loop"] < 0.99:
            failures.append(f"{result['case']}: batched and per-target edges disagree")
        if "host_rss_growth_mb" in result and device.startswith("cuda") and result["host_rss_growth_mb"] > 0.25 * result["parameters"] * 2 / 2**20:
            failures.append(f"{result['case']}: weights were materialised on the host")
    if args.json is not None:
        args.json.write_text(json.dumps({"device": gpu, "tiny": args.tiny, "total_s": total, "results": results}, indent=2))
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

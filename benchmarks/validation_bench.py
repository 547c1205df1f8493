"""Faithfulness-validation timings on SmolLM2-135M (CPU by default).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/validation_bench.py [--prompt ...] [--seeds 5] [--device cpu]

Traces the prompt (raw, nodes only), then times a full faithfulness report (sizes 10,20,50,100 +
all graph nodes, keep/remove, random seeds) with batched masks (batch 8) against the baseline of
the same masks one per forward (batch 1), and the linearized-mode report (one forward + one
backward per batch). Prints seconds, masks/s and ratios; needs the prepared model
(python -m circuits_attribution.prepare_model).
"""

from __future__ import annotations

import argparse
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--smoke", action="store_true", help="one random seed, a tiny random model (the test suite runs this)")
    args = parser.parse_args()
    if args.smoke:
        args.seeds = 1

    import torch

    from circuits_attribution import RelPAttributor, RelPConfig, load_model
    from circuits_attribution.faithfulness import FaithfulnessConfig, faithfulness_report
    from circuits_attribution.interventions import Intervener
    from circuits_attribution.models import SMOLLM2_NAME
    from circuits_core.interventions import parse_neuron_spec

    torch.set_num_threads(max(1, torch.get_num_threads()))
    steer = "10:100:all=set:5"
    if args.smoke:
        # A tiny random Llama over the prompt's words: the same code paths in seconds.
        from circuits_attribution.testing import build_model, build_tokenizer

        model = build_model("llama", dtype=torch.float32)
        tok = build_tokenizer(words=sorted(set(args.prompt.split())))
        steer = "2:10:all=set:5"
    else:
        loaded = load_model(SMOLLM2_NAME, dtype=args.dtype, device=args.device)
        model, tok = loaded.model, loaded.tokenizer
    graph = RelPAttributor(model, tok, RelPConfig(raw=True, model_name=SMOLLM2_NAME)).trace(args.prompt, compute_edges=False)
    n_masks = 2 + 5 * 2 * (1 + args.seeds)
    print(f"graph: {len(graph.neurons)} nodes, {len(graph.prompt_tokens)} tokens; {n_masks} masks per report")

    def timed(config: FaithfulnessConfig) -> tuple[float, object]:
        start = time.perf_counter()
        report = faithfulness_report(model, tok, graph, config)
        return time.perf_counter() - start, report

    timed(FaithfulnessConfig(sizes=(10,), random_seeds=1))  # warm-up
    batched_s, report = timed(FaithfulnessConfig(random_seeds=args.seeds, batch_size=8))
    single_s, report1 = timed(FaithfulnessConfig(random_seeds=args.seeds, batch_size=1))
    lin_s, _ = timed(FaithfulnessConfig(random_seeds=args.seeds, batch_size=8, mode="linearized"))
    same = all(abs(a.m_keep - b.m_keep) <= 1e-3 * max(1.0, abs(a.m_keep)) for a, b in zip(report.points, report1.points))
    print(f"real, batch 8 : {batched_s:7.2f} s  ({n_masks / batched_s:6.1f} masks/s)")
    print(f"real, batch 1 : {single_s:7.2f} s  ({n_masks / single_s:6.1f} masks/s)  [baseline]")
    print(f"linearized, 8 : {lin_s:7.2f} s  ({n_masks / lin_s:6.1f} masks/s)")
    print(f"speed-up batch 8 vs batch 1: {single_s / batched_s:.2f}x; linearized / real(8): {lin_s / batched_s:.2f}x; "
          f"same results: {same}")
    assert same, "batched and one-by-one faithfulness reports differ"

    intervener = Intervener(model, tok, model_name=SMOLLM2_NAME)
    ids = intervener.encode(args.prompt, raw=True)
    spec = [parse_neuron_spec(steer)]
    start = time.perf_counter()
    intervener.generate(ids, spec, 20)
    cached_s = time.perf_counter() - start
    start = time.perf_counter()
    seq = list(ids)
    from circuits_attribution.interventions import neuron_interventions

    with torch.no_grad(), neuron_interventions(model, spec, prompt_length=len(ids)):
        for _ in range(20):
            seq.append(int(model(input_ids=torch.tensor([seq], device=model.device), use_cache=False).logits[0, -1].argmax()))
    uncached_s = time.perf_counter() - start
    print(f"steered generation, 20 tokens: KV-cached {cached_s:.2f} s vs full recompute {uncached_s:.2f} s "
          f"[baseline] ({uncached_s / cached_s:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""RelP engine benchmark (SmolLM2-135M-Instruct by default; CPU float32 unless told otherwise).

Prints, for a ~10-token and a ~50-token prompt:
  * seconds per graph (full trace: nodes + selection + edges + Graph object);
  * node attribution cost as a ratio to one plain forward+backward of the same metric (target <= 3x);
  * batched-VJP edges vs a per-target autograd loop producing the same edges, at >= 200 selected
    nodes (tau lowered until reached) — speed-up (target >= 10x) and the largest difference.

    python benchmarks/relp_bench.py [--model NAME] [--device cpu|cuda] [--dtype float32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

PASSAGE = (
    "The history of the river valley begins with small farming villages that grew wheat and barley along "
    "the fertile banks, trading pottery, salt and copper with nomadic herders who crossed the mountains every "
    "spring. Over many centuries these villages joined into towns, built walls and temples, and wrote down "
    "laws about water, land and inheritance, which scholars still study today in great detail."
)


def _prompt_with_tokens(tokenizer, n_tokens: int) -> str:
    words = PASSAGE.split()
    for end in range(1, len(words) + 1):
        text = " ".join(words[:end])
        if len(tokenizer(text)["input_ids"]) >= n_tokens:
            return text
    return PASSAGE


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--edge-nodes", type=int, default=200, help="minimum selected nodes for the edge comparison")
    parser.add_argument("--chunk", type=int, default=16, help="targets per batched VJP")
    parser.add_argument("--smoke", action="store_true", help="one repeat, a tiny random model (the test suite runs this)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.edge_nodes = 1, 24  # and a tiny random model (below)

    import numpy as np
    import torch

    from circuits_attribution import RelPAttributor, RelPConfig, load_model

    torch.manual_seed(0)
    if args.smoke:
        # A tiny random Llama over the passage's words: the same code paths in seconds.
        from circuits_attribution.testing import build_model, build_tokenizer

        args.model = "tiny-llama (--smoke)"
        model = build_model("llama", dtype=torch.float32)
        tokenizer = build_tokenizer(words=sorted(set(PASSAGE.split())))
    else:
        loaded = load_model(args.model, dtype=args.dtype, device=args.device)
        model, tokenizer = loaded.model, loaded.tokenizer
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"model {args.model} ({model.config.num_hidden_layers} layers, F={model.config.intermediate_size}) "
          f"on {args.device} {args.dtype}, torch threads={torch.get_num_threads()}")

    base = RelPConfig(raw=True, model_name=args.model, edge_chunk_size=args.chunk)
    attributor = RelPAttributor(model, tokenizer, base)
    prompts = {n: _prompt_with_tokens(tokenizer, n) for n in (10, 50)}

    for n, prompt in prompts.items():
        ids = attributor.encode_prompt(prompt)
        T = len(ids)
        attributor.trace(prompt)  # warm-up
        sync()

        def full_trace():
            attributor.trace(prompt)
            sync()

        per_graph = _median_time(full_trace, args.repeats)
        graph = attributor.trace(prompt)
        timings = attributor.last_timings
        print(f"[T={T:3d}] seconds/graph {per_graph:.3f}  (nodes {timings.nodes_s:.3f}s, edges {timings.edges_s:.3f}s; "
              f"{len(graph.neurons)} nodes, {len(graph.edges)} edges, chunks of {timings.edge_chunk_size})")

        # ---- node attribution vs one plain forward+backward of the same metric
        embed_layer = model.get_input_embeddings()
        token_tensor = torch.tensor([ids], device=model.device)
        keep = torch.tensor([T - 1], device=model.device)

        def plain_forward_backward():
            embeds = embed_layer(token_tensor).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=keep).logits[0, -1]
            metric = logits.float().topk(base.k).values.sum()
            torch.autograd.grad(metric, [embeds])
            sync()

        def node_pass():
            attributor.node_scores(ids)
            sync()

        plain_forward_backward()
        node_pass()
        plain_s = _median_time(plain_forward_backward, max(3, args.repeats))
        node_s = _median_time(node_pass, max(3, args.repeats))
        print(f"[T={T:3d}] node attribution {node_s:.3f}s vs plain forward+backward {plain_s:.3f}s "
              f"-> ratio {node_s / plain_s:.2f}x (target <= 3x)")

    # ---- batched edges vs per-target loop at >= edge-nodes selected nodes (the 50-token prompt)
    prompt = prompts[50]
    ids = attributor.encode_prompt(prompt)
    tau = base.tau
    while True:
        cfg = dataclasses.replace(base, tau=tau, max_nodes=10**9)
        probe = RelPAttributor(model, tokenizer, cfg)
        node_scores = probe.node_scores(ids)
        selection = probe.select_nodes(node_scores)
        if len(selection) >= args.edge_nodes or tau < 1e-7:
            break
        tau /= 2
    start = time.perf_counter()
    batched = probe.compute_edges(node_scores, selection, chunk_size=args.chunk)
    sync()
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    loop = probe.compute_edges(node_scores, selection, batched=False)
    sync()
    loop_s = time.perf_counter() - start

    def keyed(table):
        keys = np.stack([table.src_layer, table.src_index, table.src_position,
                         table.tgt_layer, table.tgt_index, table.tgt_position], axis=1)
        order = np.lexsort(keys.T[::-1])
        return keys[order], table.raw[order], table.flow[order]

    kb, rb, fb = keyed(batched)
    kl, rl, fl = keyed(loop)
    same_keys = kb.shape == kl.shape and bool((kb == kl).all())
    worst = float(np.max(np.abs(rb - rl) / np.maximum(1.0, np.abs(rl)))) if same_keys and len(rl) else float("nan")
    n_targets = len(selection) + len(node_scores.metric.token_ids)
    print(f"[T={len(ids):3d}] edges at tau={tau:.2e}: {len(selection)} nodes, {n_targets} targets, {len(batched)} edges; "
          f"batched (K={args.chunk}) {batched_s:.2f}s vs per-target loop {loop_s:.2f}s -> speed-up {loop_s / batched_s:.1f}x "
          f"(target >= 10x); identical edge set: {same_keys}; max rel. diff of raw weights {worst:.1e}")
    assert same_keys and not worst > 1e-3, "batched and per-target edges differ"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

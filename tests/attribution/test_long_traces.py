"""One trace at any size (issue 23): the memory budget, the causal cone, device maps.

* A budgeted trace keeps its peak RSS within the budget (measured in a fresh process, the
  kernel's peak-RSS counter reset before the trace) while the same trace without a budget
  exceeds it, so the check can fail.
* Attention patterns kept in the model dtype or recomputed in blocks of query rows, and each
  chunk's backward limited to its causal cone, give the same graph as patterns stored whole
  (float64, exact up to rounding), and still equal the independent ablation oracle.
* A model loaded with a device map (layers split over cpu and disk offload, weights streamed
  in by accelerate's hooks) traces to the same graph as the one-device model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from circuits_core.errors import InvalidArgument, ResourceExhausted
from circuits_core.memory import ModelShape, estimate, fitted_growth, parse_size, plan_trace

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks" / "long_trace_bench.py"
PROMPT = "the capital of france is paris and the capital of italy is rome"


def _edges(table) -> dict[tuple, tuple[float, float]]:
    return {
        (int(a), int(b), int(c), int(d), int(e), int(f)): (float(r), float(w))
        for a, b, c, d, e, f, r, w in zip(
            table.src_layer, table.src_index, table.src_position,
            table.tgt_layer, table.tgt_index, table.tgt_position, table.raw, table.flow,
        )
    }


def _trace_parts(attributor, prompt: str = PROMPT):
    ids = attributor.encode_prompt(prompt)
    ns = attributor.node_scores(ids)
    selection = attributor.select_nodes(ns)
    scores = ns.scores.clone()
    return ns, selection, scores, _edges(attributor.compute_edges(ns, selection))


def _assert_same_edges(a: dict, b: dict, rel: float = 1e-10) -> None:
    assert a.keys() == b.keys()
    scale = max(abs(v[0]) for v in a.values())
    for key, (raw, flow) in a.items():
        assert abs(raw - b[key][0]) <= rel * scale, (key, raw, b[key][0])


# ------------------------------------------------------------------ the memory model
def _smollm2_shape(**kw) -> ModelShape:
    return ModelShape(layers=30, d_model=576, d_mlp=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152,
                      dtype_bytes=4, full_pattern_bytes=4, **kw)


def test_plan_prefers_stored_patterns_and_falls_back_under_a_budget() -> None:
    shape = _smollm2_shape()
    free = plan_trace(shape, 2048, budget=None)
    assert (free.node_patterns, free.edge_patterns, free.edge_chunk_size) == ("full", "full", 16)
    # the pattern term is L*H*T^2*4 bytes: 4.5 GiB at T=2048 for SmolLM2
    assert free.estimate.node_terms["attention patterns"] == 30 * 9 * 2048 * 2048 * 4
    tight = plan_trace(shape, 2048, budget=parse_size("2560MiB"))
    assert tight.node_patterns == "recompute" and tight.edge_patterns == "recompute"
    assert tight.estimate.peak <= parse_size("2560MiB") < free.estimate.peak
    roomy = plan_trace(shape, 128, budget=parse_size("2560MiB"))
    assert roomy.node_patterns == "full" and roomy.edge_chunk_size == 16
    with pytest.raises(ResourceExhausted, match="at least"):
        plan_trace(shape, 2048, budget=parse_size("1GiB"))
    with pytest.raises(InvalidArgument):
        parse_size("four gigs")


def test_pattern_term_grows_as_t_squared_and_recompute_as_t() -> None:
    shape = _smollm2_shape()
    ts = [128, 512, 1024, 2048]
    full = [estimate(shape, t).node_terms["attention patterns"] for t in ts]
    recomputed = [estimate(shape, t, node_patterns="recompute").node_terms["attention patterns"] for t in ts]
    assert fitted_growth(ts, full)[0] == pytest.approx(2.0)
    assert fitted_growth(ts, recomputed)[0] == pytest.approx(1.0)


# ------------------------------------------------------------------ the budget, measured
def _point(tokens: int, budget: str | None) -> dict:
    cmd = [sys.executable, str(BENCH), "--point", "--smoke", "--tokens", str(tokens)]
    if budget:
        cmd += ["--point-budget", budget]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux peak-RSS reset")
def test_small_budget_bounds_peak_rss() -> None:
    budget = "24MiB"
    limited = _point(512, budget)
    unlimited = _point(512, None)
    assert limited["peak_rss"] is not None, "the kernel did not let the peak-RSS counter be reset"
    # the same graph either way
    assert (limited["neurons"], limited["edges"]) == (unlimited["neurons"], unlimited["edges"])
    # without a budget the trace needs more than the budget (so the check below can fail) ...
    assert unlimited["working"] > parse_size(budget), unlimited
    # ... with it, the process's peak RSS grows by no more than the budget during the trace
    assert limited["working"] <= parse_size(budget), limited
    assert limited["node_patterns"] != "full" or limited["edge_chunk_size"] < 16


# ------------------------------------------------------------------ exactness of the memory-saving paths
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("storage", ["model", "recompute"])
def test_pattern_storage_gives_the_same_graph(make_attributor, arch, storage) -> None:
    base = make_attributor(arch, tau=0.0, top_k_per_layer=6, edge_threshold=0.0, edge_chunk_size=5)
    other = make_attributor(arch, tau=0.0, top_k_per_layer=6, edge_threshold=0.0, edge_chunk_size=5,
                            pattern_storage=storage)
    if storage == "recompute":
        other_plan = other.memory_plan(len(other.encode_prompt(PROMPT)))
        assert other_plan.node_patterns == "recompute"
    ns_a, sel_a, scores_a, edges_a = _trace_parts(base)
    ns_b, sel_b, scores_b, edges_b = _trace_parts(other)
    assert torch.allclose(scores_a, scores_b, rtol=1e-10, atol=1e-14)
    assert np.array_equal(np.asarray(sel_a.indices), np.asarray(sel_b.indices))
    assert len(edges_a) > 100
    _assert_same_edges(edges_a, edges_b)


def test_recomputed_pattern_blocks_equal_the_stored_pattern(make_model) -> None:
    """A^T @ grad from 3-row blocks of a recomputed pattern, over a cone that ends early."""
    from circuits_attribution.linearize import _RecomputedPattern, _StoredPattern

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 11, 8, dtype=torch.float64, generator=g)
    k = torch.randn(1, 2, 11, 8, dtype=torch.float64, generator=g)
    recomputed = _RecomputedPattern(query=q, key=k, mask=None, scaling=8**-0.5, window=None, eager=False, block=3)
    whole = recomputed.rows(0, 11)
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    assert torch.equal(whole[..., ~causal], torch.zeros_like(whole[..., ~causal]))
    assert torch.allclose(whole.sum(-1), torch.ones(1, 4, 11, dtype=torch.float64))
    grad = torch.randn(1, 4, 7, 8, dtype=torch.float64, generator=g)
    expected = _StoredPattern(whole).apply_transposed(grad, 7)
    assert torch.allclose(recomputed.apply_transposed(grad, 7), expected, rtol=1e-12, atol=1e-14)


def test_recomputed_patterns_with_a_mid_prompt_target_match_the_oracle(make_model, tokenizer, oracle_cls) -> None:
    """Recomputed patterns, chunks of 3 targets, a target before the prompt's end (the cone ends early)."""
    from circuits_attribution import RelPAttributor, RelPConfig

    model = make_model("llama")
    config = RelPConfig(raw=True, model_name="tiny-llama", tau=0.0, top_k_per_layer=4, edge_threshold=0.0,
                        target_position=6, pattern_storage="recompute", edge_chunk_size=3)
    attributor = RelPAttributor(model, tokenizer, config)
    ids = attributor.encode_prompt(PROMPT)
    assert len(ids) > 10
    ns = attributor.node_scores(ids)
    selection = attributor.select_nodes(ns)
    edges = _edges(attributor.compute_edges(ns, selection))
    oracle = oracle_cls(model, ids, ns.target_position)
    clean = oracle.run()
    L = attributor.n_layers
    nodes = list(zip(selection.layers.tolist(), selection.positions.tolist(), selection.indices.tolist()))
    checked = 0
    for tl, tp, ti in [(L, ns.target_position, t) for t in ns.metric.token_ids] + nodes:
        def value(run):
            return run.logits[ti].item() if tl == L else run.neurons[tl][tp, ti].item()

        base = value(clean)
        for sl, sp, si in nodes:
            if not (sl < tl and sp <= tp):
                continue
            expected = -(value(oracle.run(zero_neurons=[(sl, sp, si)], hold_layers=range(sl + 1, tl))) - base)
            got = edges.get((sl, si, sp, tl, ti, tp), (0.0, 0.0))[0]
            assert abs(got - expected) <= 1e-9 * max(1.0, abs(base)), ((sl, sp, si), (tl, tp, ti), got, expected)
            checked += abs(expected) > 1e-8
    assert checked > 10


# ------------------------------------------------------------------ device maps
def test_device_map_parsing_and_planning(make_model, tmp_path) -> None:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from circuits_attribution.placement import (
        device_map_summary, parse_device_map, parse_max_memory, plan_device_map,
    )

    assert parse_max_memory("cuda:0=1GiB, 1=2GiB,cpu=3GiB") == {0: 1 << 30, 1: 2 << 30, "cpu": 3 << 30}
    with pytest.raises(InvalidArgument, match="unknown device"):
        parse_max_memory("gpu0=1GiB")
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"model.layers.0": "cuda:0", "lm_head": "cpu"}))
    assert parse_device_map(str(path)) == {"model.layers.0": 0, "lm_head": "cpu"}
    for bad in ('{"model.layers.0": "tpu"}', "{}", "no-such-file.json", "{nope"):
        with pytest.raises(InvalidArgument):
            parse_device_map(bad)

    config = make_model("llama").config
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float64)
    layer_bytes = sum(p.numel() * 8 for p in skeleton.model.layers[0].parameters())
    total = sum(p.numel() * 8 for p in skeleton.parameters())
    # two GPUs that each hold ~1.5 layers after the trace's reserve, the rest on cpu
    limits = {0: int(2.5 * layer_bytes), 1: int(2.5 * layer_bytes), "cpu": 10 * total}
    mapping = plan_device_map(skeleton, max_memory=limits, reserve=layer_bytes, dtype=torch.float64)
    layers = {int(k.split(".")[2]): v for k, v in mapping.items() if k.startswith("model.layers.")}
    assert layers and set(mapping.values()) <= {0, 1, "cpu"}
    for device in (0, 1):  # the reserve is kept free on every GPU
        used = sum(sum(p.numel() * 8 for p in skeleton.get_submodule(k).parameters())
                   for k, v in mapping.items() if v == device)
        assert used <= limits[device] - layer_bytes
    assert "cpu" in mapping.values()
    order = [0, 1, "cpu"]  # modules fill the GPUs in order, then cpu
    ranks = [order.index(layers[i]) for i in sorted(layers) if layers[i] in order]
    assert ranks == sorted(ranks)
    assert "cpu" in device_map_summary(mapping)
    # what fits nowhere is offloaded to disk (weights streamed in per forward)
    spilled = plan_device_map(skeleton, max_memory={0: int(1.5 * layer_bytes)}, reserve=0, dtype=torch.float64)
    assert "disk" in spilled.values() and 0 in spilled.values()


def test_device_map_trace_equals_single_device_trace(offloaded_llama) -> None:
    """Layers split over cpu and disk offload (accelerate hooks, weights on meta between uses)."""
    from circuits_attribution import RelPAttributor, RelPConfig

    single, mapped = offloaded_llama({
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
        "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "disk", "lm_head": "disk",
    })  # fmt: skip
    config = RelPConfig(raw=True, model_name="tiny-llama", tau=0.0, top_k_per_layer=6, edge_threshold=0.0)
    _, sel_a, scores_a, edges_a = _trace_parts(RelPAttributor(single.model, single.tokenizer, config))
    _, sel_b, scores_b, edges_b = _trace_parts(RelPAttributor(mapped.model, mapped.tokenizer, config))
    assert torch.allclose(scores_a, scores_b, rtol=1e-12, atol=1e-15)
    assert np.array_equal(np.asarray(sel_a.indices), np.asarray(sel_b.indices))
    assert len(edges_a) > 100
    _assert_same_edges(edges_a, edges_b, rel=1e-12)


def test_long_trace_bench_smoke(tmp_path) -> None:
    """benchmarks/long_trace_bench.py --smoke: the T sweep with and without a budget, table, fit and plot."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "long_trace_smoke.json").read_text())["rows"]
    assert sorted((r["tokens"], r["budget"] or "") for r in rows) == [(64, ""), (64, "16MiB"), (192, ""), (192, "16MiB")]
    for r in rows:
        if r["budget"] and r["working"] is not None:
            assert r["working"] <= parse_size(r["budget"])
    assert "grows as T^" in done.stdout and "| T | budget |" in done.stdout
    png = tmp_path / "long_trace_smoke.png"
    if png.exists():  # matplotlib is optional
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

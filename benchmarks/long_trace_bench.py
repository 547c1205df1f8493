"""One trace at growing prompt length: peak RSS and seconds with and without a memory budget.

Each point (prompt length T, budget or none) runs in its own subprocess, so every peak is that
trace's alone: the child loads the model, traces a short warm-up prompt (weights paged in), resets
the kernel's peak-RSS counter (``/proc/self/clear_refs``), traces a T-token prompt (raw text, the
default trace settings) and reports its peak RSS (VmHWM), the RSS before the trace, the seconds of
the node and edge passes and the memory plan the engine chose, with the memory model's estimate.

Prints a table, fits ``y = c·T^k`` to the working memory (peak - baseline) and the seconds of each
series, and writes ``long_trace.json``, ``long_trace.md`` and a plot ``long_trace.png`` (peak RSS
and seconds against T, log-log, both series) to ``--out`` (default benchmarks/out/).

    python benchmarks/long_trace_bench.py                       # SmolLM2, T = 128 512 1024 2048
    python benchmarks/long_trace_bench.py --tokens 128 512 --budget 1GiB
    python benchmarks/long_trace_bench.py --smoke               # tiny random model, seconds

Goal (issue 23): a 2,048-token SmolLM2 trace within 4 GB peak RSS on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PASSAGE = (
    "The history of the river valley begins with small farming villages that grew wheat and barley along "
    "the fertile banks, trading pottery, salt and copper with nomadic herders who crossed the mountains every "
    "spring. Over many centuries these villages joined into towns, built walls and temples, and wrote down "
    "laws about water, land and inheritance, which scholars still study today in great detail. Travellers "
    "described markets full of spices, cloth and horses, and a great library where copies of old songs were "
    "kept. When the river changed its course the towns moved with it, and the old walls were buried by sand."
)
GOAL_BYTES = 4 * 10**9


# ------------------------------------------------------------------------------ one point (child)
def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def prompt_of_length(tokenizer, n_tokens: int, *, words: list[str] | None = None) -> str:
    """A raw prompt of ``n_tokens`` tokens (BOS included) or the nearest length above it."""
    words = words or PASSAGE.split()
    pool = (words * (n_tokens // max(1, len(words)) * 2 + 4))
    lo, hi = 1, len(pool)
    while lo < hi:  # the fewest words whose tokenization reaches n_tokens
        mid = (lo + hi) // 2
        if len(tokenizer(" ".join(pool[:mid]))["input_ids"]) >= n_tokens:
            hi = mid
        else:
            lo = mid + 1
    return " ".join(pool[:lo])


def _engine(args):
    import torch

    from circuits_attribution import RelPAttributor, RelPConfig

    config = RelPConfig(raw=True, model_name=args.model, memory_budget=args.point_budget or None,
                        pattern_storage=args.patterns)
    if args.smoke:
        from circuits_attribution.testing import build_model, build_tokenizer

        # many narrow heads: the patterns (L·H·T²) dominate as they do for long prompts on real models
        model = build_model("llama", dtype=torch.float32, max_positions=4096, attn="sdpa", hidden_size=128,
                            num_attention_heads=16, num_key_value_heads=4, head_dim=8, intermediate_size=256)
        return RelPAttributor(model, build_tokenizer(), config), None
    from circuits_attribution import load_model

    loaded = load_model(args.model, dtype=args.dtype, device="cpu")
    return RelPAttributor(loaded.model, loaded.tokenizer, config), None


def run_point(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    engine, _ = _engine(args)
    tok = engine.tokenizer
    words = None
    if args.smoke:
        from circuits_attribution.testing import WORDS

        words = [w for w in WORDS if len(w) > 1]
    engine.trace(prompt_of_length(tok, 16, words=words))  # warm-up: weights paged in, kernels loaded
    requested = args.tokens[0]
    prompt = prompt_of_length(tok, requested, words=words)
    T = len(tok(prompt)["input_ids"])
    baseline = _status("VmRSS")
    resettable = _reset_peak()
    started = time.perf_counter()
    graph = engine.trace(prompt)
    seconds = time.perf_counter() - started
    peak = _status("VmHWM") if resettable else None
    timings = engine.last_timings
    plan = timings.plan
    return {
        "tokens": T, "requested_tokens": requested, "budget": args.point_budget or None,
        "peak_rss": peak, "baseline_rss": baseline, "working": None if peak is None else peak - baseline,
        "seconds": seconds, "nodes_s": timings.nodes_s, "edges_s": timings.edges_s,
        "neurons": len(graph.neurons), "edges": len(graph.edges), "edge_chunks": timings.edge_chunks,
        "edge_chunk_size": timings.edge_chunk_size, "node_patterns": plan.node_patterns if plan else None,
        "edge_patterns": plan.edge_patterns if plan else None, "pattern_block": plan.pattern_block if plan else None,
        "estimated_working": plan.estimate.peak if plan else None, "threads": args.threads,
        "nodes_exceeded": bool(graph.metadata.nodes_exceeded),
    }


# ------------------------------------------------------------------------------ the sweep (parent)
def _child(args, tokens: int, budget: str | None) -> dict:
    cmd = [sys.executable, __file__, "--point", "--tokens", str(tokens), "--model", args.model, "--dtype", args.dtype,
           "--threads", str(args.threads), "--patterns", args.patterns]
    if budget:
        cmd += ["--point-budget", budget]
    if args.smoke:
        cmd.append("--smoke")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"point T={tokens} budget={budget} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f}"


def _table(rows: list[dict]) -> str:
    head = ("| T | budget | peak RSS MiB | baseline MiB | working MiB | model estimate MiB | seconds | nodes s | edges s "
            "| neurons | edges | patterns node/edge | chunk |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['budget'] or 'none'} | {_mib(r['peak_rss'])} | {_mib(r['baseline_rss'])} | "
            f"{_mib(r['working'])} | {_mib(r['estimated_working'])} | {r['seconds']:.1f} | {r['nodes_s']:.1f} | "
            f"{r['edges_s']:.1f} | {r['neurons']} | {r['edges']} | {r['node_patterns']}/{r['edge_patterns']}"
            f"{'/' + str(r['pattern_block']) if r['pattern_block'] else ''} | {r['edge_chunk_size']} |"
        )
    return "\n".join(lines)


def _fits(rows: list[dict]) -> list[str]:
    from circuits_core.memory import fitted_growth

    out = []
    for label in sorted({r["budget"] or "none" for r in rows}):
        series = [r for r in rows if (r["budget"] or "none") == label]
        if len(series) < 2:
            continue
        T = [r["tokens"] for r in series]
        for name, key in (("working memory", "working"), ("peak RSS", "peak_rss"), ("seconds", "seconds")):
            ys = [r[key] for r in series]
            if any(y is None or y <= 0 for y in ys):
                continue
            k, _ = fitted_growth(T, ys)
            out.append(f"budget {label}: {name} grows as T^{k:.2f} over T={min(T)}..{max(T)}")
    return out


def _plot(rows: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return None
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, marker in (("none", "o"), *((b, "s") for b in sorted({r["budget"] for r in rows if r["budget"]}))):
        series = sorted((r for r in rows if (r["budget"] or "none") == label), key=lambda r: r["tokens"])
        if not series:
            continue
        T = [r["tokens"] for r in series]
        name = "no budget" if label == "none" else f"budget {label}"
        ax_mem.plot(T, [r["peak_rss"] / 2**30 for r in series], marker=marker, label=f"{name}: peak RSS")
        ax_mem.plot(T, [r["estimated_working"] / 2**30 + r["baseline_rss"] / 2**30 for r in series],
                    linestyle=":", marker=marker, alpha=0.6, label=f"{name}: baseline + model estimate")
        ax_time.plot(T, [r["seconds"] for r in series], marker=marker, label=name)
    ax_mem.axhline(GOAL_BYTES / 2**30, color="grey", linestyle="--", linewidth=1, label="4 GB goal")
    for ax, ylabel in ((ax_mem, "GiB"), (ax_time, "seconds per trace")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens T")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax_mem.set_title("peak RSS of one trace")
    ax_time.set_title("seconds of one trace (noisy: shared CPU)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="prompt lengths (default 128 512 1024 2048)")
    parser.add_argument("--budget", default="2560MiB", help="memory budget of the budgeted series (default %(default)s)")
    parser.add_argument("--patterns", default="auto", help="pattern storage (auto | full | model | recompute)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per point (default 1: the machine is shared)")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds one point may take")
    parser.add_argument("--series", choices=("both", "none", "budget"), default="both")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    parser.add_argument("--smoke", action="store_true", help="tiny random model, short prompts, a small budget")
    parser.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--point-budget", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.point:
        print(json.dumps(run_point(args)))
        return 0
    if args.smoke:
        tokens = args.tokens or [64, 192]
        budget = "16MiB" if args.budget == parser.get_default("budget") else args.budget
        name = "long_trace_smoke"
    else:
        tokens = args.tokens or [128, 512, 1024, 2048]
        budget = args.budget
        name = "long_trace"
    series = {"both": [None, budget], "none": [None], "budget": [budget]}[args.series]
    out = Path(args.out)
    previous = out / f"{name}.json"
    rows: list[dict] = []
    for T in tokens:
        for b in series:
            row = _child(args, T, b)
            rows.append(row)
            print(f"T={row['tokens']:5d} budget={b or 'none':>8}: peak RSS {_mib(row['peak_rss'])} MiB "
                  f"(working {_mib(row['working'])}, estimate {_mib(row['estimated_working'])}), "
                  f"{row['seconds']:.1f} s, {row['neurons']} neurons, {row['edges']} edges, "
                  f"patterns {row['node_patterns']}/{row['edge_patterns']}, chunk {row['edge_chunk_size']}", flush=True)
    table = _table(rows)
    fits = _fits(rows)
    print()
    print(table)
    for line in fits:
        print(line)
    budgeted = [r for r in rows if r["budget"] and r["peak_rss"] is not None]
    for r in budgeted:
        budget_bytes = _parse(r["budget"])
        verdict = "within" if r["working"] <= budget_bytes else "OVER"
        print(f"T={r['tokens']}: working memory {_mib(r['working'])} MiB {verdict} the budget of {_mib(budget_bytes)} MiB")
    longest = max((r for r in rows if r["budget"]), key=lambda r: r["tokens"], default=None)
    if longest and not args.smoke and longest["peak_rss"] is not None:
        verdict = "meets" if longest["peak_rss"] <= GOAL_BYTES else "misses"
        print(f"goal: a {longest['tokens']}-token trace with budget {longest['budget']} peaks at "
              f"{longest['peak_rss'] / 1e9:.2f} GB RSS: {verdict} the 4 GB goal")
    out.mkdir(parents=True, exist_ok=True)
    merged = rows
    if previous.exists() and args.tokens:  # a partial sweep adds its points to the earlier ones
        old = json.loads(previous.read_text())["rows"]
        keep = {(r["requested_tokens"], r["budget"]) for r in rows}
        merged = sorted([r for r in old if (r["requested_tokens"], r["budget"]) not in keep] + rows,
                        key=lambda r: (r["requested_tokens"], r["budget"] or ""))
    previous.write_text(json.dumps({"model": "tiny" if args.smoke else args.model, "rows": merged}, indent=1))
    (out / f"{name}.md").write_text(_table(merged) + "\n\n" + "\n".join(_fits(merged)) + "\n")
    plot = _plot(merged, out / f"{name}.png", f"{'tiny random model' if args.smoke else args.model}, CPU, "
                 f"{args.threads} thread(s)")
    print(f"wrote {previous}, {out / f'{name}.md'}" + (f", {plot}" if plot else ""))
    return 0


def _parse(text: str) -> int:
    from circuits_core.memory import parse_size

    return parse_size(text)


if __name__ == "__main__":
    raise SystemExit(main())

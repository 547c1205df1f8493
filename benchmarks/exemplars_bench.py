#!/usr/bin/env python
"""Exemplar pass throughput: tokens/s of ``circuits exemplars`` and its cost over a plain forward.

Baselines, timed in the same process over the same token batches (the packed corpus):

* plain: ``model(input_ids)`` (the full causal LM, logits included) - what running the model
  over the corpus costs anyway;
* decoder: ``model.model(input_ids)`` (no LM head) - the forward the exemplar pass runs.

The exemplar pass (``run_exemplars``: decoder forward + per-layer hooks keeping the running top-k,
the random sample and the statistics of every neuron) is timed per batch. Printed: tokens/s of
each, the ratio exemplars / plain (goal <= 1.3) and exemplars / decoder, over all batches and over
the second half (the steady state: after the first batches most neurons' top-k stop changing and
their columns are skipped). Repeats alternate baseline and exemplar runs; the best of each is kept.

Usage: OMP_NUM_THREADS=2 python benchmarks/exemplars_bench.py [--batches 16] [--batch-size 4]
       [--seq-len 256] [--layers ""] [--repeats 2] [--smoke]
``--smoke``: a tiny random Llama and a generated corpus (seconds; run by the test suite).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path


def load(smoke: bool, tmp: Path):
    import torch

    if smoke:
        from circuits_attribution.testing import WORDS, build_model, build_tokenizer

        rng = random.Random(0)
        corpus = tmp / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(200))}) + "\n"
                                  for _ in range(60)))
        return build_model("llama", dtype=torch.float32), build_tokenizer(), str(corpus), "tiny random Llama"
    from circuits_attribution.models import load_model

    loaded = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    return loaded.model, loaded.tokenizer, "builtin:python-docs", "SmolLM2-135M-Instruct (CPU, float32)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layers", default="", help="layers to record (default: all)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.batch_size, args.seq_len, args.repeats = 6, 2, 32, 1

    import torch

    from circuits_attribution.exemplars import iter_batches, iter_documents, iter_sequences, run_exemplars, separator_id
    from circuits_core.exemplars import ExemplarRunSettings, parse_layers

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model, tokenizer, corpus, what = load(args.smoke, tmp)
        batches = []
        for batch in iter_batches(iter_sequences(iter_documents(corpus), tokenizer, args.seq_len), args.batch_size,
                                  pad_id=separator_id(tokenizer)):
            if len(batches) == args.batches:
                break
            batches.append(torch.as_tensor(batch.ids))
        tokens = sum(int(b.numel()) for b in batches)
        print(f"== exemplar pass: {what}, {len(batches)} batches of {args.batch_size}x{args.seq_len} = {tokens} tokens, "
              f"torch threads {torch.get_num_threads()} ==")

        def forward(fn) -> list[float]:
            times = []
            with torch.inference_mode():
                for ids in batches:
                    t0 = time.perf_counter()
                    fn(input_ids=ids, use_cache=False)
                    times.append(time.perf_counter() - t0)
            return times

        def exemplars(rep: int) -> tuple[list[float], float]:
            marks = [time.perf_counter()]
            run = ExemplarRunSettings(
                corpus=corpus, output=tmp / f"ex{rep}.duckdb", model=what, layers=parse_layers(args.layers),
                seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=tokens, progress=False,
                checkpoint_seconds=1e9,
            )  # fmt: skip
            t0 = time.perf_counter()
            report = run_exemplars(run, model=model, tokenizer=tokenizer, on_batch=lambda _i, _n: marks.append(time.perf_counter()))
            total = time.perf_counter() - t0
            assert report.tokens == tokens and report.batches == len(batches), report
            return [b - a for a, b in zip(marks, marks[1:])], total - report.seconds

        forward(model)  # warm-up
        plain, decoder, ex, write = None, None, None, None
        for rep in range(args.repeats):
            p, d = forward(model), forward(model.model)
            e, w = exemplars(rep)
            plain = p if plain is None or sum(p) < sum(plain) else plain
            decoder = d if decoder is None or sum(d) < sum(decoder) else decoder
            if ex is None or sum(e) < sum(ex):
                ex, write = e, w
        half = len(batches) // 2
        tok_half = sum(int(b.numel()) for b in batches[half:])
        for name, times in (("plain forward (LM)", plain), ("decoder forward", decoder), ("exemplar pass", ex)):
            print(f"{name:<20} {sum(times):8.2f} s  {tokens / sum(times):9.0f} tokens/s   "
                  f"steady state {tok_half / sum(times[half:]):9.0f} tokens/s")
        print(f"exemplar pass / plain forward:   {sum(ex) / sum(plain):.3f}x all batches, "
              f"{sum(ex[half:]) / sum(plain[half:]):.3f}x second half (goal <= 1.3)")
        print(f"exemplar pass / decoder forward: {sum(ex) / sum(decoder):.3f}x all batches, "
              f"{sum(ex[half:]) / sum(decoder[half:]):.3f}x second half")
        print(f"writing the exemplar file: {write:.2f} s (once per run and per checkpoint)")


if __name__ == "__main__":
    main()

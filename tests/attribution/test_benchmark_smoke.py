"""The engine's benchmarks run at their smoke size and their cross-checks hold (issue 19 items 1, 2, 6):
``batch_bench.py --smoke`` (graphs/s at B = 1, 4, 8; batched graphs identical to single traces in
float64, through the engine and the server's batch queue) and ``gpu_proof.py --tiny`` (the GPU
proof's code path on CPU with shrunk published configs: batched vs per-target edges agree, bf16
vs float64 agreement printed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=900, env=env)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_batch_bench_smoke() -> None:
    out = _run("batch_bench.py", "--smoke")
    for b in (1, 4, 8):
        assert re.search(rf"engine  B={b}: [0-9.]+ graphs/s", out), out
        assert re.search(rf"service max_batch={b}: [0-9.]+ graphs/s .*differing from the engine's B={b}: 0\)", out), out
    assert "check B=8 vs B=1: 8/8 graphs with identical id, units and edges" in out, out


def test_gpu_proof_tiny() -> None:
    out = _run("gpu_proof.py", "--tiny")
    for case in ("llama", "qwen3"):
        assert re.search(rf"\[{case}\] seconds per graph: single [0-9.]+ s, batched B=8", out), out
        match = re.search(rf"\[{case}\] edges of \d+ targets: .*speed-up [0-9.]+x; check: .* cosine ([0-9.]+)", out)
        assert match and float(match.group(1)) > 0.99, out
    match = re.search(r"\[smollm2\] .*rank correlation ([0-9.]+) .*edge cosine ([0-9.]+)", out)
    assert match and float(match.group(1)) > 0.9 and float(match.group(2)) > 0.9, out

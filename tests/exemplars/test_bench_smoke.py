"""The exemplar benchmark runs at its --smoke size and prints its figures and ratios."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_exemplars_bench_smoke():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "exemplars_bench.py"), "--smoke"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tokens/s" in done.stdout and "exemplar pass / plain forward" in done.stdout

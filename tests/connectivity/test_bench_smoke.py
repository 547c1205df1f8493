"""The connectivity benchmark's --smoke size runs (a tiny random model) and prints its ratios."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_connectivity_bench_smoke():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "connectivity_bench.py"), "--smoke", "--parts", "output", "input",
         "weights", "similarity"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("weights ") for line in lines) and any(line.startswith("total ") for line in lines)
    assert "top promoted tokens" in proc.stdout

"""The benchmark scripts run at their --smoke size (their figures are printed, never asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("script", "expect"),
    [("proto_bench.py", "edge columns"), ("aggregate_bench.py", "all paths agree")],
)
def test_benchmark_smoke(script: str, expect: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke"], capture_output=True,
                            text=True, timeout=600, cwd=REPO, env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert expect in result.stdout

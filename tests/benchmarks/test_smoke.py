"""Every script in benchmarks/ runs at its --smoke size in the normal test run, so none can rot.

Each run must exit 0 (the scripts assert their own cross-checks: paths agree, round trips are
exact, batched equals one-by-one) and print the line named here, which a script prints only after
its checks held. Figures are printed, never asserted (no timed assertions in tests).

Adding a benchmark = one line in SMOKE; a script in benchmarks/ without a line fails
test_every_benchmark_has_a_smoke_line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: script -> text its --smoke run prints once its cross-checks held.
SMOKE = {
    "aggregate_bench.py": "all paths agree",
    "analysis_bench.py": "analysis stages done",
    "atlas_bench.py": "atlas queries answered without errors",
    "attribution_service_bench.py": "overhead ratio remote/in-process",
    "batch_bench.py": "check B=8 vs B=1: 8/8 graphs with identical id, units and edges",
    "connectivity_bench.py": "top promoted tokens",
    "device_map_proof.py": "graphs equal: True",
    "exemplars_bench.py": "writing the exemplar file",
    "gateway_bench.py": "ratio http-json / grpc-direct",
    "gpu_proof.py": "[smollm2]",
    "label_bench.py": "speedup concurrency 4 vs 1",
    "long_trace_bench.py": "grows as T^",
    "proto_bench.py": "edge columns",
    "relp_bench.py": "identical edge set: True",
    "validation_bench.py": "same results: True",
    "viewer_bench.py": "influence",
}


def test_every_benchmark_has_a_smoke_line() -> None:
    scripts = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    assert sorted(SMOKE) == scripts, "add each new benchmark script to SMOKE (and give it --smoke)"


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_smoke(script: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke"], capture_output=True,
                            text=True, timeout=600, cwd=REPO, env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert SMOKE[script] in result.stdout, result.stdout[-2000:]

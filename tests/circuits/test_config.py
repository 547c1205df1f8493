"""The YAML config loads into typed settings; every mistake is one line naming the key or file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from circuits_core.config import Config, load_config
from circuits_core.errors import ConfigError

GOOD = """
model:
  name: HuggingFaceTB/SmolLM2-135M-Instruct
  dtype: float32
graphs:
  prompts: ["The capital of France is"]
  k: 3
  tau: 0.01
aggregation:
  min_edge_count: 3
clustering:
  weight_transform: abs_weight
labeling:
  method: progressive
  backend: openai
  concurrency: 4
output:
  duckdb: atlas.duckdb
"""


def test_good_config_loads_typed(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(GOOD)
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.graphs.prompts == ("The capital of France is",) and cfg.graphs.k == 3
    assert cfg.graphs.tau == 0.01 and cfg.clustering.weight_transform == "abs_weight"
    assert cfg.labeling.concurrency == 4 and cfg.resolve("atlas.duckdb") == tmp_path / "atlas.duckdb"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("graphs:\n  kk: 3\n", "graphs.kk: unknown key"),
        ("bogus: {}\n", "bogus: unknown key"),
        ("graphs:\n  k: three\n", "graphs.k: expected int, got str"),
        ("graphs:\n  tau: [1]\n", "graphs.tau: expected number, got list"),
        ("graphs:\n  raw: 1\n", "graphs.raw: expected true/false"),
        ("graphs:\n  prompts: hello\n", "graphs.prompts: expected a list"),
        ("clustering:\n  weight_transform: cube\n", "clustering.weight_transform: expected one of"),
        ("labeling: 5\n", "labeling: expected a mapping"),
        ("model: [\n", "invalid YAML at line"),
        ("- a\n- b\n", "expected a mapping, got list"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/c.yaml")


def test_cli_reports_config_errors_in_one_line(tmp_path: Path) -> None:
    pytest.importorskip("circuits.cli.build_db", reason="build-db lands with the atlas package")
    path = tmp_path / "bad.yaml"
    path.write_text("graphs:\n  kk: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "circuits.cli", "build-db", "--config", str(path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

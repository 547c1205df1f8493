"""The Python API a README reader uses: `circuits.load_model`, the lazily exported names in
`dir(circuits)`, and the README's Python example run as written on the bundled model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_dir_lists_the_lazy_exports_without_importing_them():
    code = ("import sys, circuits; names = dir(circuits); "
            "assert {'load_model', 'RelPAttributor', 'RelPConfig', 'cluster_full_model', 'Graph'} <= set(names), names; "
            "assert 'torch' not in sys.modules and 'circuits_attribution' not in sys.modules; "
            "import circuits_attribution; assert circuits.load_model is circuits_attribution.load_model; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def _readme_python() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- python-api -->", 1)[1].split("<!-- /python-api -->", 1)[0]
    return block.split("```python", 1)[1].split("```", 1)[0]


@pytest.mark.smollm2
def test_readme_python_example_runs_as_written(tmp_path):
    from circuits_attribution.models import is_prepared

    if not is_prepared():
        pytest.skip("SmolLM2 cache not prepared (python -m circuits_attribution.prepare_model)")
    script = tmp_path / "example.py"
    script.write_text(_readme_python())
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = result.stdout.strip().splitlines()
    assert first.startswith("Graph(") and "The capital of France is" in first and len(first) < 300
    assert second.startswith("[(' Paris', 0.77")

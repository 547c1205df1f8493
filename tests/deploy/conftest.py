"""Fixtures for the Helm chart tests: the helm binary, rendering, and parsed manifests.

helm comes from scripts/install_tools.sh (.tools/bin/helm) or PATH; without it the chart tests
skip with the reason (scripts/setup.sh installs it, so CI runs them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "circuits"
RELEASE = "demo"
NAMESPACE = "circuits"
#: The oldest Kubernetes the chart fully supports (backoffLimitPerIndex GA, pod-index label).
KUBERNETES_VERSION = "1.33.0"

#: name -> values files (besides the chart's values.yaml)
VALUE_SETS: dict[str, list[Path]] = {"default": []} | {
    path.stem: [path] for path in sorted((CHART / "ci").glob("*.yaml"))
}


def find_helm() -> str | None:
    local = REPO / ".tools" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("helm")


@pytest.fixture(scope="session")
def helm() -> str:
    path = find_helm()
    if path is None:
        pytest.skip("helm is not installed: run `bash scripts/install_tools.sh` (scripts/setup.sh does)")
    return path


@dataclass(frozen=True, slots=True, kw_only=True)
class Rendered:
    """One `helm template` output: the text and its parsed objects."""

    text: str
    objects: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for obj in self.objects:
            if obj["kind"] == kind and obj["metadata"]["name"] == name:
                return obj
        raise AssertionError(f"no {kind} {name}; have {[(o['kind'], o['metadata']['name']) for o in self.objects]}")

    def workloads(self) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def template(helm: str, *values_files: Path, extra: tuple[str, ...] = (), check: bool = True) -> subprocess.CompletedProcess[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for path in values_files:
        args += ["-f", str(path)]
    return run_helm(helm, *args, *extra, check=check)


def render(helm: str, *values_files: Path, extra: tuple[str, ...] = ()) -> Rendered:
    text = template(helm, *values_files, extra=extra).stdout
    objects = [doc for doc in yaml.safe_load_all(text) if doc]
    return Rendered(text=text, objects=objects)


_CACHE: dict[str, Rendered] = {}


@pytest.fixture(params=sorted(VALUE_SETS), scope="session")
def rendered(request: pytest.FixtureRequest, helm: str) -> tuple[str, Rendered]:
    """(value set name, rendered chart) for the default values and every ci/*.yaml."""
    name = request.param
    if name not in _CACHE:
        _CACHE[name] = render(helm, *VALUE_SETS[name])
    return name, _CACHE[name]


def chart_values(*values_files: Path) -> dict[str, Any]:
    """values.yaml with the files merged over it (maps merge, everything else replaces)."""

    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            out = dict(base)
            for key, value in over.items():
                out[key] = merge(base.get(key), value) if key in base else value
            return out
        return over

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in values_files:
        values = merge(values, yaml.safe_load(path.read_text()))
    return values


@pytest.fixture(scope="session")
def helm_template(helm: str):
    """Callable: `helm template` of the chart with values files and extra flags (no raise)."""
    return lambda *files, extra=(): template(helm, *files, extra=tuple(extra), check=False)


@pytest.fixture(scope="session")
def render_chart(helm: str):
    """Callable: the parsed `helm template` output for values files and extra flags."""
    return lambda *files, extra=(): render(helm, *files, extra=tuple(extra))


@pytest.fixture(scope="session")
def values_for():
    """Callable: the effective values of a value set name (values.yaml + its ci file)."""
    return lambda name: chart_values(*VALUE_SETS[name])

"""The service images for real, with podman: `scripts/images.sh build`, `smoke` and `kube`.

build: the four images from the repository (a local Debian/Python base, the CPU torch for
attribution); smoke: each image's default command to gRPC SERVING, the pipeline through the
containers, SIGTERM -> exit 0; kube: every workload of the Helm chart as a pod under
`podman kube play`. Each script prints one `ok|FAIL|skip <step> ...` line per step; these tests
require every step to pass. They run in the normal test run (CI installs podman with
scripts/ci_services.sh) and skip only when podman is missing and cannot be installed, saying so.
A cold build takes minutes; a cached one seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "scripts" / "images.sh"
SERVICES = ("aggregator", "atlas", "labeler", "gateway", "attribution")
#: Modules only the attribution image may hold (the others never import them).
HEAVY = ("torch", "transformers", "accelerate", "safetensors", "tokenizers", "gguf", "sympy")
SIZE_GOAL_MB = 450
ENV = {**os.environ, "CONTAINERS_CONF": str(REPO / "deploy" / "podman" / "containers.conf")}


def run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def step_lines(output: str) -> dict[str, str]:
    """{step: "ok"|"FAIL"|"skip"} from a script's one-line-per-step output."""
    found = {}
    for line in output.splitlines():
        match = re.match(r"^(ok|FAIL|skip)\s+(\S+) \(", line)
        if match:
            found[match.group(2)] = match.group(1)
    return found


@pytest.fixture(scope="module")
def images() -> str:
    """Build (or reuse) localhost/circuits-<service>:dev; the build output."""
    if sys.platform != "linux" or shutil.which("apt-get") is None and shutil.which("podman") is None:
        pytest.skip("podman cannot be installed here: not a Debian/Ubuntu Linux with apt-get, and no podman")
    result = run("bash", str(IMAGES), "build", timeout=1800)
    output = result.stdout + result.stderr
    print(output)
    steps = step_lines(output)
    if steps.get("tools") == "FAIL":
        pytest.skip(f"podman cannot be installed here (scripts/images.sh build, step tools):\n{output[-1500:]}")
    assert result.returncode == 0, output
    for name in ("tools", "base/python", *(f"build/{s}" for s in SERVICES)):
        assert steps.get(name) == "ok", f"step {name}: {steps.get(name)}\n{output}"
    return output


@pytest.mark.timeout(1800)
def test_images_build_from_the_repository(images: str) -> None:
    for service in SERVICES:
        assert re.search(rf"^ok\s+build/{service} .*localhost/circuits-{service}:dev \d+ MB", images, re.M), images


def _podman_python(image: str, code: str) -> subprocess.CompletedProcess[str]:
    return run("podman", "run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c", code, timeout=120)


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("service", SERVICES)
def test_only_attribution_carries_torch(images: str, service: str) -> None:
    """Imports absent where the service never needs them; present (so the check can fail) in attribution."""
    code = (
        "import importlib.util as u, sys; "
        f"print(' '.join(m for m in {HEAVY!r} if u.find_spec(m) is not None))"
    )
    result = _podman_python(f"localhost/circuits-{service}:dev", code)
    assert result.returncode == 0, result.stderr
    present = set(result.stdout.split())
    if service == "attribution":
        assert {"torch", "transformers"} <= present
    else:
        assert not present, f"circuits-{service} carries {sorted(present)}"


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("service", ("aggregator", "atlas", "labeler", "gateway"))
def test_python_service_images_meet_the_size_goal(images: str, service: str) -> None:
    result = run("podman", "image", "inspect", "--format", "{{.Size}}", f"localhost/circuits-{service}:dev", timeout=60)
    size_mb = int(result.stdout.strip()) / 1e6
    print(f"circuits-{service}: {size_mb:.0f} MB")
    assert size_mb <= SIZE_GOAL_MB, f"circuits-{service} is {size_mb:.0f} MB (goal <= {SIZE_GOAL_MB} MB)"


@pytest.mark.timeout(1800)
def test_smoke_default_commands_pipeline_and_sigterm(images: str) -> None:
    result = run("bash", str(IMAGES), "smoke", timeout=1500)
    output = result.stdout + result.stderr
    print(output)
    assert result.returncode == 0, output
    steps = step_lines(output)
    assert "FAIL" not in steps.values(), output
    for name in ("attribution", "trace", "attribution-unreadable-model", "attribution-sigterm", "aggregator",
                 "labeler", "labeler_progressive", "build_db", "atlas", "gateway", *(f"contents/{s}" for s in SERVICES)):
        assert steps.get(name) == "ok", f"step {name}: {steps.get(name)}\n{output}"
    host_model = Path.home() / ".cache" / "circuits" / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    if (host_model / ".circuits-prepared").is_file():
        assert steps.get("attribution-mounted-model") == "ok", output


@pytest.mark.timeout(1800)
def test_every_chart_workload_runs_under_podman_kube_play(images: str) -> None:
    helm = REPO / ".tools" / "bin" / "helm"
    if not helm.exists() and shutil.which("helm") is None:
        pytest.skip("helm is not installed: run `bash scripts/install_tools.sh` (scripts/setup.sh does)")
    result = run("bash", str(IMAGES), "kube", timeout=1500)
    output = result.stdout + result.stderr
    print(output)
    assert result.returncode == 0, output
    steps = step_lines(output)
    for name in ("render", "prepare", "aggregator-statefulset", "batch-job", "build-atlas", "atlas-deployment",
                 "gateway-deployment", "atlas-sigterm", "aggregator-sigterm", "labeler-deployment",
                 "attribution-deployment"):
        assert steps.get(f"kube/{name}") == "ok", f"step kube/{name}: {steps.get(f'kube/{name}')}\n{output}"

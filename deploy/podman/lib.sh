# Shared helpers of scripts/images.sh, deploy/podman/smoke.sh and deploy/podman/kube.sh (sourced).
# Expects REPO; sets CONTAINERS_CONF, LOGS, FAILED.

export CONTAINERS_CONF="${CONTAINERS_CONF:-$REPO/deploy/podman/containers.conf}"
WORK="${CIRCUITS_IMAGES_WORK:-/tmp/circuits-images}"
LOGS="${CIRCUITS_IMAGES_LOGS:-$WORK/logs}"
mkdir -p "$LOGS"
FAILED=0
#: uid:gid of the service user in every image (and runAsUser in the chart).
SERVICE_UID=10001

# step NAME COMMAND...: run COMMAND with its output in $LOGS/NAME.log and print one line
#   ok|FAIL|skip NAME (SECONDS s) DETAIL
# COMMAND may write a one-line DETAIL with `detail ...`; exit status 77 means "skip".
step() {
  local name="$1"; shift
  local log="$LOGS/${name//\//_}.log" started=$SECONDS rc
  STEP_DETAIL="$LOGS/${name//\//_}.detail"
  : >"$STEP_DETAIL"
  "$@" </dev/null >"$log" 2>&1
  rc=$?
  local text; text="$(head -c 400 "$STEP_DETAIL" | tr '\n' ' ')"
  if [ $rc -eq 0 ]; then
    printf 'ok   %s (%ss) %s\n' "$name" "$((SECONDS - started))" "$text"
  elif [ $rc -eq 77 ]; then
    printf 'skip %s (%ss) %s\n' "$name" "$((SECONDS - started))" "$text"
  else
    FAILED=1
    printf 'FAIL %s (%ss) exit %s: %s (log %s)\n' "$name" "$((SECONDS - started))" "$rc" "$text" "$log"
    tail -n 25 "$log" | sed 's/^/    | /'
  fi
  return $rc
}

detail() { printf '%s' "$*" >"$STEP_DETAIL"; }

have_podman() { command -v podman >/dev/null && command -v runc >/dev/null; }

image_size() { podman image inspect --format '{{.Size}}' "$1" 2>/dev/null | awk '{printf "%d MB", $1 / 1000000}'; }

# The gRPC health status of the server on 127.0.0.1:PORT inside container NAME (its own Python).
HEALTH_PY='
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
try:
    with grpc.insecure_channel("127.0.0.1:" + sys.argv[1]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
except grpc.RpcError as exc:
    print(exc.code().name)
'

# wait_serving CONTAINER TIMEOUT [PORT]: poll the standard gRPC health service until SERVING.
# Fails at once when the container exits (its log is printed).
wait_serving() {
  local name="$1" timeout="$2" port="${3:-50051}" started=$SECONDS status=""
  while [ $((SECONDS - started)) -lt "$timeout" ]; do
    if [ "$(podman inspect --format '{{.State.Running}}' "$name" 2>/dev/null)" != true ]; then
      echo "container $name is not running (exit $(podman inspect --format '{{.State.ExitCode}}' "$name" 2>/dev/null)); its log:"
      podman logs "$name" 2>&1 | tail -n 30
      return 1
    fi
    status="$(podman exec "$name" python -c "$HEALTH_PY" "$port" 2>/dev/null | tail -n 1)"
    if [ "$status" = SERVING ]; then
      echo "$name SERVING after $((SECONDS - started))s"
      return 0
    fi
    sleep 1
  done
  echo "$name not SERVING after ${timeout}s (last status: ${status:-none}); its log:"
  podman logs "$name" 2>&1 | tail -n 30
  return 1
}

# stop_expect_zero CONTAINER: SIGTERM (podman stop, SIGKILL only after 60 s); the exit code must be 0.
stop_expect_zero() {
  local name="$1" started=$SECONDS code
  podman stop --time 60 "$name" >/dev/null || return 1
  code="$(podman inspect --format '{{.State.ExitCode}}' "$name")"
  echo "$name: exit $code after SIGTERM ($((SECONDS - started))s)"
  podman logs "$name" 2>&1 | tail -n 5
  [ "$code" = 0 ]
}

#!/usr/bin/env bash
# Build and test the four service images with podman, on a machine without a registry or a
# Docker engine (Debian 12 as root, like the project's CI machines; see deploy/README.md).
#
#   bash scripts/images.sh build [SERVICE...]  podman & co (apt, when missing), a local Debian base
#                                              (debootstrap) and Python base, then the images
#                                              localhost/circuits-<service>:dev. Idempotent, cached.
#   bash scripts/images.sh smoke               each image's default command to gRPC SERVING, the
#                                              pipeline through the containers (trace, ingest,
#                                              export, label, build-db, serve, query), image
#                                              contents, and SIGTERM -> exit 0 for every server.
#   bash scripts/images.sh kube                every workload of the Helm chart (CPU value set
#                                              ci/cpu-podman.yaml) as a pod under `podman kube play`.
#   bash scripts/images.sh sizes               one line per image with its size.
#
# Every step prints one line `ok|FAIL|skip <step> (<seconds>s) <detail>`; the exit status is
# non-zero when any step fails. Logs of each step: $CIRCUITS_IMAGES_LOGS (default
# /tmp/circuits-images/logs).
#
# Environment:
#   CIRCUITS_IMAGE_TAG      tag of the built images (default dev)
#   CIRCUITS_PYTHON_IMAGE   Python base of aggregator/atlas/labeler, and base of attribution
#                           (default: localhost/circuits-python:3.11-bookworm, made here; set e.g.
#                           docker.io/library/python:3.11-slim-bookworm where a registry is reachable)
#   CONTAINERS_CONF         podman settings (default deploy/podman/containers.conf)
#   CIRCUITS_BUILD_ARGS     extra NAME=VALUE build arguments, space-separated, e.g.
#                           "AGGREGATOR_EXTRAS=fast" (the numba-compiled aggregator, deploy/README.md)
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
TAG="${CIRCUITS_IMAGE_TAG:-dev}"
SERVICES=(aggregator atlas labeler gateway attribution)
DEBIAN_BASE="localhost/debian-base:bookworm"
LOCAL_PYTHON_BASE="localhost/circuits-python:3.11-bookworm"
PYTHON_BASE="${CIRCUITS_PYTHON_IMAGE:-$LOCAL_PYTHON_BASE}"
# shellcheck source=../deploy/podman/lib.sh
source "$REPO/deploy/podman/lib.sh"

# -- tools ---------------------------------------------------------------------------------------
have_tools() { command -v podman >/dev/null && command -v buildah >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null; }

install_tools() {
  if have_tools; then detail "$(podman --version), $(runc --version | head -n1)"; return 0; fi
  command -v apt-get >/dev/null || { echo "no apt-get: install podman, buildah, runc and debootstrap yourself"; return 1; }
  local sudo=(); [ "$(id -u)" = 0 ] || sudo=(sudo -n)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq || return 1
  "${sudo[@]}" apt-get install -y -qq podman buildah debootstrap || return 1
  # runc without its recommends; crun (podman's default here) fails on this host's cgroups.
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends runc || return 1
  have_tools && detail "installed $(podman --version), $(runc --version | head -n1)"
}

# -- base images -----------------------------------------------------------------------------------
apt_mirror() {
  local uri=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    uri="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri="$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list)"
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

debian_base() {
  if podman image exists "$DEBIAN_BASE"; then detail "$DEBIAN_BASE cached"; return 0; fi
  local rootfs mirror
  rootfs="$(mktemp -d /var/tmp/circuits-rootfs.XXXXXX)" || return 1
  mirror="$(apt_mirror)"
  echo "debootstrap bookworm from $mirror into $rootfs"
  # debootstrap wants an empty target; mktemp made the folder, so use a child.
  if ! debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs/root" "$mirror"; then
    rm -rf "$rootfs"; return 1
  fi
  # Like Debian's slim images: no documentation, manuals or translations now or later.
  cat >"$rootfs/root/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  (cd "$rootfs/root" && find usr/share/doc -mindepth 1 ! -name copyright ! -type d -delete 2>/dev/null; \
   rm -rf usr/share/man/* usr/share/info/* var/cache/apt/archives/*.deb var/lib/apt/lists/*; \
   find usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +)
  tar -C "$rootfs/root" --numeric-owner -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$DEBIAN_BASE"
  local rc=$?
  rm -rf "$rootfs"
  [ $rc -eq 0 ] && detail "$DEBIAN_BASE from $mirror, $(image_size "$DEBIAN_BASE")"
  return $rc
}

python_base() {
  if [ "$PYTHON_BASE" != "$LOCAL_PYTHON_BASE" ]; then detail "using $PYTHON_BASE"; return 0; fi
  podman build --isolation chroot -f deploy/podman/python-base.Dockerfile \
    --build-arg DEBIAN_IMAGE="$DEBIAN_BASE" -t "$LOCAL_PYTHON_BASE" deploy/podman || return 1
  detail "$LOCAL_PYTHON_BASE, $(podman run --rm "$LOCAL_PYTHON_BASE" python3 --version 2>&1), $(image_size "$LOCAL_PYTHON_BASE")"
}

# -- pip settings of the host, handed to the builds -------------------------------------------------
# Fills PIP_ARGS (pip options) and MOUNTS (podman -v flags) from `pip config list`: index URLs,
# find-links and the certificate bundle. Local folders/files are mounted read-only at the same
# path; local ones that do not exist are dropped.
host_pip_settings() {
  PIP_ARGS=(); MOUNTS=()
  local pip=()
  if [ -x "$REPO/.venv/bin/pip" ]; then pip=("$REPO/.venv/bin/pip")
  elif command -v pip3 >/dev/null; then pip=(pip3)
  elif python3 -m pip --version >/dev/null 2>&1; then pip=(python3 -m pip)
  fi
  local cafile
  cafile="$(python3 -c 'import ssl; print(ssl.get_default_verify_paths().cafile or "")' 2>/dev/null)"
  [ -n "$cafile" ] && [ -f "$cafile" ] && MOUNTS+=(-v "$cafile:$cafile:ro")
  [ ${#pip[@]} -gt 0 ] || return 0
  local line key value item path seen=" " given=" "
  while IFS= read -r line; do
    key="${line%%=*}"; key="${key##*.}"
    value="${line#*=}"; value="${value#\'}"; value="${value%\'}"
    for item in $value; do
      # The same setting often comes twice (pip.conf and PIP_* environment): once is enough.
      [[ "$given" == *" $key=$item "* ]] && continue
      given+="$key=$item "
      case "$key" in
        index-url|extra-index-url|find-links)
          path="${item#file://}"
          if [ "$path" != "$item" ] || [ "${item#/}" != "$item" ]; then
            [ -e "$path" ] || continue
            # A local index (PEP 503 folder) links its files relative to itself (../../files/...):
            # mount the folder above it too.
            [ "$key" = find-links ] || path="$(dirname "${path%/}")"
            [[ "$seen" == *" $path "* ]] || { MOUNTS+=(-v "$path:$path:ro"); seen+="$path "; }
          fi
          PIP_ARGS+=("--$key" "$item");;
        cert)
          [ -f "$item" ] || continue
          [[ "$seen" == *" $item "* ]] || { MOUNTS+=(-v "$item:$item:ro"); seen+="$item "; }
          PIP_ARGS+=(--cert "$item");;
        trusted-host)
          PIP_ARGS+=(--trusted-host "$item");;
      esac
    done
  done < <("${pip[@]}" config list 2>/dev/null | sort -u)
}

# -- images ----------------------------------------------------------------------------------------
build_image() {
  local svc="$1" base_arg arg extra=()
  for arg in ${CIRCUITS_BUILD_ARGS:-}; do extra+=(--build-arg "$arg"); done
  host_pip_settings
  if [ "$svc" = attribution ]; then base_arg="BASE_IMAGE=$PYTHON_BASE"; else base_arg="PYTHON_IMAGE=$PYTHON_BASE"; fi
  echo "pip options: ${PIP_ARGS[*]:-(none)}"
  echo "mounts: ${MOUNTS[*]:-(none)}"
  podman build --isolation chroot --layers \
    -f "deploy/docker/$svc.Dockerfile" \
    --build-arg "$base_arg" \
    --build-arg "PIP_EXTRA_ARGS=${PIP_ARGS[*]:-}" \
    "${extra[@]}" \
    "${MOUNTS[@]}" \
    -t "localhost/circuits-$svc:$TAG" . || return 1
  detail "localhost/circuits-$svc:$TAG $(image_size "localhost/circuits-$svc:$TAG")"
}

cmd_build() {
  local wanted=("$@") svc
  [ ${#wanted[@]} -gt 0 ] || wanted=("${SERVICES[@]}")
  for svc in "${wanted[@]}"; do
    [[ " ${SERVICES[*]} " == *" $svc "* ]] || { echo "error: unknown service $svc (one of ${SERVICES[*]})" >&2; return 2; }
  done
  step tools install_tools || return 1
  if [ "$PYTHON_BASE" = "$LOCAL_PYTHON_BASE" ]; then
    step base/debian debian_base || return 1
  fi
  step base/python python_base || return 1
  for svc in "${wanted[@]}"; do
    step "build/$svc" build_image "$svc"
  done
  return $FAILED
}

cmd_sizes() {
  local svc
  for svc in "${SERVICES[@]}"; do
    printf '%-12s %s\n' "$svc" "$(image_size "localhost/circuits-$svc:$TAG")"
  done
}

# -- smoke (drivers run inside the images: only podman is needed) and kube (the chart; needs helm) ----
cmd_smoke() {
  have_podman || { echo "FAIL smoke: podman is not installed (run: bash scripts/images.sh build)"; return 1; }
  bash "$REPO/deploy/podman/smoke.sh" "$TAG"
}

cmd_kube() {
  have_podman || { echo "FAIL kube: podman is not installed (run: bash scripts/images.sh build)"; return 1; }
  # The driver needs PyYAML: the workspace venv (bash scripts/setup.sh) or a python3 that has it.
  local python="$REPO/.venv/bin/python"
  [ -x "$python" ] || python=python3
  "$python" -c 'import yaml' 2>/dev/null || { echo "FAIL kube: no Python with PyYAML (run: bash scripts/setup.sh)"; return 1; }
  "$python" "$REPO/deploy/podman/kube_play.py" --tag "$TAG"
}

case "${1:-}" in
  build) shift; cmd_build "$@";;
  smoke) cmd_smoke;;
  kube) cmd_kube;;
  sizes) cmd_sizes;;
  *) echo "usage: bash scripts/images.sh build [SERVICE...] | smoke | kube | sizes" >&2; exit 2;;
esac

#!/usr/bin/env bash
# System packages the test suite uses on a fresh machine: PostgreSQL (neurondb tests start a
# private server from its binaries), Chromium (viewer page tests), Slurm + munge (a private
# single-node cluster runs `circuits launch --slurm` jobs), and podman + buildah + runc +
# debootstrap (tests/deploy/test_images.py builds the service images and runs them, and the Helm
# chart's workloads under `podman kube play`). Best effort: tests that need a missing one skip with
# the reason.
set -uo pipefail
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v slurmd >/dev/null 2>&1 || [ -x /usr/sbin/slurmd ] || need+=(slurm-wlm munge)
containers=()
for tool in podman buildah debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || containers+=("$tool")
done
if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=(); else SUDO=(sudo -n); fi
  if [ $((${#need[@]} + ${#containers[@]})) -gt 0 ]; then
    "${SUDO[@]}" apt-get update -qq >/dev/null 2>&1 || true
  fi
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing system packages: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
      || echo "warning: could not install ${need[*]}; dependent tests will skip"
  fi
  if [ ${#containers[@]} -gt 0 ]; then
    # With recommends: netavark, aardvark-dns, slirp4netns, fuse-overlayfs come along.
    echo "installing system packages: ${containers[*]}"
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${containers[@]}" >/dev/null 2>&1 \
      || echo "warning: could not install ${containers[*]}; image tests will skip"
  fi
  # podman's OCI runtime here is runc (crun fails on these hosts' cgroups); without recommends.
  if ! command -v runc >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends runc >/dev/null 2>&1 \
      || echo "warning: could not install runc; image tests will skip"
  fi
fi
exit 0

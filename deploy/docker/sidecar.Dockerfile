# syntax=docker/dockerfile:1
# The sidecar image: `pluginchain serve`, the ext_proc server Envoy calls and the ConfigService the
# operator pushes to. Built from the repository root:
#   docker build -f deploy/docker/sidecar.Dockerfile -t pluginchain-sidecar:0.1.0 .
# Pinned base: an exact Python release on an exact Debian release (add the @sha256 digest your
# registry reports to pin the bytes too).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# Build the project's wheel from source, so the image installs exactly what `pip install` would.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar/ sidecar/
COPY operator/ operator/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install /wheels/*.whl
# A fixed non-root uid: the chart's securityContext runs every container as 65532.
RUN groupadd --gid 65532 pluginchain \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin pluginchain
USER 65532:65532
# ext_proc, ConfigService, metrics.
EXPOSE 50051 50052 9090
ENTRYPOINT ["pluginchain"]
CMD ["serve", "--help"]

# syntax=docker/dockerfile:1
# CP-CNN Serve images (docs/operations.md). No torch: the serving install is `pip install .`.
#
#   docker build -t cpcnn-serve .                     CPU, onnxruntime (the default: last stage)
#   docker build --target gpu -t cpcnn-serve:gpu .    GPU, onnxruntime-gpu on CUDA 12 + cuDNN 9
#   docker run --rm -p 8000:8000 cpcnn-serve          serves the baked-in model on :8000
#
# The baked-in model is models/tiny-imagenet-200 when the build context has it, else
# models/synthetic (the Makefile's rule); --build-arg MODEL=<directory under models/> picks another.
# It lands in /app/models/default (CPCNN_MODEL_DIR); mount a package elsewhere and point
# CPCNN_MODEL_DIR at it to serve that instead.

# Base images. CUDA_IMAGE may be another CUDA 12 + cuDNN 9 *ubuntu22.04* runtime tag (an older
# CUDA 12 for an older driver); Python 3.11 comes from Ubuntu 22.04's archive.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.9.1-cudnn-runtime-ubuntu22.04

# 1. Requirements: the serving dependencies of pyproject.toml, per flavour. A layer of its own so
#    the dependency installs below stay cached until pyproject.toml changes.
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml deploy/docker/requirements.py ./
RUN python requirements.py cpu > requirements-cpu.txt \
 && python requirements.py gpu > requirements-gpu.txt

# 2. Wheel: the project itself (pure Python), installed with --no-deps into each venv.
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY modelpack/ modelpack/
COPY service/ service/
COPY training/ training/
COPY export/ export/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# 3. Model: the package to bake in, copied to /model.
FROM ${PYTHON_IMAGE} AS model
ARG MODEL=""
COPY models/ /src/models/
RUN set -eu; \
    name="${MODEL}"; \
    if [ -z "$name" ]; then \
      if [ -f /src/models/tiny-imagenet-200/manifest.json ]; then name=tiny-imagenet-200; \
      else name=synthetic; fi; \
    fi; \
    if [ ! -f "/src/models/$name/manifest.json" ]; then \
      echo "no model package models/$name/manifest.json in the build context: run" \
           "'make train-synthetic' first, or pass --build-arg MODEL=<directory under models/>" >&2; \
      exit 1; \
    fi; \
    cp -a "/src/models/$name" /model

# 4. GPU base: Python 3.11 on the CUDA runtime image (cuDNN 9, as onnxruntime-gpu for CUDA 12 needs).
FROM ${CUDA_IMAGE} AS gpu-base
ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu's python3.11 moves with security updates; pinning its exact build would break the build.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# 5. Venvs: serving dependencies, then the project wheel. No torch, no training dependencies.
FROM ${PYTHON_IMAGE} AS cpu-venv
COPY --from=requirements /src/requirements-cpu.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY --from=wheel /dist/ /tmp/dist/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/dist/*.whl

FROM gpu-base AS gpu-venv
COPY --from=requirements /src/requirements-gpu.txt /tmp/requirements.txt
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY --from=wheel /dist/ /tmp/dist/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/dist/*.whl

# 6. Final images. The two stages are the same but for their base and venv; keep them in step.
#    The service binds 0.0.0.0:8000 (CPCNN_HOST, CPCNN_PORT) and runs as the unprivileged user
#    cpcnn, named by number (10001) so that runAsNonRoot-style checks can verify it; it can read,
#    but not change, the baked-in model. ORT_DISABLE_TELEMETRY: onnxruntime's usage telemetry
#    (on by default in recent releases) would otherwise upload events and, the home directory
#    being read-only, log a warning at start-up.
FROM gpu-base AS gpu
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    CPCNN_HOST=0.0.0.0 \
    CPCNN_PORT=8000 \
    CPCNN_MODEL_DIR=/app/models/default
RUN useradd --system --no-log-init --user-group --uid 10001 --home-dir /app --shell /usr/sbin/nologin cpcnn
WORKDIR /app
COPY --from=gpu-venv /opt/venv /opt/venv
COPY --from=model /model /app/models/default
COPY deploy/docker/healthcheck.py /app/healthcheck.py
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]
CMD ["python", "-m", "service"]

FROM ${PYTHON_IMAGE} AS cpu
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    CPCNN_HOST=0.0.0.0 \
    CPCNN_PORT=8000 \
    CPCNN_MODEL_DIR=/app/models/default
RUN useradd --system --no-log-init --user-group --uid 10001 --home-dir /app --shell /usr/sbin/nologin cpcnn
WORKDIR /app
COPY --from=cpu-venv /opt/venv /opt/venv
COPY --from=model /model /app/models/default
COPY deploy/docker/healthcheck.py /app/healthcheck.py
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/app/healthcheck.py"]
CMD ["python", "-m", "service"]

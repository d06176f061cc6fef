# syntax=docker/dockerfile:1
#
# One Dockerfile, six images (pick one with --target):
#
#   target               torch   serves                           compose / k8s image
#   central              CPU     triptych serve central           triptych/central:TAG
#   text-encoder         CPU     triptych serve text-encoder      triptych/text-encoder:TAG
#   diffusion-unet       CUDA    triptych serve diffusion-unet    triptych/diffusion-unet:TAG-cuda
#   vae-decoder          CUDA    triptych serve vae-decoder       triptych/vae-decoder:TAG-cuda
#   diffusion-unet-cpu   CPU     triptych serve diffusion-unet    triptych/diffusion-unet:TAG-cpu
#   vae-decoder-cpu      CPU     triptych serve vae-decoder       triptych/vae-decoder:TAG-cpu
#
#   docker build --target diffusion-unet -t triptych/diffusion-unet:latest-cuda .
#
# No weights are baked in: mount a diffusers model directory (read-only) and point TRIPTYCH_MODEL at it,
# e.g. -v "$PWD/models:/models:ro" -e TRIPTYCH_MODEL=/models/stable-diffusion-v1-5.
#
# CUDA images: torch's CUDA wheels carry their own CUDA runtime, cuDNN and cuBLAS, so the base stays
# python-slim (an nvidia/cuda base would ship a second copy of those libraries, several GB). Only the
# host's driver is needed, which the NVIDIA container toolkit mounts in when a GPU is reserved.
#
# Layers, least to most often changed: Python + user -> torch (pinned, the same version as the Makefile's
# TORCH_SPEC) -> the project's dependencies (from pyproject.toml) -> the project itself.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu128

# ------------------------------------------------------------------------------------------- python-base
FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# A fixed, non-root uid so that k8s runAsUser / fsGroup and host bind-mount permissions can name it.
RUN python -m venv /opt/venv \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin triptych

# ------------------------------------------------------------------------------------------- project
# The wheel and the list of its dependencies, built apart so that the runtime images get only the results.
FROM python-base AS project
WORKDIR /src
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
    > requirements.txt
COPY shared ./shared
COPY central ./central
COPY text_encoder ./text_encoder
COPY diffusion_unet ./diffusion_unet
COPY vae_decoder ./vae_decoder
RUN pip wheel --no-deps --wheel-dir /wheels .

# ------------------------------------------------------------------------------------------- torch
FROM python-base AS torch-cpu
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX_URL
RUN pip install --index-url "${TORCH_CPU_INDEX_URL}" "torch==${TORCH_VERSION}"

FROM python-base AS torch-cuda
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX_URL
RUN pip install --index-url "${TORCH_CUDA_INDEX_URL}" "torch==${TORCH_VERSION}"
# Read by the NVIDIA container toolkit: expose the reserved GPU(s) for compute only.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ------------------------------------------------------------------------------------------- runtime
# The same three steps on each torch flavour: dependencies (torch already satisfies `torch>=2.1`, so pip
# keeps the pinned build), then the project wheel, then drop to the non-root user.
FROM torch-cpu AS runtime-cpu
COPY --from=project /src/requirements.txt /tmp/requirements.txt
RUN pip install --requirement /tmp/requirements.txt && rm /tmp/requirements.txt
COPY --from=project /wheels/ /tmp/wheels/
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
USER 10001:10001
WORKDIR /home/triptych
ENTRYPOINT ["triptych"]

FROM torch-cuda AS runtime-cuda
COPY --from=project /src/requirements.txt /tmp/requirements.txt
RUN pip install --requirement /tmp/requirements.txt && rm /tmp/requirements.txt
COPY --from=project /wheels/ /tmp/wheels/
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
USER 10001:10001
WORKDIR /home/triptych
ENTRYPOINT ["triptych"]

# ------------------------------------------------------------------------------------------- targets
# HEALTHCHECK asks /readyz (weights loaded and warmed up; for central: every stage ready and compatible).
# start-period covers model loading; urlopen raises on any non-2xx, which fails the check.

FROM runtime-cpu AS central
# The job store (SQLite and the jobs' images), owned by the service user so a fresh named volume mounted here
# inherits that ownership (compose.yaml: `jobs`).
RUN mkdir -p /home/triptych/.cache/triptych/jobs
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["serve", "central", "--host", "0.0.0.0"]

FROM runtime-cpu AS text-encoder
EXPOSE 8001
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8001/readyz', timeout=4)"]
CMD ["serve", "text-encoder", "--host", "0.0.0.0"]

FROM runtime-cuda AS diffusion-unet
EXPOSE 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8002/readyz', timeout=4)"]
CMD ["serve", "diffusion-unet", "--host", "0.0.0.0"]

FROM runtime-cuda AS vae-decoder
EXPOSE 8003
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8003/readyz', timeout=4)"]
CMD ["serve", "vae-decoder", "--host", "0.0.0.0"]

FROM runtime-cpu AS diffusion-unet-cpu
EXPOSE 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8002/readyz', timeout=4)"]
CMD ["serve", "diffusion-unet", "--host", "0.0.0.0"]

FROM runtime-cpu AS vae-decoder-cpu
EXPOSE 8003
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8003/readyz', timeout=4)"]
CMD ["serve", "vae-decoder", "--host", "0.0.0.0"]

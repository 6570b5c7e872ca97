# helixflow GPU image: CUDA torch and DeepSpeed, for the embed (and fine-tune) steps of GPU profiles.
# Not built in CI (no GPU, no registry there); CI lints it. Build on a machine with a registry:
#   docker build -f containers/helixflow-gpu.Dockerfile -t helixflow-gpu:0.1.0 .
# Run (NVIDIA Container Toolkit): docker run --rm --gpus all helixflow-gpu:0.1.0   # helixflow info
# Same entry point, user, folders (/data read-only, /results) and model-file options as the CPU image.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG HELICAL_VERSION=2.2.0
ARG DEEPSPEED_VERSION=0.19.8
ARG SLURM_PLUGIN_VERSION=2.8.0
ARG APP_UID=1000
ARG BAKE_MODEL_PROFILE=
ARG BAKE_MODEL_FROM=

ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HELIXFLOW_DATA_DIR=/data \
    HELIXFLOW_RESULTS_DIR=/results \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MPLBACKEND=Agg \
    DS_BUILD_OPS=0 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Ubuntu 22.04 ships Python 3.11 in universe (helical 2.2.0 needs 3.11). slurm-client + munge:
# `--workflow-profile slurm*` submits from the container (as the CPU image; docs/hpc.md).
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv ca-certificates procps slurm-client munge tini \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

COPY pyproject.toml /opt/helixflow/pyproject.toml
# CUDA torch from the PyTorch index; DeepSpeed ops are JIT-built at first use (DS_BUILD_OPS=0).
RUN pip install --upgrade pip==26.3 setuptools==84.2.1 \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-deps "helical==${HELICAL_VERSION}" \
    && python -c 'import tomllib; print("\n".join(tomllib.load(open("/opt/helixflow/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        | grep -v -E '^(torch|deepspeed)==' > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "deepspeed==${DEEPSPEED_VERSION}" "torch==${TORCH_VERSION}" \
    && pip install --no-deps "snakemake-executor-plugin-slurm==${SLURM_PLUGIN_VERSION}" \
    && rm /tmp/requirements.txt

COPY . /opt/helixflow
RUN pip install --no-deps --no-build-isolation -e /opt/helixflow \
    && install -m 0755 /opt/helixflow/containers/entrypoint.sh /usr/local/bin/helixflow-entrypoint \
    && useradd --uid "${APP_UID}" --create-home --shell /bin/bash helix \
    && mkdir -p /opt/helixflow-models \
    && if [ -n "${BAKE_MODEL_PROFILE}" ]; then \
        helixflow model stage --profile "${BAKE_MODEL_PROFILE}" --models-dir /opt/helixflow-models \
            ${BAKE_MODEL_FROM:+--from "/opt/helixflow/${BAKE_MODEL_FROM}"}; \
    fi \
    && chmod -R a+rX /opt/helixflow-models

USER ${APP_UID}
WORKDIR /home/helix
# tini as PID 1: passes SIGTERM (docker stop, Airflow's on_kill) on to helixflow, which stops
# snakemake and its jobs cleanly, and reaps orphaned processes.
ENTRYPOINT ["/usr/bin/tini", "--", "helixflow-entrypoint"]
CMD []

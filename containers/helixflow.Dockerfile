# helixflow CPU image: the orchestrator and every workflow step on CPU, fine-tuning included.
#   Python 3.11 (Debian bookworm), helixflow, helical 2.2.0, snakemake, torch 2.13.0 (CPU),
#   DeepSpeed 0.19.8 with its CPU ops compiled in, the SLURM client and executor plugin.
# Build (context: the repository root):
#   docker build -f containers/helixflow.Dockerfile -t helixflow:0.1.0 .
#   ci/build-image.sh containers/helixflow.Dockerfile localhost/helixflow:0.1.0   # podman, no registry
# Run:
#   docker run --rm helixflow:0.1.0                                   # helixflow info (versions, device, model)
#   docker run --rm -v /data:/data:ro -v /results:/results helixflow:0.1.0 \
#       run /data/cells.h5ad --model tiny --models-dir /data/models --out /results/cells
# Model files: mounted (a folder laid out as `helixflow model stage` leaves it, e.g. /data/models)
# or baked in with --build-arg BAKE_MODEL_PROFILE=<profile> [--build-arg BAKE_MODEL_FROM=<path in
# the context>] into /opt/helixflow-models. Containers never need the network.
#
# Two stages: `builder` has a C++ compiler and compiles DeepSpeed's CPU ops (cpu_adam for ZeRO's
# offloaded optimizer, shm_comm for its CPU collectives) into the package, so fine-tuning needs
# neither a compiler nor DeepSpeed's JIT build at run time; the final image gets the virtual
# environment and no compiler. DeepSpeed compiles them with -march=native: the ops run on CPUs
# with the build machine's instruction set (build the image where, or for what, it runs).
# No BuildKit-only syntax: podman/buildah and the classic builder accept it.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG HELICAL_VERSION=2.2.0
ARG DEEPSPEED_VERSION=0.19.8
ARG SLURM_PLUGIN_VERSION=2.8.0
# Host pip sources (ci/build-image.sh mounts them, ci/wheel-server.sh serves them); see containers/pip-sources.sh.
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_CONSTRAINT=
ARG HOST_CA_BUNDLE=
# The CPU build of torch (PyTorch's CPU index), never PyPI's multi-GB CUDA one.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV LANG=C.UTF-8 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Debian bookworm's python3 is 3.11; python3-dev and g++ build the DeepSpeed ops.
RUN set -eu; \
    apt_opts=""; [ -f "$HOST_CA_BUNDLE" ] && apt_opts="-o Acquire::https::CAInfo=$HOST_CA_BUNDLE"; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get $apt_opts update; \
    apt-get $apt_opts install -y --no-install-recommends python3 python3-venv python3-dev g++ ca-certificates; \
    apt-get clean; rm -rf /var/lib/apt/lists/*; \
    python3 -m venv /opt/venv; \
    python -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'

# torch CPU, helical without its torch==2.7.0 pin, the runtime packages pyproject.toml lists
# (DeepSpeed apart), then DeepSpeed from source against that torch with its CPU ops compiled
# (DS_BUILD_*; DS_ACCELERATOR=cpu picks the CPU builders), then the SLURM executor plugin
# without its numpy>=2.4.5 pin (as the Makefile; its other requirements are in pyproject.toml).
COPY pyproject.toml /opt/helixflow/pyproject.toml
COPY containers/pip-sources.sh /opt/helixflow/containers/pip-sources.sh
RUN set -eu; \
    . /opt/helixflow/containers/pip-sources.sh; \
    pip install --upgrade pip==26.3 setuptools==84.2.1; \
    pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    pip install --no-deps "helical==${HELICAL_VERSION}"; \
    python -c 'import tomllib; deps = tomllib.load(open("/opt/helixflow/pyproject.toml", "rb"))["project"]["dependencies"]; \
        print("\n".join(d for d in deps if not d.startswith("deepspeed==")))' > /tmp/requirements.txt; \
    pip install -r /tmp/requirements.txt; \
    rm -f /tmp/requirements.txt; \
    DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 DS_BUILD_SHM_COMM=1 \
        pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" "torch==${TORCH_VERSION}"; \
    pip install --no-deps "snakemake-executor-plugin-slurm==${SLURM_PLUGIN_VERSION}"; \
    rm -f /tmp/host-ca.crt; \
    python -c 'import torch; assert torch.__version__.startswith("'"$TORCH_VERSION"'") and torch.version.cuda is None, torch.__version__'; \
    DS_ACCELERATOR=cpu python -c 'from deepspeed.git_version_info import installed_ops as ops, accelerator_name as a; \
        assert a == "cpu" and ops["cpu_adam"] and ops["deepspeed_shm_comm"], (a, ops)'

FROM ${BASE_IMAGE}

ARG APP_UID=1000
ARG HOST_CA_BUNDLE=
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_CONSTRAINT=
ARG BAKE_MODEL_PROFILE=
ARG BAKE_MODEL_FROM=

ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HELIXFLOW_DATA_DIR=/data \
    HELIXFLOW_RESULTS_DIR=/results \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MPLBACKEND=Agg \
    DS_ACCELERATOR=cpu

# procps: snakemake and psutil-based benchmarks use it; libgomp1: the OpenMP runtime of the
# DeepSpeed ops; slurm-client + munge: `--workflow-profile slurm*` submits from the container
# (mount the cluster's slurm.conf at /etc/slurm and its munge socket folder at /run/munge).
RUN set -eu; \
    apt_opts=""; [ -f "$HOST_CA_BUNDLE" ] && apt_opts="-o Acquire::https::CAInfo=$HOST_CA_BUNDLE"; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get $apt_opts update; \
    apt-get $apt_opts install -y --no-install-recommends python3 ca-certificates procps libgomp1 slurm-client munge tini; \
    apt-get clean; rm -rf /var/lib/apt/lists/*; \
    for cc in cc gcc g++ c++; do if command -v "$cc"; then echo "compiler $cc in the final image" >&2; exit 1; fi; done

COPY --from=builder /opt/venv /opt/venv

# The project: editable, because `helixflow run` finds the workflow (workflow/, config/config.yaml)
# next to src/; the package's own data (profiles, schema, architectures) would come with a wheel too.
COPY . /opt/helixflow
RUN set -eu; \
    . /opt/helixflow/containers/pip-sources.sh; \
    pip install --no-deps --no-build-isolation -e /opt/helixflow; \
    install -m 0755 /opt/helixflow/containers/entrypoint.sh /usr/local/bin/helixflow-entrypoint; \
    useradd --uid "$APP_UID" --create-home --shell /bin/bash helix; \
    mkdir -p /opt/helixflow-models; \
    if [ -n "$BAKE_MODEL_PROFILE" ]; then \
        if [ -n "$BAKE_MODEL_FROM" ]; then from="--from /opt/helixflow/$BAKE_MODEL_FROM"; else from=""; fi; \
        helixflow model stage --profile "$BAKE_MODEL_PROFILE" --models-dir /opt/helixflow-models $from; \
    fi; \
    chmod -R a+rX /opt/helixflow-models

USER ${APP_UID}
WORKDIR /home/helix
# tini as PID 1: passes SIGTERM (docker stop, Airflow's on_kill) on to helixflow, which stops
# snakemake and its jobs cleanly, and reaps orphaned processes.
ENTRYPOINT ["/usr/bin/tini", "--", "helixflow-entrypoint"]
CMD []

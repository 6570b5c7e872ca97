# The README's two commands: `make demo` and `make test`. Each sets up its own virtual
# environment on a fresh machine (Python 3.11) and is safe to run again.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_CELLS ?= 3000

.PHONY: demo test venv lint bench clean

venv: $(VENV)/.installed

# torch first, pinned: the CPU build where the machine has one; nothing may pull another.
# helical 2.2.0 pins torch==2.7.0 (a multi-GB CUDA download), so it goes in without its
# pins; pyproject.toml lists the packages it imports. The SLURM executor plugin 2.8.0 asks
# for numpy>=2.4.5, which helical's numpy<2.3 rules out (it imports numpy only for its
# optional efficiency report): it goes in without its pins too; pyproject.toml lists the rest.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps helical==2.2.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps snakemake-executor-plugin-slurm==2.8.0
	touch $@

demo: venv
	$(BIN)/helixflow demo-data resources/demo/demo.h5ad --cells $(DEMO_CELLS)
	$(BIN)/helixflow run resources/demo/demo.h5ad --model tiny --out results/demo --cores $$(nproc)

test: venv
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/pytest

lint: venv
	cd workflow && PATH=$(abspath $(BIN)):$$PATH ../$(BIN)/snakemake --lint --configfile ../.test/config/config.yaml --directory ..
	$(BIN)/snakefmt --check workflow

bench: venv
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python bench/run.py

clean:
	rm -rf results .test/results .test/resources resources/demo

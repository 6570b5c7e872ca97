# The README's two commands: `make demo` and `make test`. Each sets up its own virtual
# environment on a fresh machine (Python 3.11) and is safe to run again.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_CELLS ?= 3000
# Shallow cells (500 UMIs, ~200 genes each): the demo fine-tunes in about a minute on 2 cores,
# and its cell types are hard enough for the frozen-embedding linear probe (~97%) that
# fine-tuning shows what it adds; at 3,000 UMIs both reach 99.8%.
DEMO_MEAN_COUNTS ?= 500

.PHONY: demo test venv lint bench bench-finetune clean

venv: $(VENV)/.installed

# torch first, pinned: the CPU build where the machine has one; nothing may pull another.
# helical 2.2.0 pins torch==2.7.0 (a multi-GB CUDA download), so it goes in without its
# pins; pyproject.toml lists the packages it imports.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps helical==2.2.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: venv
	$(BIN)/helixflow demo-data resources/demo/demo.h5ad --cells $(DEMO_CELLS) --mean-counts $(DEMO_MEAN_COUNTS)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/helixflow run resources/demo/demo.h5ad --model tiny --out results/demo --cores $$(nproc)

test: venv
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/pytest

lint: venv
	cd workflow && PATH=$(abspath $(BIN)):$$PATH ../$(BIN)/snakemake --lint --configfile ../.test/config/config.yaml --directory ..
	$(BIN)/snakefmt --check workflow

bench: venv
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python bench/run.py

bench-finetune: venv
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python bench/finetune_zero.py --threads 1

clean:
	rm -rf results .test/results .test/resources resources/demo

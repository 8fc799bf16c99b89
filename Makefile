# ayf developer entry points. `make help` lists them.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.ayf-installed
DEMO    ?= demo_out

.PHONY: help install test test-slow test-gpu demo lint bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install ayf with dev extras (idempotent)

test: install  ## run the default test suite (CPU, offline, < 10 min)
	$(BIN)/python -m pytest -q

test-slow: install  ## the slow lane: trains the toy and checks it learned
	$(BIN)/python -m pytest -q -m slow

test-gpu: install  ## the GPU lane (skipped without CUDA)
	$(BIN)/python -m pytest -q -m gpu

demo: install  ## teacher -> EMD flow map -> 1/2/4/8-step samples, figure and metrics (CPU)
	DEMO=$(DEMO) bash scripts/demo.sh

lint: install  ## static checks
	$(BIN)/ruff check ayf tests benchmarks

bench: install  ## fidelity and cost benchmarks (prints tables, writes bench_out/)
	$(BIN)/python benchmarks/theorem31.py
	$(BIN)/python benchmarks/cost.py
	$(BIN)/python benchmarks/fidelity.py

clean:  ## remove run outputs (keeps .venv)
	rm -rf $(DEMO) bench_out lightning_logs

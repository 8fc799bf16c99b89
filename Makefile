# ayf developer entry points. `make help` lists them.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.ayf-installed
DEMO    ?= demo_out

.PHONY: help install tools test test-slow test-ddp test-gpu demo lint bench bench-images bench-throughput bench-guidance bench-adversarial bench-ablation digits-data points-data fashion-data clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install ayf with dev extras (idempotent)

tools:  ## system tools the tests use: docker-compose (Debian), which validates docker/compose.yaml
	command -v docker-compose >/dev/null || apt-get install -y -qq docker-compose >/dev/null \
	  || (apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null)

test: install tools  ## run the default test suite (CPU, offline, < 10 min)
	$(BIN)/python -m pytest -q

test-slow: install  ## the slow lane: trains the toy and checks it learned
	$(BIN)/python -m pytest -q -m slow

test-ddp: install  ## the multi-process lane: every stage on two CPU processes (DDP)
	$(BIN)/python -m pytest -q -m ddp

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

digits-data: install  ## shards of scikit-learn's 8x8 digits -> data/digits/{train,val}
	test -f data/digits/train/manifest.json || $(BIN)/ayf shards digits --output data/digits --val_fraction 0.2

points-data: install  ## 2-D point sets (scikit-learn's moons, circles, swiss roll) -> data/points/*.npz
	for set in moons circles swiss_roll; do \
	  test -f data/points/$$set.npz || $(BIN)/ayf points $$set --output data/points/$$set.npz || exit 1; done

FASHION := /usr/share/datasets/fashion-mnist
fashion-data: install  ## Fashion-MNIST shards (Debian package dataset-fashion-mnist) -> data/fashion_mnist
	test -f $(FASHION)/train-images-idx3-ubyte.gz || apt-get install -y dataset-fashion-mnist
	test -f data/fashion_mnist/train/manifest.json || $(BIN)/ayf shards idx --pad 2 --output data/fashion_mnist/train \
	  --images $(FASHION)/train-images-idx3-ubyte.gz --labels $(FASHION)/train-labels-idx1-ubyte.gz
	test -f data/fashion_mnist/val/manifest.json || $(BIN)/ayf shards idx --pad 2 --output data/fashion_mnist/val \
	  --images $(FASHION)/t10k-images-idx3-ubyte.gz --labels $(FASHION)/t10k-labels-idx1-ubyte.gz

bench-images: digits-data  ## digits quality benchmark: teacher vs flow map FD / KID / PR (CPU)
	$(BIN)/python benchmarks/images.py --dataset digits

bench-throughput: install  ## U-Net training and sampling images/s (CPU, or the GPU when present)
	$(BIN)/python benchmarks/throughput.py --precision fp32 bf16 bf16-jvp

bench-guidance: install  ## toy mixture: no guidance vs autoguidance vs CFG (log-density, per-mode recall; CPU)
	$(BIN)/python benchmarks/guidance.py

bench-adversarial: digits-data  ## digits: 1/2/4/8-step FD and recall before and after adversarial finetuning (CPU)
	$(BIN)/python benchmarks/images.py --dataset digits --adversarial

bench-ablation: install  ## toy mixture: one distillation choice at a time, 1/2/4/8-step exact-map distance (CPU)
	$(BIN)/python benchmarks/ablation.py

clean:  ## remove run outputs (keeps .venv)
	rm -rf $(DEMO) bench_out lightning_logs

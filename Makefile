# Two entry points on a fresh machine with python3 and make: `make demo`, `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test lint format demo bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check mfprune kernels tests benchmarks scripts
	$(BIN)/ruff format --check mfprune kernels tests benchmarks scripts
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check mfprune kernels tests benchmarks scripts
	$(BIN)/ruff format --check mfprune kernels tests benchmarks scripts

format: $(STAMP)
	$(BIN)/ruff format mfprune kernels tests benchmarks scripts
	$(BIN)/ruff check --fix mfprune kernels tests benchmarks scripts

demo: $(STAMP)
	$(BIN)/python -m mfprune.demo demo-out

bench: $(STAMP)
	$(BIN)/python benchmarks/rewrite.py

clean:
	rm -rf $(VENV) demo-out bench-out

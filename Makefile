# The two entry points the README promises: `make demo` and `make test`.
# Both create .venv on first use. torch is pinned here (not in pyproject) so that
# a CPU machine takes the local CPU wheel and GPU users keep their own build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-all lint

$(BIN)/vidlora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/vidlora

setup: $(BIN)/vidlora

demo: setup
	$(BIN)/vidlora demo

# ruff (lint and format), mypy (the package ships py.typed), then the default test suite.
test: lint
	$(BIN)/python -m pytest

# The slow tests too (multi-process DeepSpeed runs need the venv's `deepspeed` launcher on PATH).
test-all: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m ""

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

# The two entry points the README promises: `make demo` and `make test`.
# Both create .venv on first use. torch is pinned here (not in pyproject) so that
# a CPU machine takes the local CPU wheel and GPU users keep their own build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-all lint

# Chromium (the distribution's) is what the web UI's browser test drives through Playwright.
# The last step builds DeepSpeed's CPU shared-memory op, which every multi-process CPU start needs
# (~60 s on 2 cores the first time, then cached in ~/.cache/torch_extensions), so no test run pays
# for it. The venv's bin goes first on PATH because the tests launch with the venv's ninja, whose
# build hashes Debian's ninja does not share (each switch would rebuild the op).
$(BIN)/vidlora: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	command -v chromium >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y chromium chromium-driver; \
		else sudo apt-get update && sudo apt-get install -y chromium chromium-driver; fi; }
	PATH="$(CURDIR)/$(BIN):$$PATH" DS_ACCELERATOR=cpu $(BIN)/python -c \
		"from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(BIN)/vidlora

setup: $(BIN)/vidlora

demo: setup
	$(BIN)/vidlora demo

# ruff (lint and format), mypy (the package ships py.typed), then the default test suite.
test: lint
	$(BIN)/python -m pytest

# The slow tests too. The multi-process tests find the launchers (deepspeed, torchrun) next to the
# venv's python, so they run from a fresh clone; a missing launcher fails them, never skips.
test-all: setup
	$(BIN)/python -m pytest -m ""

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

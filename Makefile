# Custos — the README's commands call these targets.
PY ?= python3
# pytest workers for `make test` (one per core on the 2-core CI machine; TEST_WORKERS=0 runs in-process)
TEST_WORKERS ?= 2
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# imitune (a Windows-style OMA DM client the interop test drives) needs Python >= 3.12; it
# gets a venv of its own so that its pinned dependencies never meet Custos's
PY312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.1[2-9]*/bin/python3) $(wildcard /usr/bin/python3.1[2-9]))
INTEROP := .venv-imitune
INTEROP_STAMP := $(INTEROP)/.installed

.DEFAULT_GOAL := help
.PHONY: help install demo serve test lint format bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

$(INTEROP_STAMP):
	@test -n "$(PY312)" || { echo "error: imitune needs Python >= 3.12 (set PY312=/path/to/python3.12)"; exit 1; }
	$(PY312) -m venv $(INTEROP)
	$(INTEROP)/bin/pip install -q imitune==0.2.0
	touch $(INTEROP_STAMP)

install: $(STAMP) $(INTEROP_STAMP) ## create .venv (Custos with its dev extras) and .venv-imitune

demo: $(STAMP) ## run the server on the embedded default with 25 simulated devices
	$(BIN)/custos demo

serve: $(STAMP) ## run the server on the embedded default (./var)
	$(BIN)/custos server

test: $(STAMP) $(INTEROP_STAMP) ## run the whole test suite (SQLite and PostgreSQL)
	$(BIN)/pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP) ## ruff check, ruff format --check, mypy
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

format: $(STAMP) ## apply ruff's formatting and fixes
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: $(STAMP) ## run the benchmarks (see bench/RESULTS.md)
	$(BIN)/python bench/run.py

clean: ## remove the venv and local state
	rm -rf $(VENV) $(INTEROP) var .pytest_cache .mypy_cache .ruff_cache

# Custos — the README's commands call these targets.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install demo serve test lint format bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install Custos with its dev extras

demo: $(STAMP) ## run the server on the embedded default with 25 simulated devices
	$(BIN)/custos demo

serve: $(STAMP) ## run the server on the embedded default (./var)
	$(BIN)/custos server

test: $(STAMP) ## run the whole test suite (SQLite and PostgreSQL)
	$(BIN)/pytest -q --durations=25

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
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

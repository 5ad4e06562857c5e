# The interface to the project: CI calls these targets, and so do you.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: run test lint bench screenshots install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The stamps re-install when pyproject.toml changes. torch is pinned there (CPU build).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## run: all three services in one process (memory bus, SQLite), API on 127.0.0.1:8000
run: install
	$(BIN)/newsmon run

## test: the whole suite; with CI=true, Kafka, PostgreSQL and model tests must run, not skip
test: install-dev
	$(BIN)/pytest

## lint: ruff (lint and format), mypy --strict, and the architecture's import rules
lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	@mkdir -p .cache/mypy && ln -sfn ../../services .cache/mypy/newsmon
	$(BIN)/mypy

## screenshots: the console's pages at 1080p and 375 px, into docs/console (needs chromium)
screenshots: install-dev
	NEWSMON_SCREENSHOTS=docs/console $(BIN)/pytest tests/test_console_browser.py -k every_page

## bench: every benchmark in bench/ (python -m bench.NAME); figures go to bench/results/*.json
BENCHES = $(sort $(basename $(notdir $(wildcard bench/[a-z]*.py))))
bench: install-dev
	@for b in $(BENCHES); do echo "== bench.$$b"; $(BIN)/python -m bench.$$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache newsmon.db*

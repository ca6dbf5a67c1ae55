# The two set-up commands of the README: `make demo` and `make test`.
# Each builds .venv by itself and installs what it needs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench test-slow clean system-packages

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

# GNU parallel is a baseline of the benchmarks and of the compatibility tests.
system-packages:
	@command -v parallel >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq parallel >/dev/null; } \
	      || echo "Could not install GNU parallel; the comparisons with it will not run."; \
	  else \
	    echo "GNU parallel is missing; install it (apt-get install parallel) for the comparisons."; \
	  fi; }

demo: $(STAMP)
	$(BIN)/python demo/demo.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench demo
	$(BIN)/ruff format --check src tests bench demo

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -m "not slow"

test: lint typecheck pytest

test-slow: $(STAMP) system-packages
	$(BIN)/pytest -m slow

bench: $(STAMP) system-packages
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .batchtools demo-out

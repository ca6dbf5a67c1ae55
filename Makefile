# The two set-up commands of the README: `make demo` and `make test`.
# Each builds .venv by itself and installs what it needs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench test-slow test-reliability clean system-packages

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

# GNU parallel is a baseline of the benchmarks and of the compatibility tests.
# Chromium renders the HTML report in its test, which fails without it.
system-packages:
	@missing=""; \
	command -v parallel >/dev/null 2>&1 || missing="$$missing parallel"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } \
	      || echo "Could not install$$missing; the tests and comparisons that need them will fail or not run."; \
	  else \
	    echo "Missing system packages:$$missing. Install them as root: apt-get install$$missing"; \
	  fi; \
	fi

demo: $(STAMP)
	$(BIN)/python demo/demo.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench demo
	$(BIN)/ruff format --check src tests bench demo

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) system-packages
	$(BIN)/pytest -m "not slow"

test: lint typecheck pytest

test-slow: $(STAMP) system-packages
	$(BIN)/pytest -m slow

# The whole reliability campaign (up to an hour); `make test` runs a
# bounded subset of each of its scenarios.
# The soak measures this process's memory, so it runs in a process of its own.
test-reliability: $(STAMP) system-packages
	BATCHTOOLS_CAMPAIGN=full $(BIN)/pytest tests/reliability/test_soak.py --timeout 3600
	BATCHTOOLS_CAMPAIGN=full $(BIN)/pytest tests/reliability --timeout 3600 \
	  --ignore tests/reliability/test_soak.py
	$(BIN)/python tests/reliability/summarize.py --campaign full --group

bench: $(STAMP) system-packages
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .batchtools demo-out .batchtools-campaign

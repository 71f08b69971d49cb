# dtvit: `make demo` trains the quickstart end to end; `make test` runs the test suite (`make test-fast`: its
# core, for the edit-test loop).
# Both create .venv on first use, with dtvit installed editable (`pip install -e .`: experiments/ scripts import it).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo report test test-fast venv clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m dtvit.main --config=configs/quickstart.py --workdir=workdirs/quickstart

report: $(STAMP)
	$(PY) -m dtvit.report --workdir=workdirs/quickstart --out=workdirs/quickstart/report

# Tests compile many small programs and run them briefly: XLA's backend optimisations (LLVM) are skipped, which
# roughly halves compile time on CPU (the same programs; every process of a test compiles alike).
TEST_XLA_FLAGS := --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0

LINT := $(PY) -m ruff check dtvit configs experiments tests

test: $(STAMP)
	$(LINT)
	XLA_FLAGS="$(TEST_XLA_FLAGS)" $(PY) -m pytest -n 2 -q tests

# The edit-test loop: every test not marked slow (pyproject.toml's `slow` marker: the tests that train, start
# subprocesses or compile whole models several times), under 2 minutes on 2 cores.
test-fast: $(STAMP)
	$(LINT)
	XLA_FLAGS="$(TEST_XLA_FLAGS)" $(PY) -m pytest -n 2 -q -m "not slow" tests

clean:
	rm -rf workdirs

# Two commands on a fresh machine: `make study` runs the local study, `make test` runs the tests.
# Both set up .venv first, installing PyTorch's CPU build before the project: a torch requirement
# that pip resolves on its own pulls the newest CUDA build (several GB). On a GPU machine, run
# `make setup TORCH="torch==<the CUDA build you want>"` first.

VENV ?= .venv
TORCH ?= torch==2.13.0
PYTHON ?= python3
PY := $(VENV)/bin/python
STUDY_ARGS ?=

# The venv's scripts (ray, mlflow, ternarylm) come first for everything make runs.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export TERNARYLM_SHARED_DATA ?= $(abspath ../shared/data)

.PHONY: setup study test test-fast

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

study: setup
	$(PY) studies/scaling.py $(STUDY_ARGS)

test: setup
	$(PY) -m pytest -q

# The unit tier: everything but the tests marked slow (Ray clusters, trials, long statistics).
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

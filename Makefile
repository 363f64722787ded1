# Two commands: `make demo` (set up, then run the demo) and `make test` (set up, then run the tests).
# Without an active virtualenv or conda environment, `make setup` creates .venv and installs
# requirements.txt into it; with one active, it installs into that (a GPU box keeps its CUDA torch).
ACTIVE_ENV := $(or $(VIRTUAL_ENV),$(CONDA_PREFIX))
VENV ?= .venv
PYTHON := $(if $(ACTIVE_ENV),python,$(VENV)/bin/python)
STAMP := $(if $(ACTIVE_ENV),$(ACTIVE_ENV)/.captioning-requirements,$(VENV)/.requirements-installed)
DEMO_OUTPUT ?= demo_output

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): requirements.txt
	$(if $(ACTIVE_ENV),,test -x $(VENV)/bin/python || python3 -m venv $(VENV))
	$(PYTHON) -m pip install -r requirements.txt
	touch $@

demo: setup
	$(PYTHON) demo.py --output-folder $(DEMO_OUTPUT)

test: setup
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf $(DEMO_OUTPUT) .pytest_cache

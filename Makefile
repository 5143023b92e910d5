# The commands of the README: `make demo`, `make lint` and `make test` (.ci/run runs lint, then test).
# Each creates .venv (Python 3.10+) and installs the package once, with the exact dependency set
# it was tested with (constraints.txt; setup.py itself only asks for compatible ranges).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.geoexplora-installed

.PHONY: demo lint test install

install: $(STAMP)

$(STAMP): setup.py pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) launchers/demo.py --out runs/demo

# Lint, format check and types (settings: pyproject.toml); seconds once mypy's cache is warm.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

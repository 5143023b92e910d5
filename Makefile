# The two commands of the README: `make demo` and `make test`.
# Both create .venv (Python 3.10+) and install the package with its pinned dependencies once.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.geoexplora-installed

.PHONY: demo test install

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) launchers/demo.py --out runs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

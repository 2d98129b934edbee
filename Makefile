# medseg: `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install system-deps demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the local CPU wheel; an unpinned torch would pull several GB of CUDA packages
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: install
	$(BIN)/medseg demo --out demo-run

system-deps:
	bash scripts/install_system_deps.sh

test: install system-deps
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) demo-run .pytest_cache

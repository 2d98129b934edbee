# medseg: `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install system-deps nnunet-peer demo lint test clean

install: $(STAMP)

# nnU-Net v2 in its own venv (torch pinned): the reference of the tests of `medseg bundle import-nnunet`
NNUNET_VENV := .venv-nnunet
NNUNET_STAMP := $(NNUNET_VENV)/.installed

nnunet-peer: $(NNUNET_STAMP)

$(NNUNET_STAMP): $(STAMP) scripts/nnunet_peer.py
	$(BIN)/python scripts/nnunet_peer.py --install $(NNUNET_VENV)
	touch $(NNUNET_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: the local CPU wheel; an unpinned torch would pull several GB of CUDA packages
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# the optional extras the tests cover: ray (medseg predict --engine ray, tests/integration/test_predict_ray.py)
	$(BIN)/python -m pip install --quiet -e ".[test,ray]"
	touch $(STAMP)

demo: install
	$(BIN)/medseg demo --out demo-run

system-deps:
	bash scripts/install_system_deps.sh

# static checks (config in pyproject.toml): ruff's rule set, mypy strict on the package, the import layers
lint: install
	$(BIN)/ruff check medseg tests scripts
	$(BIN)/mypy medseg
	$(BIN)/lint-imports

test: install system-deps nnunet-peer lint
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) $(NNUNET_VENV) demo-run .pytest_cache .mypy_cache .ruff_cache .import_linter_cache

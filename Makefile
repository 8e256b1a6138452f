# `make demo` and `make test` work on a fresh clone: both create .venv and install the pinned set.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A machine whose NVIDIA driver answers (`nvidia-smi -L`) gets TensorFlow's CUDA build (the `gpu`
# extra), any other the CPU build. The stamp names the choice: a venv made for the other reinstalls.
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu)
comma := ,
EXTRAS := test,jpeg$(if $(GPU),$(comma)gpu)
STAMP := $(VENV)/.installed-$(or $(GPU),cpu)
DEMO := work/demo

.PHONY: install test lint demo clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# requirements.lock pins every package (tested set); pyproject.toml holds the ranges.
	$(BIN)/pip install --quiet -c requirements.lock -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

test: install
	# the style first: formatting and lint (pyflakes, import order, bugbear, complexity), as
	# configured in pyproject.toml
	$(BIN)/ruff format --check --quiet .
	$(BIN)/ruff check --quiet .
	# two workers, a test file each at a time, longest first (tests/conftest.py): 2 cores, some
	# tests using one; `pytest` alone runs the same tests one after another
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# The whole protocol (5 folds x 3 networks x 8 phases) on the tiny synthetic data, local Ray,
# MLflow on work/demo/mlflow.db; prints the results and the command that opens the MLflow UI.
# With GPUs (the CUDA build), one run per GPU; else two at a time on the CPU cores. (Comments out
# here: make echoes a recipe's comment lines.)
demo: install
	$(BIN)/cxr run --config configs/demo.yaml

clean:
	rm -rf $(VENV) work .pytest_cache

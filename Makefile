# `make demo` and `make test` work on a fresh clone: both create .venv and install the pinned set.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO := work/demo

.PHONY: install test demo clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# requirements.lock pins every package (tested set); pyproject.toml holds the ranges.
	$(BIN)/pip install --quiet -c requirements.lock -e '.[test,jpeg]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/cxr synth --out $(DEMO)/data --scale tiny --seed 0
	$(BIN)/cxr manifest --covid-root $(DEMO)/data/covid-chestxray-dataset \
		--rsna-root $(DEMO)/data/rsna-pneumonia-detection-challenge --out $(DEMO)/manifest.csv
	$(BIN)/cxr prepare --config configs/demo.yaml --manifest $(DEMO)/manifest.csv --out $(DEMO)/store
	$(BIN)/cxr splits --config configs/demo.yaml --manifest $(DEMO)/manifest.csv --out $(DEMO)/splits
	$(BIN)/cxr train-one --config configs/demo.yaml --fold 1 --network xception
	@echo "MLflow UI on these runs: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(DEMO)/mlflow.db"

clean:
	rm -rf $(VENV) work .pytest_cache

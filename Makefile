# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Each creates or updates .venv itself.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/nllflow run experiments/gamma_lr_sweep.yaml

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

.PHONY: serve stop

# The deployment stack on this host: Prefect and MLflow servers on 127.0.0.1, the work pools, the
# deployments of prefect.yaml and a worker (python -m flows.serve --help). `make stop` ends it all.
serve: setup
	$(BIN)/python -m flows.serve start

stop:
	$(BIN)/python -m flows.serve stop

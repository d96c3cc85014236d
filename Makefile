# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Each creates or updates .venv itself.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test,postgres]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/nllflow run experiments/gamma_lr_sweep.yaml

# one test file per worker process (module-scoped servers stay in one process), at most 4 of them
test: setup lint
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations 15

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

.PHONY: serve stop

# The deployment stack on this host: Prefect and MLflow servers on 127.0.0.1, the work pools, the
# deployments of prefect.yaml and a worker (python -m nllflow.flows.serve --help). `make stop` ends it all.
# SERVE_ARGS passes options on: make serve SERVE_ARGS="--auth --host 10.0.0.5" (any host but loopback needs --auth)
SERVE_ARGS ?=
serve: setup
	$(BIN)/python -m nllflow.flows.serve start $(SERVE_ARGS)

stop:
	$(BIN)/python -m nllflow.flows.serve stop

# Two entry points: `make run` (pipeline on the default config) and `make test`.
# Both create .venv if missing and install torch's CPU wheel first (a bare `torch` pulls a CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.arbor-installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip show torch >/dev/null 2>&1 || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	ARBOR_PIPELINE_ID=$$(date +%Y%m%dT%H%M%S) PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow" -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.kernels --quick
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.tokens --quick

clean:
	rm -rf data models trees prefs metrics plots mlflow.db dvc.lock

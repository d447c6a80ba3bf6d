# The README's two commands: `make demo` and `make test`.
#   TORCH=torch==2.13.0   which torch to install when the venv has none (default: plain `torch`)
#   NO_APP=1              `make demo` stops after the report instead of opening the app
#   TEST_JOBS=2           pytest-xdist workers for `make test` (0: one process, no xdist)
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_ARGS ?=
PYTEST_ARGS ?=
TEST_JOBS ?= 2

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

# Two workers, one test file each at a time (the slow modules dealt first, tests/conftest.py).
# OMP_WAIT_POLICY=PASSIVE: libgomp's threads otherwise spin while they wait for work, so two
# torch processes on two cores slowed each other 5x (bench/omp_wait.py, 2 AVX2 cores: a
# training step 0.28 s alone, 1.50 s each with two at once; passive 0.49 s alone, 0.56 s each
# with two). Serially 21 min 11 s of pytest, with this 14 min 49 s (BENCHMARKS.md).
test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS)

# tests/ is not type-checked: Streamlit AppTest elements and pytest fixtures are untyped (about
# 100 union-attr / untyped-def errors, none about the package). Layers: import-linter contracts
# in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy workbench bench
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) cache workbench.db* reports test-artifacts

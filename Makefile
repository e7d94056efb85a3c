# The two commands: `make demo` (end-to-end demo on synthetic data) and `make test` (lint + tests).
# Each first creates or refreshes .venv (tools/bootstrap.sh; a no-op when nothing changed).
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-output

.PHONY: env demo test test-fast lint format bench bench-full clean

env:
	@bash tools/bootstrap.sh

demo: env
	$(BIN)/sarcube demo --out $(DEMO_OUT)

# Two pytest worker processes (pytest-xdist), whole files to each, heaviest first (the groups are
# set in tests/conftest.py): most tests wait on the child processes they start (Dask workers,
# torchrun ranks, S3 round trips), so one process leaves a core idle. PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),-p no:xdist,-n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: lint
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# The quick loop while developing: the unit tests (not marked slow or integration; see
# tests/conftest.py), under 2 minutes on 2 cores.
test-fast: env
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(XDIST) -m "not slow and not integration" $(PYTEST_ARGS)

# ruff (lint rules and the formatter's check) and mypy (pyproject.toml [tool.mypy]).
lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m mypy

format: env
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Every benchmark in its --quick mode (a smoke run: results go to benchmarks/results/*-quick.json);
# `make bench-full` for the figures the README quotes.
BENCHMARKS := ingest sampling shards loader train_step predict

bench: env
	for b in $(BENCHMARKS); do $(BIN)/python benchmarks/$$b.py --quick || exit 1; done

bench-full: env
	for b in $(BENCHMARKS); do $(BIN)/python benchmarks/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache

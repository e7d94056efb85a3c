# The two commands: `make demo` (end-to-end demo on synthetic data) and `make test` (lint + tests).
# Each first creates or refreshes .venv (tools/bootstrap.sh; a no-op when nothing changed).
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-output

.PHONY: env demo test test-fast lint format bench clean

env:
	@bash tools/bootstrap.sh

demo: env
	$(BIN)/sarcube demo --out $(DEMO_OUT)

test: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The quick loop while developing: everything but the tests marked slow (concurrency trials,
# fault injection, notebooks), about a third of the time.
test-fast: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: env
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: env
	for b in ingest sampling shards loader train_step predict; do $(BIN)/python benchmarks/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache

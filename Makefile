# Fresh machine: `make demo` (set up + run the embedded pipeline), `make test` (set up + tests).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .

demo: setup
	$(BIN)/python -m p3o_jax.main --config=configs/demo.py --workdir=runs/demo

test: setup
	$(BIN)/python -m pytest -n 2 tests

bench: setup
	$(BIN)/python bench/sampler.py --shape all

clean:
	rm -rf runs .pytest_cache

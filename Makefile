# Two commands do all set-up on a fresh machine:
#   make quickstart   run the quickstart (tokenizer -> data -> pretrain -> eval -> report)
#   make test         run the test suite
# Both create or reuse .venv, install torch pinned first (so pip never resolves a CUDA build),
# then slmkit with the extras they need.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
PYTEST_ARGS ?= -n auto -q -m "not slow"

.PHONY: quickstart test test-slow bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-quickstart: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[data,plot]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

quickstart: $(VENV)/.installed-quickstart
	$(BIN)/slmkit quickstart --out runs/quickstart --force

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m slow

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/bench_tokenizer.py --repeats 5

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis

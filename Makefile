# AIGC Platform — every target creates or reuses the virtualenv in $(VENV) first.
#   make demo       preprocess -> LoRA fine-tune -> sweep -> serve -> chat, on an embedded Ray cluster
#   make test       lint + every test tier (unit, integration on a local Ray cluster, slow end-to-end), what CI runs
#   make test-fast  unit tests only (no Ray cluster), for iteration: under 2 minutes
#   make test-slow  the slow end-to-end tests alone (the whole demo as a subprocess, the two-node cluster tests)
#   make test-cluster  README's "On a real cluster" on a two-node `ray start` cluster on this machine: every
#                   jobs/*.py as a Ray job, Train workers and Serve replicas on both nodes, aigc submit/jobs,
#                   serve deploy, aigc promote/rollback under traffic (part of `make test` and `make test-slow`)
#
# torch: on a machine without a GPU we pin the CPU wheel (small, no CUDA libraries);
# where `nvidia-smi` answers we install the default CUDA build. Override with TORCH=cpu|cuda.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH ?= $(shell (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1) && echo cuda || echo cpu)
CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast test-slow test-cluster lint format clean assets

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ "$(TORCH)" = "cuda" ]; then \
		echo "[setup] GPU found: installing the CUDA build of torch"; \
		$(PY) -m pip install -q "torch>=2.6"; \
	else \
		echo "[setup] no GPU: installing the CPU build torch==$(TORCH_CPU_VERSION)"; \
		$(PY) -m pip install -q --retries 1 --timeout 20 "torch==$(TORCH_CPU_VERSION)" \
			--extra-index-url $(TORCH_CPU_INDEX); \
	fi
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $@

demo: setup
	$(VENV)/bin/aigc demo --config $(CONFIG)

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-cluster: setup
	$(PY) -m pytest tests/test_cluster.py $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

# Rebuild the committed demo assets (tiny base model, demo dataset) from the project's own code.
assets: setup
	$(VENV)/bin/aigc build-assets

clean:
	rm -rf runs

# AIGC Platform — every target creates or reuses the virtualenv in $(VENV) first.
#   make demo       preprocess -> LoRA fine-tune -> sweep -> serve -> chat, on an embedded Ray cluster
#   make test       lint + every test tier (unit, integration on a local Ray cluster, slow end-to-end), what CI runs
#   make test-fast  unit tests only (no Ray cluster), for iteration: under 2 minutes
#   make test-slow  the slow end-to-end tests alone (the whole demo as a subprocess, the two-node cluster tests)
#   make test-cluster  docs/cluster.md's commands on a two-node `ray start` cluster on this machine: every
#                   jobs/*.py as a Ray job, Train workers and Serve replicas on both nodes, aigc submit/jobs,
#                   serve deploy, aigc promote/rollback under traffic (part of `make test` and `make test-slow`)
#
#   make docs       regenerate docs/configuration.md from the config schema's field descriptions
#
# Python 3.11 or newer is needed (the pinned dependencies require it); another interpreter: PYTHON=python3.12.
# torch: on a machine without a GPU we pin the CPU wheel (small, no CUDA libraries);
# where `nvidia-smi` answers we install the default CUDA build. Override with TORCH=cpu|cuda: an existing
# virtualenv keeps the build it has unless TORCH names the other one, which then replaces torch in it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# The build already installed (its stamp file), else what this machine has.
TORCH_INSTALLED := $(patsubst $(VENV)/.installed-%,%,$(firstword $(wildcard $(VENV)/.installed-*)))
TORCH_DETECTED = $(shell (command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1) && echo cuda || echo cpu)
TORCH ?= $(or $(TORCH_INSTALLED),$(TORCH_DETECTED))
STAMP := $(VENV)/.installed-$(TORCH)
CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=

.PHONY: setup demo demo-preference test test-fast test-slow test-cluster lint format clean assets docs check-python

setup: $(STAMP)

# The interpreter that will run the venv: the existing venv's, else $(PYTHON).
check-python:
	@py=$(PYTHON); if [ -x $(PY) ]; then py=$(PY); fi; \
	if ! $$py -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
		echo "[setup] Python 3.11 or newer is needed; $$py is $$($$py -V 2>&1 || echo missing)."; \
		echo "[setup] Install Python 3.11+, then: rm -rf $(VENV) && make setup PYTHON=python3.11"; \
		exit 1; \
	fi

# Quiet on purpose (the demo's console is part of the demo): one line per step, pip's own output only on errors.
$(STAMP): pyproject.toml constraints.txt | check-python
	@echo "[setup] $(VENV): installing the project and its dependencies (pip -q; minutes on a fresh clone)"
	@case "$(TORCH)" in cpu|cuda) ;; *) echo "[setup] TORCH must be cpu or cuda, got '$(TORCH)'"; exit 1;; esac
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@# Switching builds: pip sees torch==X installed and would keep it, whichever build it is.
	@if ls $(VENV)/.installed-* 2>/dev/null | grep -qv -- '-$(TORCH)$$'; then \
		echo "[setup] switching torch to the $(TORCH) build"; \
		$(PY) -m pip uninstall -q -y torch; rm -f $(VENV)/.installed-*; \
	fi
	@if [ "$(TORCH)" = "cuda" ]; then \
		echo "[setup] installing the CUDA build of torch"; \
		$(PY) -m pip install -q "torch>=2.6"; \
	else \
		echo "[setup] installing the CPU build torch==$(TORCH_CPU_VERSION)"; \
		$(PY) -m pip install -q --retries 1 --timeout 20 "torch==$(TORCH_CPU_VERSION)" \
			--extra-index-url $(TORCH_CPU_INDEX); \
	fi
	@$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	@rm -f $(VENV)/.installed
	@touch $@
	@echo "[setup] done"

demo: setup
	$(VENV)/bin/aigc demo --config $(CONFIG)

# One preference round on the tiny model: SFT -> served with capture -> rated answers -> pairs -> DPO -> aigc eval.
demo-preference: setup
	$(VENV)/bin/aigc demo-preference --config $(CONFIG)

test: lint
	$(PY) -m pytest --durations=20 $(PYTEST_ARGS)

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

# The configuration reference is generated from the schema; tests/test_docs.py fails when it is stale.
docs: setup
	PYTHONPATH=platform $(PY) -m aigc.config.reference > docs/configuration.md

clean:
	rm -rf runs

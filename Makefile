# snvbert — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# faiss-gpu when a GPU answers nvidia-smi, faiss-cpu otherwise; `make install FAISS=cpu|gpu` overrides.
FAISS ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(FAISS)
APT_TOOLS := bcftools tabix
PYTEST_ARGS ?=

.PHONY: help install tools baselines demo test test-slow bench bench-accuracy bench-transfer pretrained lint clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  \033[36m%-15s\033[0m %s\n", $$1, $$2}'

install: $(STAMP) tools ## Create .venv with torch (CPU build unless a GPU is found), faiss and snvbert

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	@if [ "$(FAISS)" = gpu ]; then other=faiss-cpu; else other=faiss-gpu-cu12; fi; \
	  $(PIP) uninstall -q -y $$other faiss-gpu faiss-cpu >/dev/null 2>&1 || true
	$(PIP) install -q -e ".[faiss-$(FAISS),sweep,workflow,cluster,dev]"
	rm -f $(VENV)/.installed-*
	touch $@

tools: ## Install the htslib tools (bcftools, tabix/bgzip) from Debian if missing
	@missing=""; for t in bcftools bgzip tabix; do command -v $$t >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing $(APT_TOOLS) from Debian"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(APT_TOOLS) >/dev/null; \
	fi

demo: install ## Simulate a small panel, train `small` on CPU, impute the array and score it
	$(PY) -m snvbert.demo

test: install ## Run the test suite (fast tests; slow ones: make test-slow)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install ## Run the slow end-to-end tests
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

baselines: ## Install what snvbert is measured against (Beagle 5.4, Minimac4) from Debian if missing
	@command -v beagle >/dev/null && command -v minimac4 >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq beagle minimac4 >/dev/null; }

bench: install baselines ## Benchmarks: impute wall time and RSS vs Beagle and Minimac4 (5 Mb), ingest, retrieval, encoder (outputs/bench/)
	$(PY) -m snvbert.bench

bench-accuracy: install baselines ## Long run: snvbert vs Beagle 5.4 vs Minimac4 on two simulated 5 Mb panels
	$(PY) -m snvbert.bench.accuracy --train-minutes 30 --bootstrap 100  # tuned on: seed 1, OutOfAfrica_3G09
	$(PY) -m snvbert.bench.accuracy --train-minutes 30 --bootstrap 100 --seed 2 --demography OutOfAfrica_2T12 --out outputs/bench/accuracy-confirm  # never tuned on

bench-transfer: install baselines ## Long run: the shipped model on scenarios it never saw (demography, panel size, array density) vs models trained there, Beagle, the HMM
	$(PY) -m snvbert.bench.transfer --source snvbert/pretrained/default.ckpt --bootstrap 100

pretrained: install ## Train the shipped default model from nothing (snvbert/pretrained/default.ckpt and its recipe, default.json)
	$(PY) -m snvbert.pretrained.make

.PHONY: wheel
wheel: ## Build outputs/dist/snvbert-*.whl, configs inside (install torch first, then the wheel)
	rm -rf build  # setuptools reuses build/lib: a module deleted since would land in the wheel
	$(PYTHON_SYS) -m pip wheel . --no-deps -w outputs/dist
	rm -rf build

lint: install ## Ruff lint and format check
	$(VENV)/bin/ruff check snvbert tests
	$(VENV)/bin/ruff format --check snvbert tests

clean: ## Remove the venv, caches and outputs
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache .snvbert_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

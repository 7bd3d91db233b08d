# Developer commands. CI runs .ci/run instead (a user-style, non-editable install).
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
PYTEST ?= pytest

.PHONY: install test test-triton compile-check gpu-check bench lint check format env

# The Python sources that ruff lints and formats (the same list as .ci/run).
PYTHON_SOURCES = fastdistill tests bench tools

# torch is pinned and installed first: left to resolve `torch` itself, pip pulls the multi-GB
# CUDA build. --no-build-isolation builds against the scikit-build-core/pybind11 installed here;
# rerun after changing csrc/ (editable installs do not rebuild the core on import).
install:
	$(PIP) install torch==2.13.0
	$(PIP) install "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
	$(PIP) install --no-build-isolation -e ".[test]"

test:
	$(PYTEST) -q

# Only the Triton kernels (CPU tensors, Triton interpreter; `make test` includes them too).
test-triton:
	TRITON_INTERPRET=1 $(PYTEST) -q tests -k triton

# Triton kernels compiled for sm_80/sm_90 without a GPU, registers and spills reported.
compile-check:
	$(PYTHON) -m tools.gpu.triton_compile_check

# On a GPU machine: CUDA build, GPU tests, GPU benchmark (bench/README.md).
gpu-check:
	bash tools/gpu/gpu_check.sh

bench:
	$(PYTEST) bench -q

lint:
	ruff check $(PYTHON_SOURCES)

# What .ci/run checks: lint findings and unformatted files both fail.
check:
	ruff check $(PYTHON_SOURCES)
	ruff format --check $(PYTHON_SOURCES)

format:
	ruff format $(PYTHON_SOURCES)
	ruff check --fix $(PYTHON_SOURCES)

env:
	$(PYTHON) -m fastdistill env

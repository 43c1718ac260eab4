# vlmrag — `make run` starts the service, `make test` passes the tests; each does its own set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.vlmrag-vllm-stamp
PYTEST_ARGS ?=

.PHONY: help venv vllm-venv browser postgres test test-fast lint run demo bench clean

help:
	@echo "make run        start vlmrag (settings from VLMRAG_* / .env; first run creates an admin key in .env)"
	@echo "make demo       start a tiny local vLLM (CPU, random weights) + vlmrag with tiny CLIP: no downloads"
	@echo "make test       create venvs, install everything, run the whole suite (unit, API, e2e, browser)"
	@echo "make test-fast  unit + API tests only (no vLLM, no browser, no child processes or real servers)"
	@echo "make lint       ruff + mypy"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(STAMP)

$(VLLM_STAMP): deploy/vllm/setup_cpu_venv.sh
	VLLM_VENV=$(VLLM_VENV) bash deploy/vllm/setup_cpu_venv.sh

vllm-venv: $(VLLM_STAMP)

browser:
	@command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium || \
	  { echo "installing Debian's chromium (browser tests)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "could not install chromium: browser tests will be skipped"; }

postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  { echo "installing Debian's postgresql (shared-state tests start their own server)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
	    || echo "could not install postgresql: its tests will be skipped"; }

test: venv vllm-venv browser postgres
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not e2e and not browser and not subprocess" $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check server retriever prompts tests
	$(PY) -m mypy server retriever

run: venv
	VLMRAG=$(VENV)/bin/vlmrag bash deploy/run.sh

demo: venv vllm-venv
	bash deploy/demo.sh

bench: venv vllm-venv
	# quick versions; full options and measured numbers: benchmarks/README.md
	$(PY) benchmarks/bench_search.py --sizes 1000,10000 --queries 100
	$(PY) benchmarks/bench_ingest.py
	$(PY) benchmarks/bench_service.py --requests 20
	$(PY) benchmarks/bench_rerank.py --rounds 2
	$(PY) benchmarks/bench_rerank.py --ranker --rounds 2
	$(PY) benchmarks/bench_support.py --quick
	$(PY) benchmarks/bench_ocr.py --quick

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache

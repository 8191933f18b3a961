# The two commands of the README: `make demo` and `make test`. Both create .venv,
# install the project into it, and start any of Redis, RabbitMQ, PostgreSQL that is down.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv services tools test demo proto proto-check lint bench bench-quick bench-micro loadtest clean

help:
	@echo "make demo         run the whole flow on the local services"
	@echo "make test         the test suite against the real services"
	@echo "make bench        the benchmark suite (bench-quick: under 3 minutes; bench-micro)"
	@echo "make loadtest     a Locust flash-sale rehearsal, verified afterwards"
	@echo "make proto        regenerate engine/pb from proto/"
	@echo "make lint         ruff and mypy"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) with $(PYTHON)"
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11+ is needed (found $(PYTHON))"; exit 1; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -q && apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV); \
		else $(PYTHON) -m pip install --user virtualenv && $(PYTHON) -m virtualenv $(VENV); fi; }
	@$(PY) -m pip install -q --upgrade pip
	@echo "==> installing the project and its test, bench and load extras"
	@$(PY) -m pip install -q -e '.[test,bench,load,dev]'
	@touch $(STAMP)

services: venv
	@echo "==> services"
	@$(PY) -m engine.devstack up

# promtool validates the alert rules in the tests (Debian's prometheus package; the
# server it ships is not started here).
tools:
	@command -v promtool >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "==> installing promtool (Debian package prometheus)"; \
			apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
				--no-install-recommends prometheus >/dev/null; \
			pkill -x prometheus 2>/dev/null || true; \
		else echo "promtool missing: apt-get install prometheus (its alert test will skip)"; fi; }

test: venv services tools
	@echo "==> tests"
	@$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: venv services
	@$(PY) -m engine.demo

proto: venv
	@proto/generate.sh

lint: venv
	@$(VENV)/bin/ruff check engine bench loadtest tests
	@$(VENV)/bin/mypy engine

bench: venv services
	@$(PY) -m bench

bench-quick: venv services
	@$(PY) -m bench --quick

bench-micro: venv services
	@$(VENV)/bin/pytest bench/micro --benchmark-only --benchmark-json=bench/results/micro.json -p no:cacheprovider -o addopts=""

clean:
	rm -rf $(VENV) build *.egg-info

# A flash-sale rehearsal: LOADTEST_ARGS="--users 5000 --run-time 60s --stock 500 --engine"
LOADTEST_ARGS ?= --users 2000 --spawn-rate 500 --run-time 30s --stock 300 --engine
loadtest: venv services
	@$(PY) -m loadtest.run $(LOADTEST_ARGS)

# The two commands of the README: `make demo` and `make test`. Both create .venv,
# install the project into it, and start any of Redis, RabbitMQ, PostgreSQL that is down.
SHELL := /bin/bash
# pyproject.toml: requires-python = ">=3.11,<3.13"
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The versions the tests last passed with (pip constraints); `make lock` refreshes it.
LOCK := requirements.lock
EXTRAS := .[test,bench,load,dev]
PYTEST_ARGS ?=

.PHONY: lock help venv services tools bench-tools test demo proto proto-check lint bench bench-quick bench-long bench-micro loadtest clean cluster-up cluster-down cluster-status bench-cluster chaos burst burst-quick burst-tools

help:
	@echo "make demo         run the whole flow on the local services"
	@echo "make test         the test suite against the real services"
	@echo "make bench        the benchmark suite: 3 alternating rounds, targets judged on their"
	@echo "                  spread (about 10 minutes; bench-quick: one round, not judged, under"
	@echo "                  4 minutes; bench-long: a 1,000,000-order soak per round; bench-micro:"
	@echo "                  pytest-benchmark; bench-cluster: one Redis Cluster drain against the"
	@echo "                  single Redis)"
	@echo "make loadtest     a Locust flash-sale rehearsal, verified afterwards"
	@echo "make burst        one sale end to end at rising offered rates, then 1,000,000 attempts"
	@echo "                  at the highest that held, 3 judged rounds at 75% of it against the"
	@echo "                  HTTP floor, and everyone cold: bench/results/burst-<time>.md, .json,"
	@echo "                  .png (under 10 minutes; burst-quick: a small sale, judges nothing)"
	@echo "make proto        regenerate engine/pb from proto/ (proto-check: is it fresh?)"
	@echo "make lint         ruff and mypy (CI runs it before the tests)"
	@echo "make chaos        every fault against a live sale, one after another: the scoreboard"
	@echo "                  in bench/results/chaos-<time>.md and .json (under 20 minutes)"
	@echo "make lock         re-resolve the dependencies into requirements.lock"
	@echo "make cluster-up   a local Redis Cluster (3 masters + 3 replicas, ports 7001-7006) and"
	@echo "                  RabbitMQ cluster (5681-5683) beside the single services"
	@echo "                  (cluster-status, cluster-down)"
	@echo "make clean        remove .venv and the build files"

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@echo "==> creating $(VENV) with $(PYTHON)"
	@$(PYTHON) -c 'import sys; sys.exit(not (3, 11) <= sys.version_info < (3, 13))' \
		2>/dev/null || { found=$$($(PYTHON) -V 2>&1) || found="no python3"; \
		echo "Python 3.11 or 3.12 is needed (pyproject.toml: >=3.11,<3.13), found: $$found." \
			"Install python3.11 or run: make PYTHON=/path/to/python3.11"; exit 1; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -q && apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV); \
		else $(PYTHON) -m pip install --user virtualenv && $(PYTHON) -m virtualenv $(VENV); fi; }
	@$(PY) -m pip install -q --upgrade pip
	@echo "==> installing the project and its test, bench and load extras (versions: $(LOCK))"
	@$(PY) -m pip install -q -c $(LOCK) -e '$(EXTRAS)'
	@touch $(STAMP)

services: venv
	@echo "==> services"
	@$(PY) -m engine.admin.devstack up

# Command-line tools from Debian, installed as root when missing, else a hint: promtool
# validates the alert rules in the tests (package prometheus), wrk loads the HTTP gate in
# the benchmark. Services a package ships are kept from starting during the install
# (policy-rc.d exit 101, ours only if there was none), so nothing is stopped afterwards:
# a prometheus already running here is not ours to touch.
POLICY_RC_D := /usr/sbin/policy-rc.d
# $(call apt_tool,command,package,what happens without it)
define apt_tool
	@command -v $(1) >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "==> installing $(1) (Debian package $(2))"; ours=; \
			if [ ! -e $(POLICY_RC_D) ]; then \
				printf '#!/bin/sh\nexit 101\n' > $(POLICY_RC_D) && chmod 755 $(POLICY_RC_D) && ours=1; \
			fi; \
			apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
				--no-install-recommends $(2) >/dev/null; rc=$$?; \
			[ -z "$$ours" ] || rm -f $(POLICY_RC_D); exit $$rc; \
		else echo "$(1) missing: apt-get install $(2) ($(3))"; fi; }
endef

tools:
	$(call apt_tool,promtool,prometheus,its alert test will skip)

bench-tools:
	$(call apt_tool,wrk,wrk,the HTTP benchmark falls back to a Python client)
	$(call apt_tool,redis-benchmark,redis-tools,python -m bench.gatescript needs it)

test: venv services tools
	@echo "==> tests"
	@$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: venv services
	@$(PY) -m engine.demo

proto: venv
	@proto/generate.sh

# Regenerates into a temporary directory and diffs with the committed engine/pb.
proto-check: venv
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && PYTHON=$(PY) proto/generate.sh "$$tmp" && \
	for f in event_pb2.py event_pb2.pyi; do \
		diff -u "engine/pb/$$f" "$$tmp/$$f" || { echo "engine/pb/$$f is stale: make proto"; exit 1; }; \
	done && echo "engine/pb is fresh"

# Resolve the newest versions pyproject.toml allows in a scratch venv and record them:
# run it, then `make test`, and commit requirements.lock with what passed.
lock:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	echo "==> resolving $(EXTRAS) in a scratch venv" && \
	$(PYTHON) -m venv "$$tmp/venv" && "$$tmp/venv/bin/pip" install -q --upgrade pip && \
	"$$tmp/venv/bin/pip" install -q '$(EXTRAS)' && \
	{ echo "# pip constraints: the versions \`make test\` last passed with. Refresh: make lock"; \
	  "$$tmp/venv/bin/pip" freeze --exclude-editable | grep -v '^seckill-engine'; } > $(LOCK) && \
	echo "==> $(LOCK): $$(grep -vc '^#' $(LOCK)) packages"

lint: venv
	@$(VENV)/bin/ruff check engine bench loadtest tests
	@$(VENV)/bin/mypy engine

bench: venv services bench-tools
	@$(PY) -m bench

bench-quick: venv services bench-tools
	@$(PY) -m bench --quick

bench-long: venv services bench-tools
	@$(PY) -m bench --long

# The burst's load generator is C (bench/loadgen.c), built by bench/burst.py with cc.
burst-tools:
	$(call apt_tool,cc,gcc libc6-dev,bench/burst.py cannot build its load generator)

burst: venv services burst-tools
	@$(PY) -m bench.burst

burst-quick: venv services burst-tools
	@$(PY) -m bench.burst --quick

# CHAOS_ARGS="--only network" runs the faults whose name contains a word (--list: names)
CHAOS_ARGS ?=
chaos: venv services
	@$(PY) -m bench.chaos $(CHAOS_ARGS)

bench-micro: venv services
	@$(VENV)/bin/pytest bench/micro --benchmark-only --benchmark-json=bench/results/micro.json -p no:cacheprovider -o addopts=""

clean:
	rm -rf $(VENV) build *.egg-info

# A flash-sale rehearsal: LOADTEST_ARGS="--users 5000 --run-time 60s --stock 500 --engine"
# Fails, each reason printed, on any 5xx or timeout, failures above --max-failure-ratio
# (default 0.001), Locust itself failing, or a violated invariant (loadtest/judge.py, verify.py).
LOADTEST_ARGS ?= --users 2000 --spawn-rate 500 --run-time 30s --stock 300 --engine
# Locust's users log in: tokens minted from the development key of `seckill keys init`
loadtest: venv services
	@$(VENV)/bin/seckill keys init >/dev/null
	@SECKILL_BFF_AUTH=jwt SECKILL_BFF_JWKS=.seckill/keys/jwks.json \
	  SECKILL_LT_SIGNING_KEY=.seckill/keys/private/signing-key.json \
	  $(PY) -m loadtest.run $(LOADTEST_ARGS)

# Local clusters beside the single services (engine/testing/clusters.py): Redis Cluster
# on 7001-7006, RabbitMQ nodes on 5681-5683 (distribution ports 25681-25683), in
# /tmp/seckill-clusters. CLUSTER_ARGS=--no-rabbitmq for the Redis Cluster alone.
CLUSTER_ARGS ?=
cluster-up: venv
	@$(PY) -m engine.testing.clusters up $(CLUSTER_ARGS)

cluster-down: venv
	@$(PY) -m engine.testing.clusters down

cluster-status: venv
	@$(PY) -m engine.testing.clusters status

# The engine on a local 3-master Redis Cluster against the single Redis, 100 sales
# (bench/cluster.py; results in bench/results/cluster-<time>.json).
bench-cluster: venv services
	@$(PY) -m bench.cluster

# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
IS_ROOT := $(shell [ "$$(id -u)" = 0 ] && echo yes)
comma := ,
# libvirt-python builds against libvirt-dev, which only root can install here.
TEST_EXTRAS := host,postgres,plot,dev$(if $(IS_ROOT),$(comma)libvirt)

.PHONY: demo test lint bench system-deps clean help

help:
	@echo "make demo   - set up and run the demo (SQLite, simulated hypervisor, servers on loopback)"
	@echo "make test   - set up, lint and run the whole test suite"
	@echo "make lint   - ruff (lint + format check) and mypy --strict"
	@echo "make bench  - run the benchmarks in bench/ (results: docs/benchmarks.md)"

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

$(VENV)/.installed-demo: pyproject.toml $(VENV)/.created
	$(PIP) install -q -e '.[host]'
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.created
	$(PIP) install -q -e '.[$(TEST_EXTRAS)]'
	touch $@

system-deps:
	bash scripts/install-system-deps.sh

demo: $(VENV)/.installed-demo
	$(VENV)/bin/host-engine demo

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: system-deps $(VENV)/.installed-test lint
	$(PY) -m pytest

bench: system-deps $(VENV)/.installed-test
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

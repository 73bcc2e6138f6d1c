# zhuge: one entry point for people and CI. Works with or without an activated venv.
PYTHON ?= .venv/bin/python
ZHUGE  := $(PYTHON) -m app.cli
STAMP  := .venv/.zhuge-installed

.PHONY: help install demo test test-unit test-integration test-faults test-lab services-up services-down services-status readme-settings

help:
	@echo "make install | demo | test | test-unit | test-integration | test-faults | test-lab | services-up | services-down | services-status | readme-settings"

# A fresh machine: system packages (redis-server, Java, Maven, Prometheus), then .venv with the project.
install: $(STAMP)

$(STAMP): pyproject.toml
	bash ops/install-system-deps.sh
	[ -x .venv/bin/python ] || python3 -m venv .venv
	.venv/bin/python -m pip install -q -U pip
	.venv/bin/python -m pip install -q -e ".[test,report]"
	.venv/bin/python -m app.cli lab image  # the QEMU lab's guest image, built once and cached
	touch $(STAMP)

demo: $(STAMP)
	$(ZHUGE) demo

# two lanes at once (ops/test-in-two-lanes.sh): the lab and fault tests, and everything else
test: $(STAMP)
	bash ops/test-in-two-lanes.sh $(PYTHON)

test-unit: $(STAMP)
	$(PYTHON) -m pytest -q -m "not gpu and not integration" tests

test-integration: $(STAMP)
	$(PYTHON) -m pytest -q -m "integration and not gpu" tests

test-faults: $(STAMP)
	$(PYTHON) -m pytest -q -s -m "faults" tests/faults

test-lab: $(STAMP)
	$(PYTHON) -m pytest -q -s -m "lab" tests

services-up: $(STAMP)
	$(ZHUGE) services up

services-down:
	$(ZHUGE) services down

services-status:
	$(ZHUGE) services status

readme-settings:
	$(PYTHON) ops/readme_settings.py

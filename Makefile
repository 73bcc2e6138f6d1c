# zhuge: one entry point for people and CI. Works with or without an activated venv.
PYTHON ?= $(shell [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3)
ZHUGE  := $(PYTHON) -m app.cli

.PHONY: help install demo test test-unit test-integration services-up services-down services-status readme-settings

help:
	@echo "make install | demo | test | test-unit | test-integration | services-up | services-down | services-status | readme-settings"

install:
	[ -x .venv/bin/python ] || python3 -m venv .venv
	.venv/bin/python -m pip install -U pip
	.venv/bin/python -m pip install -e ".[test]"

demo:
	$(ZHUGE) demo

test:
	$(PYTHON) -m pytest -q -m "not gpu" tests

test-unit:
	$(PYTHON) -m pytest -q -m "not gpu and not integration" tests

test-integration:
	$(PYTHON) -m pytest -q -m "integration and not gpu" tests

services-up:
	$(ZHUGE) services up

services-down:
	$(ZHUGE) services down

services-status:
	$(ZHUGE) services status

readme-settings:
	$(PYTHON) ops/readme_settings.py

# The three things a user does: set up, run the pipeline locally, test it.
SHELL := /bin/bash
VENV := .venv
K2 := $(VENV)/bin/k2
PYTEST := $(VENV)/bin/pytest

.PHONY: setup run test test-unit stop clean

setup:
	@bash scripts/setup.sh

run: setup
	$(K2) run

# The fast tests first: a broken unit fails the run in seconds, not after the stack tests.
test: setup
	$(PYTEST) tests/unit tests/dags tests/integration

test-unit: setup
	$(PYTEST) tests/unit tests/dags

stop:
	-$(K2) local down

clean: stop
	rm -rf .k2

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

# Two lanes on two workers (tests/conftest.py); prints the wall time at the end.
test:
	@bash scripts/test.sh

test-unit: setup
	$(PYTEST) tests/unit tests/dags

stop:
	-$(K2) local down

clean: stop
	rm -rf .k2

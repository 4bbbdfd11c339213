# The two commands of the README: `make demo` and `make test` (each installs first).
PYTHON ?= python3
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup demo test

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

demo: setup
	$(PYTHON) -m raycompat demo

test: setup
	$(PYTHON) -m pytest -q

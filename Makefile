# tenfold: `make up` runs the reference job, `make test` the suite.
# Both create .venv and install what they need on first use.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: setup up test test-all lint bench clean

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tenfold needs Python 3.11+, found " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

# Embedded mode: arena on http://127.0.0.1:8000 with SQLite shards under ./data,
# in-process events and cache; nothing else to run. Ctrl-C drains and stops.
up: setup
	$(BIN)/tenfold up arena

test: setup
	$(BIN)/python -m pytest

# Includes the long soak and fault runs kept out of the default suite.
test-all: setup
	$(BIN)/python -m pytest -m "slow or not slow"

lint: setup
	$(BIN)/ruff format --check src tests benchmarks apps
	$(BIN)/ruff check src tests benchmarks apps
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m benchmarks issue2
	$(BIN)/python -m benchmarks issue3
	$(BIN)/python -m benchmarks issue4

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache

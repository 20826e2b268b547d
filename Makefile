# The README's two commands. Everything a fresh machine needs is installed from here.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test run install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

run: $(STAMP)
	@echo "make run arrives with the sidecar (issue: the ext_proc sidecar behind a real Envoy)."
	@echo "Until then: $(BIN)/pluginchain validate examples/chain.yaml"
	@echo "            $(BIN)/pluginchain plan examples/chain.yaml"

clean:
	rm -rf $(VENV) build *.egg-info sidecar/*.egg-info

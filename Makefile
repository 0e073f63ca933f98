# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the stamp changes when the requirements change, so a stale environment is refreshed
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-dev.txt | md5sum | cut -c1-10)

.PHONY: demo test lint bench env clean

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m advantage demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

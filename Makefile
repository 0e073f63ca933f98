# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the stamp changes when the requirements change, so a stale environment is refreshed
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-dev.txt | md5sum | cut -c1-10)
# The vLLM (+ TRL, for the benchmark) environment is big and slow to install: it is cached
# outside the clone, keyed on its requirements. The clone's source is used through PYTHONPATH.
CACHE ?= $(HOME)/.cache/advantage
VLLM_VENV := $(CACHE)/venvs/vllm-$(shell cat pyproject.toml requirements-dev.txt requirements-vllm.txt | md5sum | cut -c1-10)
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test lint bench env vllm-env chromium screenshot chain clean

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

$(VLLM_STAMP): pyproject.toml requirements-dev.txt requirements-vllm.txt
	rm -rf $(VLLM_VENV) && $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt -r requirements-vllm.txt '.[dev]'
	# their PyPI builds break `import transformers` beside the CPU torch
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

env: $(STAMP)

vllm-env: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/python -m advantage demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Debian's chromium renders the report page in a test (and takes the README's screenshot)
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: lint $(VLLM_STAMP) chromium
	$(BIN)/python -m pytest --ignore=tests/test_vllm.py
	PYTHONPATH=src $(VLLM_VENV)/bin/python -m pytest -m vllm tests/test_vllm.py

RUN ?= runs/demo
screenshot: chromium
	chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
	  --disable-component-update --disable-sync --user-data-dir=$$(mktemp -d) --window-size=1400,2000 \
	  --screenshot=$(RUN)/report/screenshot.png $(RUN)/report/index.html

chain: $(STAMP)
	$(BIN)/python -m advantage chain

bench: $(VLLM_STAMP)
	PYTHONPATH=src $(VLLM_VENV)/bin/python benchmarks/bench_grpo.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Two commands: `make demo` runs the pipeline on the bundled sample and writes its report,
# `make test` the tests.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lowlm run configs/demo-base.yaml
	$(BIN)/lowlm run configs/demo.yaml
	$(BIN)/lowlm generate configs/demo.yaml --greedy --max-new-tokens 40 -p "什麼是試算表？"
	$(BIN)/lowlm report runs/demo

# The report tests render the page in headless Chromium: Debian's package, installed here when
# absent and possible (root with apt); the tests skip, saying why, where it is not.
# The executor tests of `lowlm prepare` skip, saying why, without Ray (the `ray` extra: pip
# install -e '.[ray]') or Debian's Slurm daemons (run as root); .ci/run installs both.
test: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || true
	$(BIN)/python -m pytest

# The tests a developer runs while working (under a minute): no multi-process or whole-pipeline test.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean:
	rm -rf runs .pytest_cache

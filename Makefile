# Two commands do all the set-up on a machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DCLINT_VERSION := 3.1.0
DCLINT := .tools/node_modules/.bin/dclint

.PHONY: venv demo test lint unit tools bench clean

venv: $(STAMP)

# Pinned by constraints.txt so a fresh clone installs what CI tested; refresh it with `make constraints`.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: venv
	$(BIN)/archiver demo

# Archive readers (unzip, 7z, bsdtar) for the tests and dclint for the compose file.
tools: $(DCLINT)
	scripts/ensure-tools.sh

$(DCLINT):
	npm install --silent --no-audit --no-fund --prefix .tools dclint@$(DCLINT_VERSION)

lint: venv tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile
	$(DCLINT) docker-compose.yml
	$(BIN)/cfn-lint deploy/archiver.yaml

unit: venv tools
	$(BIN)/pytest

test: lint unit

bench: venv
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[bench]'
	$(BIN)/python -m bench

constraints: venv
	$(BIN)/python -m pip freeze --exclude-editable > constraints.txt

clean:
	rm -rf $(VENV) .tools .mypy_cache .pytest_cache .ruff_cache .hypothesis

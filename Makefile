# Two commands do all the set-up on a machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DCLINT_VERSION := 3.1.0
DCLINT := .tools/node_modules/.bin/dclint

.PHONY: venv demo test lint unit tools localstack bench mutation mutation-venv clean

venv: $(STAMP)

# Pinned by constraints.txt so a fresh clone installs what CI tested; refresh it with `make constraints`.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# LocalStack for tests/test_localstack.py, in a venv of its own: LocalStack 2026.3 runs on Python 3.13 only,
# taken from pyenv (its `python3.13` shim does not select it). The newest 3.13 there, unless given.
LOCALSTACK_VENV := .localstack-venv
LOCALSTACK_STAMP := $(LOCALSTACK_VENV)/.installed-stamp
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo "$$HOME/.pyenv")
LOCALSTACK_PYTHON ?= $(shell ls -d $(PYENV_ROOT)/versions/3.13*/bin/python3.13 2>/dev/null | sort -V | tail -n 1)

localstack: $(LOCALSTACK_STAMP)

$(LOCALSTACK_STAMP): tests/localstack/requirements.txt tests/localstack/constraints.txt
	@if [ ! -x "$(LOCALSTACK_PYTHON)" ]; then \
		echo "make localstack: no Python 3.13 at $(PYENV_ROOT)/versions/3.13*/bin/python3.13;" \
			"install one (pyenv install 3.13) or pass LOCALSTACK_PYTHON=/path/to/python3.13" >&2; \
		exit 1; \
	fi
	rm -rf $(LOCALSTACK_VENV)
	$(LOCALSTACK_PYTHON) -m venv $(LOCALSTACK_VENV)
	$(LOCALSTACK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCALSTACK_VENV)/bin/python -m pip install --quiet -c tests/localstack/constraints.txt \
		-r tests/localstack/requirements.txt
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

# pytest runs in PYTEST_WORKERS processes, each test file in one of them (a file's module-scoped servers,
# LocalStack's among them, start once): the tests wait on servers, workers and timeouts more than they
# compute, so 3 on these 2 cores beat 2 (docs/development.md, Test time). The mutation run (a few
# minutes, mostly CPU) goes on beside them. Either one failing fails `make test`.
PYTEST_WORKERS ?= 3

unit: venv tools localstack mutation-venv
	@$(MUTATION_VENV)/bin/python scripts/mutation.py > mutants.log 2>&1 & mutation=$$!; \
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile; tests=$$?; \
	wait $$mutation; mutated=$$?; \
	echo "--- make mutation, run beside pytest (whole output: mutants.log)"; tail -n 1 mutants.log; \
	if [ $$mutated -ne 0 ]; then cat mutants.log; fi; \
	[ $$tests -eq 0 ] && [ $$mutated -eq 0 ]

test: lint unit

bench: venv
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[bench]'
	$(BIN)/python -m bench

constraints: venv mutation-venv localstack
	{ $(BIN)/python -m pip freeze --exclude-editable; \
		$(MUTATION_VENV)/bin/python -m pip freeze --exclude-editable; } | sort -fu > constraints.txt
	{ echo "# Every package of $(LOCALSTACK_VENV), pinned so a fresh clone installs what CI tested."; \
		$(LOCALSTACK_VENV)/bin/python -m pip freeze; } > tests/localstack/constraints.txt

# Mutation testing of the decision code (scripts/mutation.py, docs/mutation.md), in a venv of its own:
# mutmut brings rich, with which structlog renders every logged traceback with its locals, which slowed
# tests of the suite that log errors by seconds each. `make test` runs it beside pytest (unit, above).
MUTATION_VENV := .venv-mutation
MUTATION_STAMP := $(MUTATION_VENV)/.installed-stamp

mutation-venv: $(MUTATION_STAMP)

$(MUTATION_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(MUTATION_VENV)
	$(MUTATION_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MUTATION_VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[dev,mutation]'
	touch $@

mutation: $(MUTATION_STAMP)
	$(MUTATION_VENV)/bin/python scripts/mutation.py

clean:
	rm -rf $(VENV) $(LOCALSTACK_VENV) $(MUTATION_VENV) mutants .tools .mypy_cache .pytest_cache .ruff_cache \
		.hypothesis

# keeper — set-up, demo and tests. Needs only python3 (3.11+) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint bench constraints clean

# The venv is (re)built whenever the dependency pins change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m keeper.demo

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check keeper tests
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/keeper bench

constraints:
	$(BIN)/python -m pip freeze --exclude-editable | grep -vi '^keeper' > constraints.txt

clean:
	rm -rf $(VENV) var/demo .pytest_cache

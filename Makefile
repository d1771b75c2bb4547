# make run   : set up .venv if needed, then search all five models, retrain the best, write the report
# make test  : set up .venv if needed, then run the test suite
# Extra options go through ARGS, e.g. make run ARGS="--dataset imagefolder --data-root DIR --n-trials 10"

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/stl10-search run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) report logs artifacts studies.db studies.db-* studies.db.*.lock

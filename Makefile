# The two commands a newcomer needs: `make demo` and `make test`. Each creates .venv when missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test bench fuzz faults clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sevmigd demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/sevmigd bench --json bench.json $(BENCH_ARGS)

fuzz: $(STAMP)
	SEVMIGD_FUZZ_EXAMPLES=$${SEVMIGD_FUZZ_EXAMPLES:-10000} $(BIN)/python -m pytest -q -m fuzz tests/

faults: $(STAMP)
	$(BIN)/python -m sevmigd.bench.faults $(FAULTS_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis bench.json

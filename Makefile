# The two commands a newcomer needs: `make demo` and `make test`. Each creates .venv when missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test bench fuzz faults clean venv

venv: $(STAMP)

# setup.py builds the optional compiled PSP page loop (sevmigd/psp/_accel.c); a changed C file reinstalls.
$(STAMP): pyproject.toml setup.py sevmigd/psp/_accel.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sevmigd demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The QEMU peer baseline needs qemu-system-x86_64; install it when we can (root + apt), else the
# bench reports that section as skipped.
bench: $(STAMP)
	@command -v qemu-system-x86_64 >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null 2>&1)); } || true
	$(BIN)/sevmigd bench --json bench.json $(BENCH_ARGS)

fuzz: $(STAMP)
	SEVMIGD_FUZZ_EXAMPLES=$${SEVMIGD_FUZZ_EXAMPLES:-10000} $(BIN)/python -m pytest -q -m fuzz tests/

faults: $(STAMP)
	$(BIN)/python -m sevmigd.bench.faults $(FAULTS_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis bench.json

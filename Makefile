# Two commands are the whole set-up: `make demo` and `make test` (`make quick`: the fast tests).
# Each creates .venv when missing and installs what it needs. On the project's machines the
# CPU build of torch lies on disk as torch==2.13.0; override TORCH_SPEC elsewhere.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.memfit-installed
# pytest-xdist workers (one per core on the project's 2-core machines). Tests that share a
# module-scoped fixture run on one worker (tests/conftest.py groups them), so a module's profile
# is built once; WORKERS=0 runs the tests in this process.
WORKERS ?= 2
PYTEST := $(VENV)/bin/pytest -q -n $(WORKERS) --dist loadgroup

.PHONY: demo test quick lint typecheck unit bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/memfit demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PYTEST)

test: lint typecheck unit

# the tests not marked slow (no Hugging Face sweeps, no processes, no compile): for each change
quick: $(STAMP)
	$(PYTEST) -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_solver.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

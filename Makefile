# labd developer commands. `make help` lists them; `make demo` and `make test` are the two that matter.
# The venv is rebuilt only when pyproject.toml changes (the stamp file), so a second run is fast.

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The dashboard's browser assets (tools/build_assets.py): `npm ci` only when package-lock.json
# changed (its own stamp under node_modules/), then the dist files copied into the package.
ASSETS := src/labd/web/static/vendor/.built
PYTEST_ARGS ?=
# Only lint the trees that exist: git does not keep empty folders, and ruff fails on a missing path.
LINT_PATHS := $(wildcard src tests bench)

.PHONY: help demo test fuzz bench lint fmt clean install assets

help:
	@echo "make demo  - run the simulated lab in-process | make test - lint, type-check, import contracts, pytest"
	@echo "make fuzz  - property tests with random seeds and many examples (not part of make test)"
	@echo "make bench - run the benchmarks (bench/run.py)"
	@echo "make lint  - ruff, mypy and import contracts only"
	@echo "make fmt   - format and auto-fix with ruff"
	@echo "make assets - the dashboard's browser assets from npm (make demo and make test run it)"
	@echo "make clean - remove the venv and every cache"
	@echo "Variables: PY=$(PY) (interpreter for the venv), PYTEST_ARGS='...' (passed to pytest)"

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all,dev]'
	touch $@

$(ASSETS): package.json package-lock.json tools/build_assets.py
	$(PY) tools/build_assets.py
	touch $@

assets: $(ASSETS)

demo: $(STAMP) $(ASSETS)
	$(BIN)/labd demo

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy
	$(BIN)/lint-imports

test: $(STAMP) $(ASSETS) lint
	$(BIN)/pytest $(PYTEST_ARGS)

# Property and fuzz tests (marker `fuzz`) with random seeds and many more examples than the
# derandomized CI run, plus Schemathesis' stateful phase against a real `labd serve --demo`;
# a failure prints the input (pin it with @example) or the curl command that reproduces it.
# LABD_FUZZ_EXAMPLES sets the examples per HTTP route (default 300 here).
fuzz: $(STAMP) $(ASSETS)
	LABD_HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest -m fuzz -p no:cacheprovider --timeout=3600 $(PYTEST_ARGS)

bench: $(STAMP) $(ASSETS)
	$(BIN)/python bench/run.py

fmt: $(STAMP)
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache \
		.hypothesis .import_linter_cache node_modules src/labd/web/static/vendor
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast install bench clean paper

$(STAMP): pyproject.toml scripts/offline_plots.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python scripts/offline_plots.py
	touch $(STAMP)

install: $(STAMP)

## Run the study on the built-in synthetic-fundus data (the whole DVC pipeline).
demo: $(STAMP)
	@git rev-parse --verify HEAD >/dev/null 2>&1 || { echo "error: dvc needs a git repository with a commit; run 'git init && git add -A && git commit -m init' first" >&2; exit 2; }
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc status

## The paper's settings on real data (docs/paper-profile.md): make paper PROFILE=paper-aptos
## A profile is an overlay of params.yaml, run as a DVC experiment (`dvc exp run -S ...`): your params.yaml edits survive.
PROFILE ?= paper-aptos
paper: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dpcam profile $(PROFILE)

## Run the test suite (installs what it needs into .venv first).
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -p no:cacheprovider

## The developer's quick loop: the tests without the slow ones (marker slow: end-to-end runs, any test over ~3 s).
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -p no:cacheprovider -m "not slow"

## Benchmarks (slow; results go into docs/benchmarks.md by hand).
bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf data/prepared data/ldp models metrics reports mlruns .dvc/tmp

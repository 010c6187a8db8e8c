# The two commands of the README:
#   make run    install everything into .venv, fetch the weights the shipped rules need, run the service
#   make test   install everything plus the test tools into .venv, run the test suite
PYTHON ?= python3.11
VENV ?= .venv
PIP := $(VENV)/bin/pip
# A folder or URL laid out like weights/. Defaults to the offline mirror next to the checkout when there is one;
# empty means "download from the real sources".
WEIGHTS_MIRROR ?= $(wildcard ../shared/weights)
# What the shipped settings.toml uses, plus the BRISQUE model for the no-reference metric.
RUN_WEIGHTS ?= fsrcnn brisque
PYTEST_ARGS ?=

.PHONY: install install-test run test test-fast lint bench test-mutations clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(VENV)/bin/python
	$(PIP) install --quiet -c constraints.txt -e '.[all]'

install-test: $(VENV)/bin/python
	$(PIP) install --quiet -c constraints.txt -e '.[all,test]'

run: install
	$(VENV)/bin/upscaled weights fetch $(RUN_WEIGHTS) $(if $(WEIGHTS_MIRROR),--mirror $(WEIGHTS_MIRROR))
	$(VENV)/bin/upscaled check-config
	$(VENV)/bin/upscaled run

test: install-test
	$(VENV)/bin/ruff check bench daemon models tests benchmarks
	$(VENV)/bin/ruff format --check bench daemon models tests benchmarks
	$(VENV)/bin/python -m mypy
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The unit layer only (tests/unit): no subprocesses, no inotify, no sleeps.
test-fast: install-test
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/unit $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/python benchmarks/throughput.py

# The mutation guard (tests/mutations.py): each named one-line break of an invariant (tests/mutations.toml) is
# applied to a copy of the tree, and the tests listed beside it must catch it. MUTATION_ARGS: --only NAME,
# --no-baseline, --list, --every (see docs/reliability.md).
MUTATION_ARGS ?=
test-mutations: install-test
	$(VENV)/bin/python tests/mutations.py $(MUTATION_ARGS)

clean:
	rm -rf $(VENV) var inbox outbox archive failed

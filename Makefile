# The two commands of the README:
#   make run    install everything into .venv, fetch the weights the shipped rules need, run the service
#   make test   install everything plus the test tools into .venv, run the test suite
PYTHON ?= python3.11
VENV ?= .venv
PIP := $(VENV)/bin/pip
# A folder or URL laid out like weights/. Defaults to the offline mirror next to the checkout when there is one;
# empty means "download from the real sources".
WEIGHTS_MIRROR ?= $(wildcard ../shared/weights)
# What the shipped settings.toml uses (FSRCNN, and DITN_Real_x4 for photos), plus the BRISQUE model for the
# no-reference metric: `make run`'s check-config stops while a rule's weights are missing.
RUN_WEIGHTS ?= fsrcnn ditn-real-x4 brisque
PYTEST_ARGS ?=
# The extras `make run` installs; `make run EXTRAS=` installs the core alone (no torch: classical and OpenCV models).
EXTRAS ?= all
# `upscaled run` and `check-config` see the mirror as their weights_mirror setting, so that the hints they print
# (`upscaled weights fetch ... --mirror ...`) are the commands that work here.
RUN_ENV := $(if $(WEIGHTS_MIRROR),UPSCALED_WEIGHTS_MIRROR=$(abspath $(WEIGHTS_MIRROR)))

.PHONY: install install-test run test test-fast lint bench test-mutations clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# An install is stamped: the venv is reused as long as the stamp is newer than pyproject.toml and constraints.txt,
# so `make run` and `make test-fast` start in a second once it is up to date. The test install holds the run
# install's packages too, so it stamps both.
$(VENV)/.installed-run: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) install --quiet -c constraints.txt -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) install --quiet -c constraints.txt -e '.[all,test]'
	touch $@ $(VENV)/.installed-run

install: $(VENV)/.installed-run

install-test: $(VENV)/.installed-test

run: install
	$(VENV)/bin/upscaled weights fetch $(RUN_WEIGHTS) $(if $(WEIGHTS_MIRROR),--mirror $(WEIGHTS_MIRROR))
	$(RUN_ENV) $(VENV)/bin/upscaled check-config
	$(RUN_ENV) $(VENV)/bin/upscaled run

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

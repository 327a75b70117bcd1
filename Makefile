# dasslab: two commands, `make demo` and `make test`. Everything installs into .venv.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PROFILE ?= demo
RUN     ?=
PYTEST_ARGS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: setup demo test test-fast lab bench clean-runs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/dasslab run --profile $(PROFILE) $(if $(RUN),--run-dir $(RUN),)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

bench: setup
	$(PY) benchmarks/run_all.py

clean-runs:
	rm -rf runs/

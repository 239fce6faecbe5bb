# Two commands a new user needs: `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Label Studio (the slow round-trip test's real server) pins its own Django stack: a venv of its own.
LS_VENV  := .venv-ls
LS_STAMP := $(LS_VENV)/.installed-stamp

.PHONY: install label-studio demo test test-slow test-all lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,crf]'
	@touch $(STAMP)

install: $(STAMP)

# sentry-sdk 3 dropped an option Label Studio 1.23 passes at start-up
$(LS_STAMP):
	@test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install -q 'label-studio==1.23.2' 'sentry-sdk<3'
	@touch $(LS_STAMP)

label-studio: $(LS_STAMP)

demo: $(STAMP)
	$(VENV)/bin/wsss demo

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP) $(LS_STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: $(STAMP) $(LS_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/cams.py
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/label.py

clean:
	rm -rf demo-data demo-output mlflow.db mlartifacts .pytest_cache

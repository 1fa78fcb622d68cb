# Two commands do all the set-up: `make lab` and `make test` (see README.md).
VENV   := .venv
# Windows (make from Git Bash, MSYS2 or Chocolatey): the venv keeps its programs in Scripts/, and
# python3 is often the Microsoft Store stub there
ifeq ($(OS),Windows_NT)
PYTHON ?= python
BIN    := $(VENV)/Scripts
else
PYTHON ?= python3
BIN    := $(VENV)/bin
endif
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed
KERNEL := dkl-lib
PYTEST_ARGS ?=

.PHONY: lab test test-browser test-min report bench setup clean

setup: $(STAMP)

# (Re)install when requirements or packaging change; the venv is created when missing, and made again
# (--clear) when it has no working pip (a first attempt that failed half-way, e.g. without python3-venv).
$(STAMP): requirements.txt pyproject.toml
	@$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "dkl_lib needs Python >= 3.10, but $(PYTHON) is " + sys.version.split()[0] + ": run make again with PYTHON=python3.1x (a newer interpreter)")'
	@$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -e .
	$(PY) -m ipykernel install --user --name $(KERNEL) --display-name "Python (dkl_lib)" >/dev/null
	@touch $(STAMP)

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Only the real-browser tests (JupyterLab + headless Chromium; installs Chromium with apt-get if missing,
# and fails where it cannot, instead of skipping as make test does).
test-browser: export DKL_BROWSER_REQUIRED = 1
test-browser: $(STAMP)
	$(PY) -m pytest -m browser $(PYTEST_ARGS)

# The suite (less the browser tests) on the OLDEST releases requirements.txt admits, pinned in
# tests/min_versions.txt, on Python 3.10 (pyproject's lowest), in its own .venv-min. Not part of
# `make test`: the first run downloads torch 2.4.0 with ~2.5 GB of CUDA wheels. JUPYTER_PATH puts the
# min venv's own python3 kernel first, so the notebook tests run there too.
# The first Python 3.10 that runs: python3.10 on PATH, else a pyenv-installed 3.10 (or: make test-min MIN_PYTHON=...).
MIN_PYTHON ?= $(shell for p in python3.10 $(HOME)/.pyenv/versions/3.10*/bin/python3.10; do \
                $$p -c '' 2>/dev/null && { echo $$p; break; }; done)
MIN_VENV   := .venv-min
test-min:
	@test -x $(MIN_VENV)/bin/python || test -n "$(MIN_PYTHON)" || \
		{ echo "test-min needs Python 3.10: install it or set MIN_PYTHON=/path/to/python3.10" >&2; exit 1; }
	@test -x $(MIN_VENV)/bin/python || $(MIN_PYTHON) -m venv $(MIN_VENV)
	@$(MIN_VENV)/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 10), "$(MIN_VENV) is not Python 3.10: remove it, set MIN_PYTHON"'
	$(MIN_VENV)/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt -c tests/min_versions.txt
	$(MIN_VENV)/bin/python -m pip install --disable-pip-version-check -q --no-deps -e .
	JUPYTER_PATH=$(CURDIR)/$(MIN_VENV)/share/jupyter $(MIN_VENV)/bin/python -m pytest -m "not browser" $(PYTEST_ARGS)

# Execute every notebook in full (no FAST) and write HTML copies to reports/ (git-ignored).
# PLOTLY_RENDERER embeds plotly.js in the outputs, so the figures show in the offline HTML.
report: $(STAMP)
	@mkdir -p reports
	PLOTLY_RENDERER=plotly_mimetype+notebook $(BIN)/jupyter nbconvert --to html --execute \
		--ExecutePreprocessor.timeout=3600 --output-dir reports notebooks/[0-9][0-9]_*.ipynb

bench: $(STAMP)
	$(PY) benchmarks/bench_losses.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_host.py

clean:
	rm -rf .pytest_cache .hypothesis reports

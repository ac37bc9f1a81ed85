# Two commands do everything on a fresh machine: `make demo` (the dashboard on the tiny demo) and `make test`.
#
# Everything installs into a project virtual environment (.venv), never into the system Python: Debian and
# Ubuntu refuse `pip install` there (PEP 668, "externally-managed-environment"). Debian needs `python3-venv`.
# PYTHON picks the interpreter the environment is made from (3.11+).
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
TORCH_CPU ?= torch==2.13.0

.PHONY: setup demo test lint bench docs

$(VPY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "blipmon needs Python 3.11 or newer: make PYTHON=python3.11 ...")'
	@$(PYTHON) -m venv $(VENV) || { echo "could not create $(VENV): on Debian/Ubuntu install python3-venv (apt install python3-venv)" >&2; exit 1; }

# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
# The project as a plain path in a .pth (editable_mode=compat), as an installed package behaves: the default
# editable mode imports a finder in every Python process, ~16 ms of each start and of the dashboard's first frame.
# A setuptools without that mode gets the default.
$(VENV)/.setup-done: pyproject.toml | $(VPY)
	$(PIP) install --quiet --upgrade pip >/dev/null 2>&1 || true
	$(PIP) install --quiet "$(TORCH_CPU)"
	$(PIP) install --quiet -e ".[test]" --config-settings editable_mode=compat 2>/dev/null || $(PIP) install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.setup-done

demo: setup
	$(VPY) -m blipmon run tiny/blip2-opt --live

test: setup
	$(VPY) -m ruff check blipmon tests benchmarks
	$(VPY) -m ruff format --check blipmon tests benchmarks
	$(VENV)/bin/lint-imports
	$(VPY) -m pytest -q -p no:cacheprovider --durations=15

bench: setup
	$(VPY) benchmarks/overhead.py

# docs/configuration.md's table of keys, rendered from the schema (tests/unit/test_config_docs.py checks it).
docs: setup
	$(VPY) -m blipmon.core.config_docs

# Two commands do everything on a fresh machine: `make demo` (the dashboard on the tiny demo) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_CPU ?= torch==2.13.0

.PHONY: setup demo test lint bench

.setup-done: pyproject.toml
	$(PIP) install --quiet "$(TORCH_CPU)"
	$(PIP) install --quiet -e ".[test]"
	touch .setup-done

setup: .setup-done

demo: setup
	$(PYTHON) -m blipmon run tiny/blip2-opt --live

test: setup
	$(PYTHON) -m ruff check blipmon tests benchmarks
	$(PYTHON) -m ruff format --check blipmon tests benchmarks
	lint-imports
	$(PYTHON) -m pytest -q -p no:cacheprovider --durations=15

bench: setup
	$(PYTHON) benchmarks/overhead.py

# Triptych: `make run` starts the four services, `make test` runs the suite. Each creates .venv when needed.
PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# A CPU build from the local wheel cache by default; e.g. `make TORCH_SPEC='torch==2.13.0' run` to change it.
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.triptych-installed
HOST       ?= 127.0.0.1
PORT       ?= 8000
PYTEST_ARGS ?=

.PHONY: install run test lint format bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, so nothing later resolves it to a multi-GB CUDA build.
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/triptych serve all --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) -m bench.split_overhead
	$(PY) -m bench.throughput
	$(PY) -m bench.lora_mix --preset tiny --size 64 --steps 20
	$(PY) -m bench.lora_mix
	$(PY) -m bench.previews --steps 20 --requests 8 --reps 5
	$(PY) -m bench.soak

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

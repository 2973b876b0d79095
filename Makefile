# The two commands a user types: `make demo` and `make test`. Both install first.
PY := .venv/bin/python

.PHONY: setup demo test lint bench readme clean

setup:
	./setup.sh

demo: setup
	$(PY) pipeline.py --demo

test: setup
	$(PY) -m pytest

readme: setup
	$(PY) -m core.settings --readme docs/settings.md
	$(PY) -m core.settings --schema settings.schema.json

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf data results predictions .pytest_cache

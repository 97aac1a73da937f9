# The two commands a newcomer runs (see README):
#   make demo   set up everything and run the live demo
#   make test   run the default test suite
.PHONY: setup demo test test-slow lint typecheck bench

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/patchcast demo

test:
	.venv/bin/pytest

test-slow:
	.venv/bin/pytest -m slow

lint:
	.venv/bin/ruff check .

typecheck:
	.venv/bin/mypy

bench:
	.venv/bin/python bench/worker_throughput.py --quick

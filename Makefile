# The two commands a newcomer runs (see README):
#   make demo   set up everything and run the live demo
#   make test   set up what the tests need (quick when already done), then run the default test suite
.PHONY: setup demo test test-slow test-reliability lint typecheck imports bench

# Set-up runs again only when what it installs from changes; the stamp lives inside .venv, so a
# removed .venv is set up afresh.
STAMP := .venv/.patchcast-setup

$(STAMP): pyproject.toml scripts/setup.sh
	./scripts/setup.sh
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	.venv/bin/patchcast demo

test: $(STAMP)
	.venv/bin/pytest

test-slow: $(STAMP)
	.venv/bin/pytest -m slow

# The slow fault tests (10,000 hostile messages, 3x overload, 10 worker kills, broker restarts): ~6 min.
test-reliability: $(STAMP)
	.venv/bin/pytest -m slow tests/service

lint: $(STAMP)
	.venv/bin/ruff check .

typecheck: $(STAMP)
	.venv/bin/mypy

# The import contracts of pyproject.toml (docs/architecture.md, "Layers").
imports: $(STAMP)
	.venv/bin/lint-imports

bench: $(STAMP)
	.venv/bin/python bench/model_throughput.py --quick

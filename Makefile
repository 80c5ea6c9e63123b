.PHONY: setup demo test test-all lint bench

setup:
	bash scripts/setup.sh

DEMO_ARGS ?=

demo: setup
	.venv/bin/visionmoe demo $(DEMO_ARGS)

test: setup
	.venv/bin/python -m pytest -q -m "not slow"

test-all: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check src tests benchmarks examples

bench: setup
	.venv/bin/visionmoe bench

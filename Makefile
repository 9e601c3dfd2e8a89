# The two set-up commands a newcomer needs are `make demo` and `make test`; each prepares
# everything it needs first (scripts/bootstrap.sh).
VENV := .venv/bin
export PATH := $(CURDIR)/$(VENV):$(PATH)

.PHONY: bootstrap demo test lint typecheck unit bench-enroll clean

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	$(VENV)/python scripts/demo.py

lint: bootstrap
	$(VENV)/ruff check enrollment broker device_sdk firmware_sim tests scripts
	$(VENV)/ruff format --check enrollment broker device_sdk firmware_sim tests scripts

typecheck: bootstrap
	$(VENV)/mypy

unit: bootstrap
	$(VENV)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck unit

bench-enroll: bootstrap
	$(VENV)/python scripts/bench_enroll.py

clean:
	rm -rf .venv fleet-data demo-data .pytest_cache .mypy_cache .ruff_cache

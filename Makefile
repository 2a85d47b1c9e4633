# abstream: every target does its own set-up on a fresh machine (virtualenv, install, Kafka jars).
VENV      ?= .venv
PYTHON    ?= python3
BIN       := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test kafka-start kafka-stop bench clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(INSTALLED)

setup: $(INSTALLED)
	$(BIN)/python -c "from streams.local_kafka import DEFAULT_LIB_DIR, ensure_jars; print('kafka jars:', ensure_jars(DEFAULT_LIB_DIR))"
	sh infra/install-ops-tools.sh

## The main job: local broker, two workers, five simulated experiments, live view, reports.
demo: setup
	$(BIN)/abstream demo

## The whole test suite; the session starts one real broker and stops it at the end.
test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

kafka-start: setup
	$(BIN)/abstream kafka start

kafka-stop: setup
	$(BIN)/abstream kafka stop

## The benchmark (issue 10): its own broker, workers, paced load; writes bench/results.json (~9 min on 2 cores).
## Not part of `make test`. BENCH_ARGS='--only throughput' runs a part.
BENCH_ARGS ?=
bench: setup
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	-$(BIN)/abstream kafka stop
	rm -rf .abstream .pytest_cache

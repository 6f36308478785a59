# metarl-tf — every target creates/refreshes .venv first (idempotent: reinstalls only when
# pyproject.toml changed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PRESET ?= nav2d
BUNDLE ?= saved_models/nav2d-maml
PORT ?= 3000

.PHONY: venv test test-fast lint format train evaluate demo serve bench bento docker image-base image image-test fuzz load clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: venv  ## the whole suite (CPU, a few minutes)
	$(PY) -m pytest -q

test-fast: venv  ## skip tests marked slow
	$(PY) -m pytest -q -m "not slow"

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

train: venv  ## make train PRESET=nav2d-metasgd
	$(PY) -m metarl_tf train --preset $(PRESET)

evaluate: venv  ## make evaluate BUNDLE=saved_models/nav2d-maml
	$(PY) -m metarl_tf evaluate $(BUNDLE) --tasks 40 --episodes 20 --steps 3 --seed 1

demo: venv  ## start the service on the shipped bundle, adapt to new tasks over HTTP, stop
	$(PY) examples/demo.py

serve: venv  ## the adaptation service on http://127.0.0.1:$(PORT)
	METARL_BUNDLE=$${METARL_BUNDLE:-$(BUNDLE)} $(VENV)/bin/bentoml serve serving.service:AdaptationService --host 127.0.0.1 --port $(PORT)

bench: venv  ## speed of meta-training and of the service -> bench/results/*.json
	$(PY) bench/train_speed.py --json bench/results/bench_train_speed.json
	$(PY) bench/serve_latency.py --json bench/results/bench_serve_latency.json

bento: venv  ## Bento of the service with the shipped bundle
	$(VENV)/bin/bentoml build -f serving/bentofile.yaml .

docker:  ## needs a Docker engine (none runs on the development machines)
	docker build -t metarl-adaptation .

image-base: venv  ## Debian bookworm base image from debootstrap (root; no registry needed)
	$(PY) scripts/image.py base

image: venv  ## the Dockerfile built with buildah (chroot isolation) on the debootstrap base
	$(PY) scripts/image.py build

image-test: image  ## run the service in the image; from the host: /readyz, /adapt + /act, with and without a token
	$(PY) scripts/image.py test

fuzz: venv  ## schemathesis against a live service (~2 min); fails on any 5xx or schema violation
	$(PY) scripts/fuzz.py

load: venv  ## 16 clients for 60 s against a running service (URL=..., TOKEN=...)
	$(PY) bench/load.py --url $${URL:-http://127.0.0.1:$(PORT)} --clients 16 --seconds 60

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

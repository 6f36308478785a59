# metarl-tf — every target creates/refreshes .venv first (idempotent: reinstalls only when
# pyproject.toml changed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PRESET ?= nav2d
BUNDLE ?= saved_models/nav2d-maml
PORT ?= 3000

.PHONY: venv test test-fast lint format train evaluate demo serve bench bento docker clean

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

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# cls-ray: `make demo` and `make test` each set everything up from nothing first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The MLflow tracking server the tests start lives in its own virtualenv (tests/mlflow-server-constraints.txt says why).
MLFLOW_VENV := .venv-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.installed
APT_PACKAGES := dataset-fashion-mnist chromium libopencv-dev libturbojpeg0-dev pkg-config
# GPU tests need a CUDA device; `make test-gpu` runs them on a machine that has one. The slowest tests are listed
# at the end (CI budget: keep the whole run well under 30 minutes).
PYTEST_ARGS ?= -m "not gpu" --durations=15

.PHONY: setup demo test test-gpu lint format bench clean

setup: $(STAMP)

# Re-installs only when the dependency files change; apt runs only as root and only for missing packages.
$(STAMP): pyproject.toml constraints.txt
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "apt: installing $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	else echo "not root: skipping apt packages ($(APT_PACKAGES)); install them yourself if missing"; fi
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[test,dev,ffcv]'
	@touch $(STAMP)

$(MLFLOW_STAMP): tests/mlflow-server-constraints.txt
	@[ -x $(MLFLOW_VENV)/bin/python ] || $(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/python -m pip install -q --upgrade pip
	$(MLFLOW_VENV)/bin/python -m pip install -q -c tests/mlflow-server-constraints.txt mlflow
	@touch $(MLFLOW_STAMP)

demo: setup
	$(VENV)/bin/cls-ray demo --workdir demo_output

test: setup $(MLFLOW_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-gpu: setup
	$(PY) -m pytest -m gpu

lint: setup
	$(VENV)/bin/ruff check cls_ray tests benchmarks
	$(VENV)/bin/ruff format --check cls_ray tests benchmarks

format: setup
	$(VENV)/bin/ruff format cls_ray tests benchmarks
	$(VENV)/bin/ruff check --fix cls_ray tests benchmarks

bench: setup
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/train_overhead.py
	$(PY) benchmarks/allocator.py
	$(PY) benchmarks/search.py
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/predict.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache

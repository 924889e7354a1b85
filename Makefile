# Converge — the commands the README names.
#
#   make test    install test dependencies, run the whole suite
#   make run     install what is missing, build and start a relay on
#                127.0.0.1:3030 with its RocksDB data in ./converge-data
#
# One persistent target directory serves CI and local runs, so only the first
# build pays for compiling the dependencies.

SHELL := /bin/bash
CARGO_TARGET_DIR ?= $(HOME)/.cache/converge-target
export CARGO_TARGET_DIR
CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
LISTEN ?= 127.0.0.1:3030
DATA_DIR ?= ./converge-data
NPM_STAMP := tests/js/node_modules/.converge-installed

.PHONY: test run check fmt lint sans-io unit fixtures-live deps deps-rust deps-node deps-python deps-kotlin \
	build-debug deps-cluster bindings bindings-tests python-tests kotlin-tests bench-ffi bench bench-smoke api-property fuzz

test: deps lint unit fixtures-live api-property bindings-tests bench-smoke
	@echo "make test: all green"

## ---------------------------------------------------------------- deps

deps: deps-rust deps-node deps-python deps-kotlin deps-cluster

# The cluster tests run real NATS servers (JetStream) and HAProxy.
deps-cluster:
	@command -v nats-server >/dev/null && command -v haproxy >/dev/null || { \
		echo "installing nats-server and haproxy (cluster tests)"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q nats-server haproxy; }

deps-python:
	@python3 -c "import pytest" 2>/dev/null || python3 -m pip install --quiet pytest
	@python3 -c "import schemathesis" 2>/dev/null || \
		python3 -m pip install --quiet "schemathesis>=4.3,<5"

# RocksDB's bindings are generated with bindgen, which needs libclang; its
# C++ needs a compiler.
deps-rust:
	@command -v $(CARGO) >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs"; exit 1; }
	@rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy
	@dpkg -s libclang-dev >/dev/null 2>&1 && command -v c++ >/dev/null || { \
		echo "installing libclang-dev and a C++ compiler (needed to build RocksDB)"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q libclang-dev clang g++ make; }

# Node packages for the interop fixtures (real automerge-repo 2.5). `npm ci`
# rejects this lockfile (see tests/fixtures/wire/README.md), so use install;
# the stamp makes it idempotent.
deps-node: $(NPM_STAMP)

$(NPM_STAMP): tests/js/package.json tests/js/package-lock.json
	@command -v node >/dev/null || { apt-get update -q && apt-get install -y -q nodejs npm; }
	cd tests/js && npm install --no-audit --no-fund --loglevel=error
	@touch $@

## ---------------------------------------------------------------- checks

fmt:
	$(CARGO) fmt --all

lint: sans-io
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# converge-proto is the sans-IO crate: nothing in its dependency tree may do
# networking, async IO or RocksDB. (Automerge itself brings getrandom, for
# actor ids the engine always replaces with ones from its seeded generator.)
SANS_IO_FORBIDDEN := tokio tokio-tungstenite tungstenite axum hyper mio socket2 rocksdb librocksdb-sys async-nats libp2p
sans-io: deps-rust
	@tree=$$($(CARGO) tree -p converge-proto -e normal --prefix none | awk '{print $$1}' | sort -u) || exit 1; \
	bad=$$(for c in $(SANS_IO_FORBIDDEN); do echo "$$tree" | grep -qx "$$c" && echo "$$c" || true; done); \
	if [ -n "$$bad" ]; then echo "converge-proto must stay sans-IO, but its dependency tree has: $$bad"; exit 1; fi; \
	echo "converge-proto: $$(echo "$$tree" | wc -l) crates in its tree, none of: $(SANS_IO_FORBIDDEN)"

unit: deps-node
	$(CARGO) test --workspace

# Regenerate the golden frames with the real JS packages into a scratch
# folder and check the codec against those fresh captures too.
fixtures-live: deps-node
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	CONVERGE_FIXTURE_OUT=$$tmp node tests/js/gen-fixtures.mjs && \
	CONVERGE_FIXTURE_DIR=$$tmp $(CARGO) test --workspace --test suite wire_fixtures

# The HTTP API held to openapi.json by generated requests (Schemathesis).
api-property: deps-python build-debug
	tests/openapi/run.sh $(SERVER_BIN) 100

# Fuzzing (nightly, cargo-fuzz): every target of fuzz/ for FUZZ_SECS
# seconds. A crash stops the run and its input is copied to
# fuzz/regressions/<target>/, which `cargo test` replays (commit it with
# the fix). The fuzz build has its own target directory: its flags differ.
FUZZ_SECS ?= 60
FUZZ_TARGETS := wire_decode sync_message chunk_load claims context_ops bindings
FUZZ_TARGET_DIR := $(HOME)/.cache/converge-fuzz-target
fuzz: deps-rust
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	@rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
	@cd fuzz && for t in $(FUZZ_TARGETS); do \
		mkdir -p corpus/$$t; \
		log=$$(mktemp); \
		if ! CARGO_TARGET_DIR=$(FUZZ_TARGET_DIR) cargo +nightly fuzz run $$t corpus/$$t regressions/$$t \
			-- -max_total_time=$(FUZZ_SECS) -timeout=10 -rss_limit_mb=4096 >$$log 2>&1; then \
			tail -40 $$log; \
			for c in artifacts/$$t/*; do [ -f "$$c" ] && cp "$$c" regressions/$$t/; done; \
			echo "fuzz target $$t crashed; input copied to fuzz/regressions/$$t/"; exit 1; \
		fi; \
		echo "$$t: $$(grep -o 'Done [0-9]* runs in [0-9]* second(s)' $$log | tail -1)"; \
		rm -f $$log; \
	done

## ---------------------------------------------------------------- bindings
# The bindings are generated from the very library the tests load (uniffi
# checks API checksums at load time). Everything is built by the same cargo
# invocation as `unit`: a different package set would unify dependency
# features differently and rebuild RocksDB.

PY_OUT := bindings/python/generated
KT_OUT := bindings/kotlin/generated
SWIFT_OUT := bindings/swift/generated
DEBUG_DIR := $(CARGO_TARGET_DIR)/debug
FFI_LIB := $(DEBUG_DIR)/libconverge_ffi.so
BINDGEN := $(DEBUG_DIR)/uniffi-bindgen
SERVER_BIN := $(DEBUG_DIR)/converge-server

build-debug: deps-rust
	$(CARGO) build --workspace -q

bindings: build-debug
	rm -rf $(PY_OUT) $(KT_OUT) $(SWIFT_OUT)
	$(BINDGEN) generate --library $(FFI_LIB) --language python --no-format --out-dir $(PY_OUT)
	$(BINDGEN) generate --library $(FFI_LIB) --language kotlin --no-format --out-dir $(KT_OUT)
	$(BINDGEN) generate --library $(FFI_LIB) --language swift --no-format --out-dir $(SWIFT_OUT)
	cp $(FFI_LIB) $(PY_OUT)/

bindings-tests: python-tests kotlin-tests

python-tests: deps-python bindings
	CONVERGE_SERVER_BIN=$(SERVER_BIN) CONVERGE_PY_DIR=$(PY_OUT) \
		python3 -m pytest -q bindings/python/tests

# Kotlin on the JVM: Maven with the Kotlin plugin, JNA and coroutines
# (Debian's kotlinc is too old). Artifacts come from Maven Central once.
kotlin-tests: deps-kotlin bindings
	mvn -B -ntp -f bindings/kotlin/pom.xml test \
		-Dconverge.lib.dir=$(abspath $(DEBUG_DIR)) -Dconverge.server.bin=$(abspath $(SERVER_BIN))

deps-kotlin:
	@command -v mvn >/dev/null && command -v javac >/dev/null || { \
		echo "installing Maven and a JDK (for the Kotlin binding tests)"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q maven default-jdk-headless; }

# QUALITY.md P8 alone (also part of `make bench`): a splice and a path set
# through the Python bindings vs the same calls from Rust, release library.
bench-ffi: deps-rust
	$(CARGO) build --release -p converge-ffi --lib --bins --examples
	python3 bench/run.py p8

## ---------------------------------------------------------------- benchmarks
# `make bench`: every server and floor driven by converge-bench (release),
# server on CPU 1 and load generator on CPU 0; rewrites BENCHMARKS.md.
# Each release binary is built on its own so its dependency features (and
# RocksDB's build) stay cached.

bench: deps-rust deps-node
	@python3 -c "import matplotlib" 2>/dev/null || python3 -m pip install --quiet matplotlib
	$(CARGO) build --release -p converge-server --features bench
	$(CARGO) build --release -p converge-bench
	$(CARGO) build --release -p converge-ffi --lib --bins --examples
	cd bench/samod-relay && $(CARGO) build --release --locked
	python3 bench/run.py

# Seconds of the load generator against a debug relay and the floor.
bench-smoke: build-debug
	bench/smoke.sh $(DEBUG_DIR)/converge-bench $(SERVER_BIN)

check: lint unit

## ---------------------------------------------------------------- run

# A release build of the relay (the first build compiles RocksDB: ~30 min
# on two cores), then run it in the foreground; Ctrl-C stops it cleanly.
run: deps-rust
	$(CARGO) build --release -p converge-server
	$(CARGO_TARGET_DIR)/release/converge-server --listen $(LISTEN) --data-dir $(DATA_DIR)

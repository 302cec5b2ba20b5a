# The README's two commands are `make demo` and `make test`; both set everything up first.
# `.ci/run` calls `make test`. Every Python step runs in the cached environment that
# scripts/env.sh creates (keyed on requirements/*.lock).
#
# CI budget (README, "Tests and CI budget"): the whole `make test` under 15 minutes on 2 cores;
# the tests a method adds under 90 s in total. Slower tests carry `@pytest.mark.slow_ci` and run in
# `make test-slow` only.

SHELL := /bin/bash
# The environment (3 GB on first use) is created only by targets that use $(ENV): this
# expands scripts/env.sh on first use and caches the result, so `make clean` never runs it.
ENV = $(eval ENV := $(or $(shell bash scripts/env.sh),$(error scripts/env.sh failed, see its message above)))$(ENV)
PY = $(ENV)/bin/python
# In the environment of every recipe that builds Rust: one Python for pyo3's build script
# everywhere, so cargo and maturin share build artifacts.
PYO3 = PYO3_PYTHON=$(PY)
export HF_HUB_OFFLINE := 1
PYTEST_ARGS ?=
# The primitives layer, type-checked by mypy in `make test`.
MYPY_FILES = $(addprefix python/forgetcore/,_backend.py _checks.py replay.py power_law.py replay_samplers.py \
	importance.py fisher.py subspace.py kvscore.py spectral.py reference.py)

.PHONY: all build install demo test lint test-rust typecheck stubtest test-python test-slow fuzz bench bench-quick bench-rust wheel
.PHONY: clean

all: test

# Build the extension in release mode into python/forgetcore/ (tests import the checkout
# through PYTHONPATH, so several checkouts can share one environment).
build:
	$(PYO3) VIRTUAL_ENV=$(ENV) PATH=$(ENV)/bin:$$PATH maturin develop --release --quiet --skip-install

# Install the package (editable, with the `forgetcore` command) into the environment.
install:
	$(PYO3) VIRTUAL_ENV=$(ENV) PATH=$(ENV)/bin:$$PATH maturin develop --release --quiet

demo: install
	$(ENV)/bin/forgetcore demo

# Cheapest gates first. stubtest runs once, inside pytest (tests/test_package.py).
test: lint build test-rust typecheck test-python

lint:
	cargo fmt --check
	$(ENV)/bin/ruff check python tests benches

# The kernel crate without the `python` feature has no pyo3: `cargo test` runs without libpython.
# clippy runs both ways, so the bindings (behind the feature) are linted too.
test-rust:
	cargo clippy --quiet --all-targets -- -D warnings
	$(PYO3) cargo clippy --quiet --all-targets --all-features -- -D warnings
	cargo test --quiet

typecheck:
	$(PY) -m mypy $(MYPY_FILES)

# Standalone stub check (the same one tests/test_package.py runs).
stubtest:
	PYTHONPATH=python $(PY) -m mypy.stubtest forgetcore._core --concise

test-python:
	PYTHONPATH=python $(PY) -m pytest -m "not slow_ci" --durations=25 $(PYTEST_ARGS)

# Tests too slow for the CI budget (world size 4, long fuzzing, Flower's simulation engine).
# (pytest's exit status 5, "no tests collected", is not a failure here.)
# PROPTEST_CASES: the kernel crate's property tests at full strength (CI runs them CI-sized).
PROPTEST_SLOW_CASES ?= 4096
test-slow: build
	PYTHONPATH=python $(PY) -m pytest -m slow_ci --durations=25 $(PYTEST_ARGS) || [ $$? -eq 5 ]
	PROPTEST_CASES=$(PROPTEST_SLOW_CASES) cargo test --release --quiet --lib -- importance:: subspace::

# cargo-fuzz on the kernel crate's entry points (fuzz/): no panic on any input, and an error
# leaves every output buffer unchanged. Needs a nightly toolchain and cargo-fuzz
# (`rustup toolchain install nightly`, `cargo install cargo-fuzz`); outside CI.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= importance subspace kvscore replay
fuzz:
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  cargo +nightly fuzz run -O $$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 || exit 1; done

# Every benches/bench_*.py in one run, ending with one summary table: each ratio, its target,
# met or missed (run it alone on the machine: the triad and load average are printed with it).
bench: build
	PYTHONPATH=python $(PY) benches/summary.py

bench-quick: build
	PYTHONPATH=python $(PY) benches/summary.py --quick

# The Rust kernels alone (criterion).
bench-rust:
	cargo bench

# The abi3 wheel (one wheel for every CPython >= 3.11), e.g. to carry to a GPU machine.
wheel:
	$(PYO3) VIRTUAL_ENV=$(ENV) PATH=$(ENV)/bin:$$PATH maturin build --release --out dist

clean:
	cargo clean
	rm -rf dist python/forgetcore/_core*.so

# KV-cache tests at the lowest supported transformers (overlay folder; not part of `make test`).
.PHONY: test-transformers-min
test-transformers-min:
	bash scripts/test-transformers-min.sh

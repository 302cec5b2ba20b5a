# The README's two commands are `make demo` and `make test`; both set everything up first.
# `.ci/run` calls `make test`. Every Python step runs in the cached environment that
# scripts/env.sh creates (keyed on requirements/*.lock).

SHELL := /bin/bash
ENV := $(shell bash scripts/env.sh)
PY := $(ENV)/bin/python
# One Python for pyo3's build script everywhere, so cargo and maturin share build artifacts;
# the test binaries link libpython, so its folder goes on the loader path.
export PYO3_PYTHON := $(PY)
export LD_LIBRARY_PATH := $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))'):$(LD_LIBRARY_PATH)
export HF_HUB_OFFLINE := 1
PYTEST_ARGS ?=

.PHONY: all build install demo test test-rust test-python stubtest bench wheel clean

all: test

# Build the extension in release mode into python/forgetcore/ (tests import the checkout
# through PYTHONPATH, so several checkouts can share one environment).
build:
	VIRTUAL_ENV=$(ENV) PATH=$(ENV)/bin:$$PATH maturin develop --release --quiet --skip-install

# Install the package (editable, with the `forgetcore` command) into the environment.
install:
	VIRTUAL_ENV=$(ENV) PATH=$(ENV)/bin:$$PATH maturin develop --release --quiet

demo: install
	$(ENV)/bin/forgetcore demo

test: build test-rust stubtest test-python

test-rust:
	cargo fmt --check
	cargo test --quiet

stubtest:
	PYTHONPATH=python $(PY) -m mypy.stubtest forgetcore._core --concise

test-python:
	PYTHONPATH=python $(PY) -m pytest $(PYTEST_ARGS)

bench: build
	cargo bench
	for f in benches/bench_*.py; do PYTHONPATH=python $(PY) "$$f" || exit 1; done

# The abi3 wheel (one wheel for every CPython >= 3.11), e.g. to carry to a GPU machine.
wheel:
	VIRTUAL_ENV=$(ENV) PATH=$(ENV)/bin:$$PATH maturin build --release --out dist

clean:
	cargo clean
	rm -rf dist python/forgetcore/_core*.so

# KV-cache tests at the lowest supported transformers (overlay folder; not part of `make test`).
.PHONY: test-transformers-min
test-transformers-min:
	bash scripts/test-transformers-min.sh

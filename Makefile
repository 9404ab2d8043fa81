# Set-up and everyday targets. `make demo` runs the main job, `make test` the tests;
# both install whatever is missing first (a virtual environment in .venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
XXHASH_HEADER ?= /usr/include/xxhash.h

.PHONY: all setup sysdeps deps build test test-fast demo bench bench-micro wheel typecheck clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25.1"

# The xxHash C header, needed only to compile the fast path (wheels don't need it).
sysdeps:
	@if [ -f "$(XXHASH_HEADER)" ] || [ -n "$$XXHASH_INCLUDE_DIR" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing libxxhash-dev (xxHash header)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libxxhash-dev; \
	else \
		echo "migcore needs the xxHash header: run 'sudo apt-get install libxxhash-dev'" \
		     "(Fedora: xxhash-devel, macOS: brew install xxhash), or set XXHASH_INCLUDE_DIR"; \
		exit 1; \
	fi

deps: $(PY)
	$(PY) -m pip install --quiet --group dev

# Editable install: builds src/migcore/_fastpath*.so in place and the `migcore` command.
build: sysdeps deps
	$(PY) -m pip install --quiet --no-build-isolation -e .

setup: build

test: build
	MIGCORE_REQUIRE_FASTPATH=1 $(PY) -m pytest

test-fast: build
	MIGCORE_REQUIRE_FASTPATH=1 $(PY) -m pytest -m "not slow"

demo: build
	$(BIN)/migcore demo

bench-micro: build
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=min,median,mean,ops -q

bench: build
	$(BIN)/migcore bench

wheel: build
	$(PY) -m build --no-isolation --outdir dist .

typecheck: build
	$(PY) -m mypy

clean:
	rm -rf build dist src/*.egg-info src/migcore/_fastpath.c src/migcore/_fastpath*.so src/migcore/_uffd.c src/migcore/_uffd*.so .pytest_cache .benchmarks

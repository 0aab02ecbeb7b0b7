# Two commands do all the set-up on a fresh machine and then run:
#   make demo   the main job
#   make test   the test suite (reference + C++ backends, then the Triton kernels under the interpreter)
# A second run reuses the virtual environment and rebuilds the C++ extension only when csrc/ changed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.14.1 torchvision==0.29.1
STAMP_DEPS := $(VENV)/.deps-ready
STAMP_EXT  := $(VENV)/.ext-ready

.PHONY: demo test test-fast bench bench-smoke docs setup clean

setup: $(STAMP_EXT)

$(STAMP_DEPS): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch first, from this machine's disk; the rest must not resolve another torch.
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -r requirements.txt
	touch $@

# VITAL_FAST_BUILD_EXT=1: here a C++ build failure fails the set-up (a plain pip install warns and
# goes on without the extension); VITAL_FAST_BUILD_EXT=0 in the environment still skips it.
$(STAMP_EXT): $(STAMP_DEPS) setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	VITAL_FAST_BUILD_EXT=$${VITAL_FAST_BUILD_EXT:-1} $(PIP) install -q --no-build-isolation -e .
	touch $@

demo: $(STAMP_EXT)
	$(VENV)/bin/vital-fast demo

bench: $(STAMP_EXT)
	$(PY) -m benchmarks.table

test: $(STAMP_EXT)
	$(PY) -m pytest -q tests
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m interpret tests

bench-smoke: $(STAMP_EXT)
	$(PY) -m pytest -q benchmarks --benchmark-disable

# The documentation site (mkdocs.yml, docs/) into site/; the docs extra of requirements.txt. Fails on any warning.
docs: $(STAMP_EXT)
	$(PY) -m mkdocs build --strict -d site

clean:
	rm -rf build *.egg-info vital_fast/_C*.so vital_fast/_C_build_error.txt $(STAMP_EXT)

# prunedm developer commands. `make demo` runs the main job; `make test` runs every check CI runs.
# Both create .venv on first use (torch 2.14.1 and every dependency) and build the extension.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CUDA archs: TORCH_CUDA_ARCH_LIST; unset, setup.py builds the visible GPU's arch (+PTX), else sm_80 + sm_90a + compute_80 PTX.
export MAX_JOBS ?= 2

CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' 2>/dev/null)
BUILT := $(VENV)/.prunedm-built

.PHONY: all venv build lint ctest pytest test demo bench clean gpu-prebuild

all: test

venv: $(VENV)/.deps-installed

$(VENV)/.deps-installed: requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q -r requirements-dev.txt
	@touch $@

# Rebuilt whenever a C++/CUDA source or the build script changes; ninja recompiles only what changed.
$(BUILT): $(VENV)/.deps-installed $(CSRC) setup.py pyproject.toml tools/build_backend.py
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import prunedm, json; print(json.dumps(prunedm.extension_info(), indent=1))"
	@if [ "$${PRUNEDM_REQUIRE_CUDA_BUILD:-0}" = 1 ]; then \
		$(PY) -c "from prunedm import _C; assert _C.WITH_CUDA, 'CUDA kernels were not built'"; fi
	@touch $@

build: $(BUILT)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

ctest:
	cmake -S . -B build/ctest -DPRUNEDM_SANITIZE=ON > /dev/null
	cmake --build build/ctest -j 2
	ctest --test-dir build/ctest --output-on-failure

pytest: build
	$(PY) -m pytest -q

test: build lint ctest pytest

# The whole pipeline on the shipped digits DDPM; --resume: a second run skips finished stages.
demo: build
	$(VENV)/bin/prunedm demo --out demo-out $$(test -f demo-out/config.yaml && echo --resume)

bench: build
	$(PY) -m bench.ops --out bench/out

# What a GPU run carries (docs/GPU.md): prunedm._C for the device image in .gpu/, the wheels it lacks in .whl/.
# Builds in a copy of the tree with a scratch Python 3.12 venv (.gpu-venv); the checkout's build is untouched.
gpu-prebuild:
	MAX_JOBS=$(MAX_JOBS) bash scripts/gpu_check/prebuild.sh

clean:
	rm -rf build dist *.egg-info prunedm/_C*.so $(BUILT)

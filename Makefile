# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine (offline except for
# the package registries): they create .venv, install torch's local CPU wheel, then fastsel.
PYTHON    ?= python3
VENV      ?= .venv
PY        := $(VENV)/bin/python
DATA_DIR  ?= ../shared/data
STAMP     := $(VENV)/.fastsel-installed
SOURCES   := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' 2>/dev/null)
# CUDA build (`make cuda-build`): its own venv with a CUDA torch, and its own copy of the sources, so that its
# fastsel/_C*.so never replaces the CPU one that the editable install in .venv keeps in the source tree.
CUDA_VENV   ?= .venv-cuda
CUDA_PY     := $(CUDA_VENV)/bin/python
CUDA_TORCH  ?= torch==2.14.1
CUDA_ARCHS  ?= 8.0;9.0+PTX
CUDA_SRC    := build/cuda-src
CUDA_DEPS   := $(CUDA_VENV)/.fastsel-deps
CUDA_BUILT  := $(CUDA_VENV)/.fastsel-built
CUDA_INPUTS := setup.py pyproject.toml README.md $(shell find csrc fastsel -type f \( -name '*.cpp' -o -name '*.cu' \
               -o -name '*.h' -o -name '*.cuh' -o -name '*.py' -o -name '*.json' \) 2>/dev/null)

.PHONY: install demo test test-fast bench bench-gpu cuda-check cuda-build gpu-check gpu-check-dry clean clean-cuda

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first (the pinned CPU wheel): with it present nothing pulls CUDA wheels, and the extension is
# built against it without pip's isolated build environment.
$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q setuptools wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	$(PY) -c "import fastsel; s = fastsel.EXTENSION; print('fastsel._C:', s.reason); assert s.loaded"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m fastsel info
	$(PY) -m fastsel score --metric fisher,variability --model minilm --task sst2 --data-dir $(DATA_DIR) \
	    --num-examples 1000 --batch-size 32 --max-length 64 \
	    --out runs/demo/sst2.json --plot runs/demo/sst2.png

# --strict-skips: a skip that tests/expected_skips.txt does not allow (missing data, MiniLM, extension) fails the
# run (tests/skip_check.py), so a green `make test` means the tests ran.
test: install
	$(PY) -m pytest -q -rs --strict-skips tests

test-fast: install
	$(PY) -m pytest -q -rs --strict-skips -m "not slow" tests

bench: install
	$(PY) -m pytest -q bench --benchmark-columns=min,mean,stddev,rounds

bench-gpu: install
	$(PY) -m pytest -q bench -k "gpu or cuda" --benchmark-columns=min,mean,stddev,rounds

# CUDA build without a GPU: a CUDA torch in $(CUDA_VENV) (installed once, stamp), fastsel built from a copy of
# the sources in $(CUDA_SRC) (its ninja objects are kept there: later builds recompile what changed) with CUDA
# kernels for $(CUDA_ARCHS), installed (not editable) into $(CUDA_VENV); then it fails unless the installed
# fastsel loads its extension with a CUDA kernel for every op (python -m fastsel.cli.info --require-cuda).
$(CUDA_PY):
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install -q --upgrade pip

$(CUDA_DEPS): $(CUDA_PY) pyproject.toml
	$(CUDA_PY) -m pip install -q "$(CUDA_TORCH)" setuptools wheel ninja numpy
	$(CUDA_PY) -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
	    > $(CUDA_VENV)/fastsel-requirements.txt
	$(CUDA_PY) -m pip install -q -r $(CUDA_VENV)/fastsel-requirements.txt "$(CUDA_TORCH)"
	touch $(CUDA_DEPS)

$(CUDA_BUILT): $(CUDA_DEPS) $(CUDA_INPUTS)
	rm -rf $(CUDA_SRC)/csrc $(CUDA_SRC)/fastsel
	mkdir -p $(CUDA_SRC)
	cp -a setup.py pyproject.toml README.md csrc fastsel $(CUDA_SRC)/
	find $(CUDA_SRC)/fastsel \( -name '_C*.so' -o -name '*.pyc' \) -delete
	@echo "building (full log: build/cuda-build.log)"
	set -o pipefail; cd $(CUDA_SRC) && TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" FASTSEL_FORCE_CUDA=1 \
	    $(abspath $(CUDA_PY)) -m pip install -v --no-build-isolation --no-deps --force-reinstall . 2>&1 \
	    | tee $(abspath build/cuda-build.log) \
	    | { grep --line-buffered -E '^ *(fastsel:|\[[0-9]+/[0-9]+\])|error|Successfully' | cut -c1-300 || true; } \
	    || { echo "CUDA build FAILED; the end of build/cuda-build.log:"; tail -60 $(abspath build/cuda-build.log); exit 1; }
	touch $(CUDA_BUILT)

$(CUDA_BUILT): SHELL := /bin/bash
cuda-build: $(CUDA_BUILT)
	cd build && $(abspath $(CUDA_PY)) -m fastsel info --json > cuda-info.json
	cd build && $(abspath $(CUDA_PY)) -m fastsel.cli.info --require-cuda

# On a GPU machine: build (this GPU's arch +PTX), test, benchmark and sanitize the CUDA kernels in <= 8 minutes
# (bench/gpu_check.sh; results and logs under runs/gpu_check); --dry: the same steps on a CPU at tiny sizes.
gpu-check:
	bash bench/gpu_check.sh

gpu-check-dry: install
	PY=$(PY) bash bench/gpu_check.sh --dry

# Compile-only check of every CUDA source with nvcc alone (no torch headers; superseded by cuda-build).
cuda-check:
	@for f in $$(find csrc -name '*.cu'); do \
	    echo "nvcc $$f"; \
	    nvcc -std=c++17 -c $$f -Icsrc -o /dev/null \
	        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 || exit 1; \
	done

clean:
	rm -rf build fastsel/_C*.so runs .pytest_cache .benchmarks

clean-cuda:
	rm -rf $(CUDA_VENV) $(CUDA_SRC)

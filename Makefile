# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine (offline except for
# the package registries): they create .venv, install torch's local CPU wheel, then fastsel.
PYTHON    ?= python3
VENV      ?= .venv
PY        := $(VENV)/bin/python
DATA_DIR  ?= ../shared/data
STAMP     := $(VENV)/.fastsel-installed
SOURCES   := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' 2>/dev/null)

.PHONY: install demo test test-fast bench bench-gpu cuda-check clean

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

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

bench: install
	$(PY) -m pytest -q bench --benchmark-columns=min,mean,stddev,rounds

bench-gpu: install
	$(PY) -m pytest -q bench -k "gpu or cuda" --benchmark-columns=min,mean,stddev,rounds

# Compile-only check of every CUDA source (what CI does; no GPU needed).
cuda-check:
	@for f in $$(find csrc -name '*.cu'); do \
	    echo "nvcc $$f"; \
	    nvcc -std=c++17 -c $$f -Icsrc -o /dev/null \
	        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 || exit 1; \
	done

clean:
	rm -rf build fastsel/_C*.so runs .pytest_cache .benchmarks

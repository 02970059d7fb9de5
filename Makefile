# The two commands of a fresh machine: `make test` and `make bench`. Both create or reuse the
# virtualenv in .venv, install what is needed, build the extension, then run.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 is served locally on our machines; pyattn itself accepts torch>=2.4 (pyproject.toml).
TORCH_SPEC ?= torch==2.14.1
DEV_PACKAGES := ninja numpy packaging pytest pytest-benchmark expecttest matplotlib tqdm
BENCH_OUT ?= bench-out
EXTENSION_SOURCES := $(shell find csrc -name '*.cu' -o -name '*.cpp' -o -name '*.cuh' -o -name '*.h' 2>/dev/null)

.PHONY: test bench build venv test-plain test-interpreter clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet $(DEV_PACKAGES)
	touch $@

build: $(VENV)/.built

# Rebuilt only when a C++/CUDA source or the build script changes; ninja makes rebuilds incremental.
$(VENV)/.built: $(VENV)/.installed setup.py $(EXTENSION_SOURCES)
	@echo "building pyattn (log: $(VENV)/build.log)"
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --no-build-isolation --no-deps -v -e . > $(VENV)/build.log 2>&1 \
		|| (tail -n 60 $(VENV)/build.log; exit 1)
	@grep "pyattn setup:" $(VENV)/build.log || true
	$(PY) -m pyattn.build_info
	touch $@

# The whole suite in two processes: TRITON_INTERPRET must be set before triton is imported.
test: build
	$(PY) -m pytest tests -m "not interpreter" -q
	TRITON_INTERPRET=1 $(PY) -m pytest tests -m interpreter -q

bench: build
	$(PY) -m pyattn.bench --out $(BENCH_OUT)

clean:
	rm -rf build *.egg-info pyattn/_C*.so $(VENV)/.built

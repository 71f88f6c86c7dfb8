# test, demo and bench create .venv, install the pinned dependencies and build the C++ extension from source first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.requirements-installed
TRITON36 := $(VENV)/triton-3.6
TRITON36_INSTALLED := $(TRITON36)/.installed

.PHONY: help install test test-triton36 pytest-main pytest-triton36 bench demo check-gpu-image clean

help:
	@echo "make test   - set up .venv, build from source, run the test suite (CPU, Triton interpreter) and, side by"
	@echo "              side, make test-triton36: the triton-backend tests and the sm_90 compile with Triton 3.6"
	@echo "make demo   - set up .venv, build, run the quick corruption-stage study (CPU, minutes) into study/"
	@echo "make bench  - set up .venv, build, run the CPU microbenchmarks (pytest-benchmark)"
	@echo "make check-gpu-image - the GPU machines' stack (torch 2.11, Python 3.12) here: build, tests, benchmark"
	@echo "              stages at CPU sizes (benchmarks/gpu_image_check.sh; ~5 GB download, needs .whl/)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): requirements.txt requirements-dev.txt constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements-dev.txt -c constraints.txt
	touch $@

install: $(INSTALLED)
	$(BIN)/python -m pip install --no-build-isolation --no-deps -e .

# the triton-backend tests (interpreter) and the sm_90 compile test again with the GPU image's Triton (3.6) first on
# the path: the kernels must work with it as well as with the pinned newest release
TEST_TRITON36 = PYTHONPATH=$(TRITON36) TRITON_INTERPRET=1 $(BIN)/python -m pytest tests -q -k "triton or sm90" \
	-p no:cacheprovider

# The two passes side by side, each one's output printed when it ends (of the layouts measured, the fastest here).
test: install $(TRITON36_INSTALLED)
	$(MAKE) --no-print-directory -j2 --output-sync=target pytest-main pytest-triton36

# the passes alone, without the set-up (test runs them after it)
pytest-main:
	TRITON_INTERPRET=1 $(BIN)/python -m pytest tests -q

pytest-triton36:
	$(TEST_TRITON36)

$(TRITON36_INSTALLED): requirements-triton36.txt | $(INSTALLED)
	$(BIN)/python -m pip install --no-deps --upgrade --target $(TRITON36) -r requirements-triton36.txt
	touch $@

test-triton36: install $(TRITON36_INSTALLED)
	$(TEST_TRITON36)

bench: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest benchmarks -q --benchmark-only \
		--benchmark-json=benchmarks/results/cpu-microbench.json

demo: install
	TRITON_INTERPRET=1 $(BIN)/bnn-diffusion study --out study --preset quick \
		--json benchmarks/results/study-quick.json
	@echo "The study's report: study/report.md (figures study/*.png, every number in study/study-quick.json" \
		"and benchmarks/results/study-quick.json)"

check-gpu-image:
	bash benchmarks/gpu_image_check.sh

clean:
	rm -rf build *.egg-info bnn_kernels/*.so

# Every target creates .venv, installs the pinned dependencies and builds the C++ extension from source first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.requirements-installed

.PHONY: help install test bench demo clean

help:
	@echo "make test   - set up .venv, build from source, run the test suite (CPU, Triton interpreter)"
	@echo "make demo   - set up .venv, build, run the quick corruption-stage study (CPU, minutes) into study/"
	@echo "make bench  - set up .venv, build, run the CPU microbenchmarks (pytest-benchmark)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): requirements.txt requirements-dev.txt constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements-dev.txt -c constraints.txt
	touch $@

install: $(INSTALLED)
	$(BIN)/python -m pip install --no-build-isolation --no-deps -e .

test: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest tests -q

bench: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest benchmarks -q --benchmark-only \
		--benchmark-json=benchmarks/results/cpu-microbench.json

demo: install
	TRITON_INTERPRET=1 $(BIN)/python -m bnn_diffusion.study --out study --preset quick
	@echo "The study's report: study/report.md (figures study/*.png, every number in study/study-quick.json)"

clean:
	rm -rf build *.egg-info bnn_kernels/*.so

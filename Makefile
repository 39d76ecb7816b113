# Two commands for a fresh machine (see README): `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast perf-check gpu-check bench-fidelity bench-search clean

install: $(STAMP)

# llama-cpp-python builds from source here (~4 min on 2 cores; pip caches the wheel afterwards).
# For CUDA: CMAKE_ARGS="-DGGML_CUDA=on" make install   (see README)
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install -e ".[test]"
	touch $@

# The main job on the built-in default: synthetic models, a short search, a report.
demo: install
	$(BIN)/tuner search --config experiments/demo.toml
	$(BIN)/tuner report results/demo --out results/demo/report

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

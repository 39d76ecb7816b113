# Two commands for a fresh machine (see README): `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lint demo test test-fast perf-check gpu-check bench-fidelity bench-search bench-storage rpc-check clean

install: $(STAMP)

# llama-cpp-python builds from source here (~4 min on 2 cores; pip caches the wheel afterwards).
# LLAMA_CMAKE_ARGS, always: the RPC backend (llama.cpp's devices on other hosts, and on this one: tuner rpc-server),
# and no AMX kernels: on this VM's Xeon (AMX_INT8) every model llama.cpp repacks into its AMX buffer crashes in the
# first decode (SIGSEGV in ggml_backend_amx_mul_mat, upstream ggml-org/llama.cpp#20824, machine-dependent, open).
# On a machine where AMX works: make install LLAMA_CMAKE_ARGS=-DGGML_RPC=on
# For CUDA: CMAKE_ARGS="-DGGML_CUDA=on" make install   (see README)
# pip's wheel cache is keyed by the source archive, not by CMAKE_ARGS, so a wheel built otherwise (a cached CPU-only
# one, say) would be reused silently: build_check says whether the installed one is what was asked, else the cached
# wheel is dropped and it is rebuilt (and cached as asked).
LLAMA_CMAKE_ARGS ?= -DGGML_RPC=on -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8
LLAMA_ARGS = $(strip $(LLAMA_CMAKE_ARGS) $(CMAKE_ARGS))
LLAMA_PKG = llama-cpp-python==0.3.36

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	CMAKE_ARGS="$(LLAMA_ARGS)" $(BIN)/pip install -e ".[test]"
	$(BIN)/python .ci/build_check.py "$(LLAMA_ARGS)" || { $(BIN)/pip cache remove 'llama_cpp_python*'; \
	  CMAKE_ARGS="$(LLAMA_ARGS)" $(BIN)/pip install --force-reinstall --no-deps --no-binary llama-cpp-python \
	  "$(LLAMA_PKG)" && $(BIN)/python .ci/build_check.py "$(LLAMA_ARGS)"; }
	touch $@

# The main job on the built-in default: synthetic models, a short search, a report.
demo: install
	$(BIN)/tuner search --config experiments/demo.toml
	$(BIN)/tuner report results/demo --out results/demo/report

test: lint
	$(BIN)/python -m pytest -q

# ruff (pyproject.toml): the linter (line length, import order, imports inside functions only where marked
# with the reason) and the formatter
lint: install
	$(BIN)/ruff check tuner tests benchmarks .ci
	$(BIN)/ruff format --check tuner tests benchmarks .ci

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The regression gate on CPU, as .github/workflows/perf-regression.yml does on a GPU runner: one saved config
# (PERF_CONFIG, made on first use) measured by the baseline install and by this one, interleaved round by
# round, then `tuner compare`. PERF_BASE_BIN defaults to this install: an A/A run that shows the gate's noise
# floor. Against another build, e.g. a checkout of main:
#   make perf-check PERF_BASE_BIN=../tuner-main/.venv/bin
# Many short trials, finely interleaved, rather than a few long ones: on a shared machine a burst of other work
# lasts seconds and then hits both sides alike. The gate judges one value per trial (tuner/stats.py), so its power
# is set by the rounds: benchmarks/gate_power.py (a measured 10 % slowdown, A/A and A/B runs alternating) found 14
# rounds detecting 13 of 20 (gate-power-20261129-094629.json re-judged) and 28 rounds detecting 59 of 59 with
# 0 of 59 false alarms (gate-power-20261204-104241.json; one-sided 95 % bounds in benchmarks/README.md).
# PERF_COMPARE_ARGS=--rerun-on-alert re-measures an alert before failing (fewer false alarms, less power).
PERF_DIR ?= results/perf
PERF_CONFIG ?= $(PERF_DIR)/config.json
PERF_BASE_BIN ?= $(BIN)
PERF_ROUNDS ?= 28
PERF_ARGS ?= -r 3
PERF_COMPARE_ARGS ?=

perf-check: install
	mkdir -p $(PERF_DIR)
	$(BIN)/tuner synth $(PERF_DIR)/models --preset dense --quants q4_0
	test -f $(PERF_CONFIG) || printf '{"config": {"model": "%s", "n_prompt": 256, "n_gen": 64}}\n' \
	  "$(PERF_DIR)/models/dense-q4_0.gguf" > $(PERF_CONFIG)
	rm -f $(PERF_DIR)/baseline.parquet $(PERF_DIR)/current.parquet
	@# exit 1 from bench is a failed trial (recorded; compare judges it), 2 is bad input: stop
	@# A B B A: odd rounds measure the baseline first, even rounds the current build first, so a position
	@# effect hits both sides alike (benchmarks/fidelity.py saw the second of a pair run 8 % slower in pp:
	@# results/legacy/fidelity-20261129-062604.json, legacy, no provenance)
	for i in $$(seq $(PERF_ROUNDS)); do \
	  if [ $$((i % 2)) -eq 1 ]; then order="baseline current"; else order="current baseline"; fi; \
	  for side in $$order; do \
	    if [ $$side = baseline ]; then bin=$(PERF_BASE_BIN); else bin=$(BIN); fi; \
	    $$bin/tuner bench --config $(PERF_CONFIG) $(PERF_ARGS) -o $(PERF_DIR)/$$side.parquet; \
	    rc=$$?; [ $$rc -le 1 ] || exit $$rc; \
	  done; \
	done
	$(BIN)/tuner compare $(PERF_DIR)/baseline.parquet $(PERF_DIR)/current.parquet $(PERF_COMPARE_ARGS) \
	  --markdown $(PERF_DIR)/report.md --junit $(PERF_DIR)/junit.xml

# MoE hybrid offload on a CUDA machine (~15 min on one H200): builds the CUDA llama-cpp-python into .venv-cuda,
# then synth/bench/search/report and the whole test suite into gpu-check-out/. Knobs: see experiments/gpu-check.sh
# (GPU_CHECK_CPU=1: no GPU, the script's logic with ./.venv and tiny sizes).
gpu-check:
	bash experiments/gpu-check.sh

# Benchmarks (scripts, not tests; figures land in benchmarks/results/). LLAMA_BENCH: a llama-bench built from
# llama-cpp-python's vendored llama.cpp (benchmarks/README.md).
bench-fidelity: install
	$(BIN)/python benchmarks/fidelity.py -t 1,2

bench-search: install
	$(BIN)/python benchmarks/search_efficiency.py --seeds 5
	$(BIN)/python benchmarks/search_overhead.py --rounds 3

# a fleet's shared storage per trial, PostgreSQL (started for the run) vs SQLite
bench-storage: install
	$(BIN)/python benchmarks/storage_cost.py --trials 60

# the rig check on this machine: two llama.cpp RPC servers of 40 MiB as devices, a search raced against --fit, and
# every hybrid-region point against the planner's verdict and per-device buffers
rpc-check: install
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/rpc_check.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

#!/usr/bin/env bash
# GPU check for MoE hybrid offload (issue 8) and the test suite on a CUDA build, sized for ≤ 15 min on one H200
# (16 cores): the CUDA build ~4-6 min (not measured here: estimated), synth ~1 min, the probe ~2 min (estimated),
# the search capped at 150 s, the rest ~1-2 min, the whole test suite ~3-5 min (estimated from ~3 min on 2 idle
# cores).
#
#   1. nvidia-smi                      GPU, driver (nvidia-smi.txt)
#   2. CUDA llama-cpp-python           built from source into a venv (--no-binary, --force-reinstall), then tuner
#   3. tuner hw                        must report GPU offload, llama.cpp's CUDA0 matched to NVML by PCI bus id
#   4. tuner synth                     a Mixtral-style MoE of a few GB (16 layers × 16 experts, q8_0)
#   5. tuner bench -ngl 99             --n-cpu-moe 0 and 4: experts of 4 layers leave VRAM
#  5b. tuner probe + speed (optional) the rig probe (GPU figures, link) at the bench's threads, then tuner.plan.speed's
#                                      tg/pp for step 5's two configs against what step 5 measured (speed-gpu.json)
#  6a. tuner search --dry-run         the hybrid region the planner chooses under a VRAM cap (dry-run.json)
#   6. tuner search                    the default space under --max-vram GPU_CHECK_HYBRID_CAP: a model bigger than
#                                      the cap, so the answer is -ngl all --n-cpu-moe N (~12 trials, bounded)
#  6c. llama-bench (optional)          with LLAMA_BENCH: the recommended -ngl/--n-cpu-moe against llama-bench's own
#                                      figures with the same flags, and fidelity at 4, 8 and 16 threads
#   7. verify                          placement as llama.cpp reported it, VRAM saved, recommended.json forms
#  7b. planner-oracle                  llama.cpp's buffers per device vs the planner (sparse GGUFs, issue 13)
#   8. tuner recommend --max-vram      the hybrid pick under a VRAM cap (informational)
#   9. tuner report                    if this install has it
#  10. pytest tests/test_moe.py        the MoE tests on the CUDA build (all other layers on the GPU)
#  11. pytest (the rest of the suite)  every other test on the CUDA build: with step 10, the whole suite (~3-5 min)
#
# Everything goes under $OUT (default ./gpu-check-out): logs/, timings.tsv, summary.txt, bench*.json/parquet,
# results/gpu-moe/ (trials.parquet, recommended.json, report/). Models go to $GPU_CHECK_MODELS (several GB,
# kept for a rerun). Exit status: 0 when every required step passed.
#
# Knobs (environment):
#   GPU_CHECK_CPU=1          no GPU: skip the CUDA build, use ./.venv and tiny sizes (checks the script's logic)
#   GPU_CHECK_VENV           venv for the CUDA build [./.venv-cuda]; reused when it already has GPU offload
#   GPU_CHECK_REBUILD=1      rebuild llama-cpp-python even if the venv already offloads
#   GPU_CHECK_WHEELHOUSE     offline: a folder with the llama_cpp_python sdist and tuner's missing dependencies
#                            (pip install --no-index --find-links). Make it where pip works:
#                              pip download -d wheelhouse --no-binary llama-cpp-python llama-cpp-python==0.3.36
#                              pip download -d wheelhouse optuna gguf diskcache pytest pytest-timeout hypothesis
#   LLAMA_CPP_PYTHON_SPEC    what to build [llama-cpp-python==0.3.36]; a path to an sdist or a checkout works
#   GPU_CHECK_CMAKE_ARGS     extra CMake flags, added to -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90
#   GPU_CHECK_MODELS         where the synthetic models go [${TMPDIR:-/tmp}/tuner-gpu-check-models]
#   GPU_CHECK_SEARCH_BUDGET  wall-time cap of the search [150s]; GPU_CHECK_TRIALS trials [12]
#   GPU_CHECK_MAX_VRAM       the cap for step 8 [2GiB]
#   GPU_CHECK_HYBRID_CAP     the search's --max-vram [2GiB]: below the model's 3.6 GB, so experts must go to RAM
#   LLAMA_BENCH              a llama-bench built with CUDA from the same vendored llama.cpp (step 6c; skipped if unset)
#   GPU_CHECK_TESTS=0        skip steps 10 and 11; GPU_CHECK_SUITE=0 skips only step 11
#   GPU_CHECK_TAR            also pack $OUT into this .tar.gz (for a runner that returns only a few files)
#
# Examples:
#   make gpu-check
#   OUT=/tmp/gc GPU_CHECK_WHEELHOUSE=$PWD/wheelhouse bash experiments/gpu-check.sh
#   GPU_CHECK_CPU=1 bash experiments/gpu-check.sh          # on a machine without a GPU: the logic only
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-./gpu-check-out}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
CPU=${GPU_CHECK_CPU:-0}
MODELS=${GPU_CHECK_MODELS:-${TMPDIR:-/tmp}/tuner-gpu-check-models}
TRIALS=${GPU_CHECK_TRIALS:-12}
BUDGET=${GPU_CHECK_SEARCH_BUDGET:-150s}
MAX_VRAM=${GPU_CHECK_MAX_VRAM:-2GiB}
HYBRID_CAP=${GPU_CHECK_HYBRID_CAP:-2GiB}
STUDY=$OUT/results/gpu-moe
# the check's own lock: a measurement running elsewhere on the box must not stall it (nor be disturbed by it)
export TUNER_LOCK_FILE=$OUT/measure.lock
export PYTHONUNBUFFERED=1

if [[ $CPU == 1 ]]; then
  VENV=${GPU_CHECK_VENV:-$ROOT/.venv}
  # 6 layers × 4 experts, 7 MiB in q8_0; one thread: the shared CPUs of a dev box
  SYNTH=(--n-embd 256 --n-layer 6 --n-head 4 --n-head-kv 2 --n-ff 256 --n-vocab 512 --n-expert 4 --n-expert-used 2)
  SHAPE=(-t 1 -p 32 -n 8 -r 2)
  NGL=0,7
  NCMOE=0,2,4,6
else
  VENV=${GPU_CHECK_VENV:-$ROOT/.venv-cuda}
  # ~3.4 B params, ~3.6 GB in q8_0: experts are 94% of it, so --n-cpu-moe moves GBs
  SYNTH=(--n-embd 2048 --n-layer 16 --n-head 16 --n-head-kv 4 --n-ff 2048 --n-expert 16 --n-expert-used 2)
  SHAPE=(-p 512 -n 64 -r 2)
  NGL=0,8,12,16,17
  NCMOE=0,2,4,8,16
fi
MODEL=$MODELS/moe-q8_0.gguf
PY=$VENV/bin/python
TUNER=$VENV/bin/tuner

T0=$(date +%s)
: >"$OUT/timings.tsv"
FAILED=()
WARNED=()

summary() {
  local rc=$?
  {
    echo "gpu-check $(date -u +%FT%TZ)  mode: $([[ $CPU == 1 ]] && echo 'CPU fallback (GPU_CHECK_CPU=1)' || echo GPU)"
    echo "venv $VENV  model $MODEL"
    echo
    printf '%-14s %8s  %s\n' step seconds status
    while IFS=$'\t' read -r name secs status; do printf '%-14s %8s  %s\n' "$name" "$secs" "$status"; done \
      <"$OUT/timings.tsv"
    echo
    [[ -f $OUT/verify.txt ]] && cat "$OUT/verify.txt" && echo
    echo "total $(($(date +%s) - T0)) s"
    if ((${#WARNED[@]})); then echo "warnings: ${WARNED[*]}"; fi
    if ((${#FAILED[@]})) || ((rc != 0)); then echo "RESULT: FAIL ${FAILED[*]:-} (exit $rc)"; else echo "RESULT: PASS"; fi
    echo "everything is in $OUT"
  } | tee "$OUT/summary.txt"
  if [[ -n ${GPU_CHECK_TAR:-} ]]; then
    tar czf "$GPU_CHECK_TAR" -C "$OUT" --exclude="measure.*" --exclude="*.lock" . || true
  fi
  exit "$rc"
}
trap summary EXIT

# step NAME [--optional] CMD...: run CMD with its output in logs/NAME.log, timed; a required step that fails
# stops the check (after printing its log's tail), an optional one is noted and the check goes on.
step() {
  local name=$1 optional=0
  shift
  if [[ ${1:-} == --optional ]]; then optional=1; shift; fi
  local log=$OUT/logs/$name.log t rc=0
  echo "== $name: $*" | cut -c1-200
  t=$(date +%s)
  # a subshell outside any `||`: `set -e` holds inside multi-command step functions too
  set +e
  (set -e; "$@") >"$log" 2>&1
  rc=$?
  set -e
  t=$(($(date +%s) - t))
  if ((rc == 0)); then
    printf '%s\t%s\t%s\n' "$name" "$t" ok >>"$OUT/timings.tsv"
    echo "   ok (${t}s)"
    return 0
  fi
  if ((optional)); then
    printf '%s\t%s\t%s\n' "$name" "$t" "warn (exit $rc)" >>"$OUT/timings.tsv"
    WARNED+=("$name")
    echo "   warn: exit $rc (${t}s), see $log"
    return 0
  fi
  printf '%s\t%s\t%s\n' "$name" "$t" "FAIL (exit $rc)" >>"$OUT/timings.tsv"
  FAILED+=("$name")
  echo "   FAIL: exit $rc (${t}s); last lines of $log:"
  tail -n 25 "$log" | sed 's/^/   | /'
  exit "$rc"
}

skip() {
  printf '%s\t%s\t%s\n' "$1" 0 "skipped ($2)" >>"$OUT/timings.tsv"
  echo "== $1: skipped ($2)"
}

# -- 1. the GPU ------------------------------------------------------------------------------------------------
gpu_info() {
  nvidia-smi
  nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv
}
if [[ $CPU == 1 ]]; then
  skip nvidia-smi "CPU fallback"
else
  step nvidia-smi gpu_info
  cp "$OUT/logs/nvidia-smi.log" "$OUT/nvidia-smi.txt"
fi

# -- 2. the CUDA build -------------------------------------------------------------------------------------------
PIP_SRC=()
[[ -n ${GPU_CHECK_WHEELHOUSE:-} ]] && PIP_SRC=(--no-index --find-links "$GPU_CHECK_WHEELHOUSE")

has_offload() {
  [[ -x $PY ]] && "$PY" -c 'import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)' \
    >/dev/null 2>&1
}

build_cuda() {
  # system site packages: the image's numpy/pandas/pyarrow/scikit-build-core/cmake/ninja, no downloads for them
  [[ -x $PY ]] || python3 -m venv --system-site-packages "$VENV"
  local iso=()
  # with the build backend at hand, no isolated build env (which would need an index)
  "$PY" -c 'import scikit_build_core' 2>/dev/null && iso=(--no-build-isolation)
  command -v nvcc || export PATH=/usr/local/cuda/bin:$PATH
  nvcc --version
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 ${GPU_CHECK_CMAKE_ARGS:-}" \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PY" -m pip install -v --no-cache-dir --force-reinstall --no-deps --no-binary llama-cpp-python \
    "${iso[@]}" "${PIP_SRC[@]}" "${LLAMA_CPP_PYTHON_SPEC:-llama-cpp-python==0.3.36}"
  # its dependencies (diskcache, ...) come with tuner's install next; find_spec does not import the package
  "$PY" - <<'PY'
import importlib.util, pathlib, sys
libs = sorted(p.name for p in (pathlib.Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib").iterdir())
print("built:", " ".join(libs))
sys.exit(0 if any("cuda" in n for n in libs) else "no CUDA backend in the build (is nvcc on PATH?)")
PY
}

install_tuner() {
  # llama-cpp-python is already satisfied (the CUDA build above): pip keeps it and adds its dependencies
  "$PY" -m pip install --no-build-isolation "${PIP_SRC[@]}" -e .
  "$TUNER" --version
  "$PY" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "offload:", llama_cpp.llama_supports_gpu_offload())'
}

if [[ $CPU == 1 ]]; then
  skip cuda-build "CPU fallback uses $VENV"
  [[ -x $TUNER ]] || { echo "no $TUNER: run 'make install' first" >&2; exit 2; }
elif has_offload && [[ ${GPU_CHECK_REBUILD:-0} != 1 ]]; then
  skip cuda-build "$VENV already offloads; GPU_CHECK_REBUILD=1 to rebuild"
else
  step cuda-build build_cuda
fi
if [[ $CPU == 1 ]]; then skip install "CPU fallback"; else step install install_tuner; fi
"$PY" -m pip freeze >"$OUT/pip-freeze.txt" 2>/dev/null || true

# -- 3. what tuner sees --------------------------------------------------------------------------------------------
hw() {
  "$TUNER" hw
  "$TUNER" hw --json >"$OUT/hw.json"
  # the GPU run is void without offload: a CPU-only wheel slipped in
  [[ $CPU == 1 ]] || "$PY" -c 'import json,sys; h=json.load(open(sys.argv[1])); sys.exit(0 if h["gpu_offload"] and h["gpus"] else "no GPU offload or no GPU seen")' "$OUT/hw.json"
  # llama.cpp's CUDA0 matched to NVML's GPU by PCI bus id (tuner.measure.hardware.merge_devices)
  [[ $CPU == 1 ]] || "$PY" -c 'import json,sys; g=json.load(open(sys.argv[1]))["gpus"][0]; sys.exit(0 if g["llama"] == "CUDA0" and g["index"] >= 0 and g["pci"] else f"GPU 0 not matched: {g}")' "$OUT/hw.json"
}
step hw hw
cp "$OUT/logs/hw.log" "$OUT/hw.txt"

# -- 4. the model ----------------------------------------------------------------------------------------------------
step synth "$TUNER" synth "$MODELS" --preset moe --quants q8_0 "${SYNTH[@]}"

# -- 5. one config, experts of 4 layers in host RAM, against all on the GPU ---------------------------------------------
bench() {
  local n=$1 rc=0
  "$TUNER" bench "$MODEL" -ngl 99 --n-cpu-moe "$n" "${SHAPE[@]}" -o "$OUT/bench.parquet" --json \
    >"$OUT/bench-ncmoe$n.json" || rc=$?
  ((rc <= 1))  # 1: the trial failed but was recorded, and verify names its cause; 2: bad input
}
step bench-ncmoe4 bench 4
step bench-ncmoe0 bench 0

# -- 5b. speed before download on the GPU (issue 22): full offload and the hybrid split, predicted vs measured -----
speed_gpu() {
  local threads
  threads=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["config"]["n_threads"])' "$OUT/bench-ncmoe0.json")
  # the bench model's type, F16 (the KV cache) and a K-quant; only the bench's thread count: minutes, not tens
  "$TUNER" probe -o "$OUT/probe.json" -t "$threads" --types Q8_0,F16,Q4_K -r 2  # prints its figures
  "$PY" - "$OUT" "$MODEL" <<'PY'
import json, statistics, sys
from pathlib import Path

from tuner.measure import hardware
from tuner.plan import probe, speed
from tuner.model.meta import read_model

out, model = Path(sys.argv[1]), sys.argv[2]
rig, info = probe.load(out / "probe.json"), read_model(model)
offload = bool(hardware.build_info()["gpu_offload"])


def fmt(e):
    return "-" if e is None else f"{100 * e:+.1f} %"


rows = []
for n in (0, 4):
    b = json.loads((out / f"bench-ncmoe{n}.json").read_text())
    if b["outcome"] != "ok":
        continue
    c = b["config"]
    p = speed.predict(info, rig, c["n_threads"], n_gpu_layers=c["n_gpu_layers"], n_cpu_moe=n, n_prompt=c["n_prompt"],
                      n_gen=c["n_gen"], gpu_offload=offload)
    tg, pp = statistics.median(b["tg_samples"]), statistics.median(b["pp_samples"])
    row = {"n_cpu_moe": n, "n_gpu_layers": c["n_gpu_layers"], "threads": c["n_threads"], "tg_tps": tg, "pp_tps": pp,
           **p.to_dict()}
    row["tg_error"] = p.pred_tg_tps / tg - 1 if p.pred_tg_tps else None
    row["pp_error"] = p.pred_pp_tps / pp - 1 if p.pred_pp_tps else None
    rows.append(row)
    print(f"-ngl {c['n_gpu_layers']} --n-cpu-moe {n}: tg {tg:.1f} pred {p.pred_tg_tps or 0:.1f} ({fmt(row['tg_error'])}), "
          f"pp {pp:.1f} pred {p.pred_pp_tps or 0:.1f} ({fmt(row['pp_error'])}) {p.note}")
(out / "speed-gpu.json").write_text(json.dumps({"gpu_offload": offload, "probe": str(out / "probe.json"),
                                                "rows": rows}, indent=1))
sys.exit(0 if rows and all(r["pred_tg_tps"] for r in rows) else 1)
PY
}
step speed --optional speed_gpu

# -- 6. the search ---------------------------------------------------------------------------------------------------
# the GPU: the default space under a VRAM cap below the model's size (the hybrid region is the answer); the CPU
# fallback has no region to find (no offload), so it searches the placement dimensions as given
if [[ $CPU == 1 ]]; then SPACE=(--ngl "$NGL" --n-cpu-moe "$NCMOE"); else SPACE=(--max-vram "$HYBRID_CAP"); fi
dry_run() {
  "$TUNER" search -m "$MODEL" "${SPACE[@]}" "${SHAPE[@]}" --dry-run --json >"$OUT/dry-run.json"
  "$TUNER" search -m "$MODEL" "${SPACE[@]}" "${SHAPE[@]}" --dry-run
}
step dry-run dry_run
search() {
  rm -rf "$STUDY"
  "$TUNER" search -m "$MODEL" "${SPACE[@]}" "${SHAPE[@]}" --n-trials "$TRIALS" \
    --timeout "$BUDGET" --trial-timeout 120 --drift-every 0 --results "$OUT/results" --study gpu-moe
}
step search search

# -- 7. verify what llama.cpp did ------------------------------------------------------------------------------------------
verify() {
  "$PY" - "$OUT" "$STUDY" "$MODEL" "$CPU" <<'PY'
import json, re, shlex, sys
from pathlib import Path

from tuner.measure import store
from tuner.search.bench import fmt_size
from tuner.model.meta import read_model
from tuner.record import moe_part_pattern

out, study, model, cpu = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
info = read_model(model)
exps = {t.name: t for t in info.tensors if t.group == "exps"}
lines, bad = [], []


def check(cond, msg):
    lines.append(("ok   " if cond else "FAIL ") + msg)
    if not cond:
        bad.append(msg)


def placed(applied):
    """Tensor names from "tensor=buffer", each in a host buffer (CPU, CPU_*, or a pinned *_Host)."""
    host = all(b == "CPU" or b.startswith("CPU_") or b.endswith("_Host") for b in (a.rsplit("=", 1)[1] for a in applied))
    names = [a.rsplit("=", 1)[0] for a in applied]
    return set(names) if host and len(names) == len(set(names)) else None


def expected(n, part="none"):
    """Experts of the first n layers, and the tensors of layer n that --moe-part names (tuner.record)."""
    out = {name for name, t in exps.items() if t.layer < n}
    if part != "none":
        rx = re.compile(moe_part_pattern(n, part))
        out |= {t.name for t in info.tensors if rx.search(t.name)}
    return out


b4 = json.loads((out / "bench-ncmoe4.json").read_text())
b0 = json.loads((out / "bench-ncmoe0.json").read_text())
check(b4["outcome"] == "ok" and b0["outcome"] == "ok", f"bench outcomes: ncmoe4 {b4['outcome']} {b4['cause']}"
      f" | ncmoe0 {b0['outcome']} {b0['cause']}")
check(placed(b4["overrides_applied"]) == expected(4), f"bench --n-cpu-moe 4: llama.cpp placed "
      f"{len(b4['overrides_applied'])} expert tensors in host buffers (expected {len(expected(4))}: blk.0-3)")
check(b0["overrides_applied"] == [], "bench --n-cpu-moe 0: no override reported")
moved = sum(exps[n].n_bytes for n in expected(4))
if cpu:
    lines.append(f"--   VRAM not measured (CPU fallback); experts of blk.0-3: {fmt_size(moved)}")
else:
    v4, v0 = b4.get("peak_vram_bytes") or 0, b0.get("peak_vram_bytes") or 0
    check(b4["n_gpu_layers_effective"] == info.n_layer + 1, f"all {info.n_layer + 1} layers offloaded")
    # the other half of the proof: those bytes really left the GPU
    check(v0 > 0, "peak VRAM measured (NVML per-process usage)" if v0 else
          "peak VRAM not measured: NVML reported no per-process usage for the worker")
    check(v0 - v4 >= 0.8 * moved, f"peak VRAM {fmt_size(v0)} (ncmoe 0) - {fmt_size(v4)} (ncmoe 4) = "
          f"{fmt_size(v0 - v4)} saved; expert bytes of blk.0-3: {fmt_size(moved)}")
    for b, n in ((b0, 0), (b4, 4)):
        lines.append(f"--   bench ncmoe {n}: tg {b['tg_samples']} t/s, pp {b['pp_samples']} t/s")

df = store.read(study)
trials = df[df["state"] != "anchor"]
okt = trials[trials["outcome"] == "ok"]
check(len(okt) >= 3, f"search: {len(okt)} ok of {len(trials)} trials")
check(trials["n_cpu_moe"].nunique() > 1, f"search varied n_cpu_moe: {sorted(map(int, trials['n_cpu_moe'].unique()))}")
if not cpu:  # the hybrid region: every layer on the GPU, experts of the first N layers in RAM
    plan = json.loads((out / "dry-run.json").read_text())
    lo = min(plan["dimensions"]["n_cpu_moe"])
    check(sorted(set(map(int, trials["n_gpu_layers"]))) == [info.n_layer + 1] and lo > 0,
          f"search kept all {info.n_layer + 1} layers on the GPU, n_cpu_moe {lo}..{info.n_layer} "
          f"(dry run: {plan['configs']} configs fit)")
    asked = [n for n in plan["notes"] if n.startswith("llama.cpp sized the compute buffers")]
    check(asked and not asked[0].startswith("llama.cpp sized the compute buffers of 0 "),
          f"the planner took the compute buffers from llama.cpp (no_alloc loads on CUDA0): {asked}")
    by = trials["vram_by"].value_counts().to_dict() if "vram_by" in trials else {}
    check(by.get("none", 0) == 0, f"VRAM measured on every trial, by {by}")
    both = okt[[len(list(d)) > 0 for d in okt["vram_device_by_gpu"]]] if "vram_device_by_gpu" in okt else okt[:0]
    for r in both.itertuples():  # both NVML sources side by side: the worker's own figure and the device's
        lines.append(f"--   trial {r.trial_number} ncmoe {r.n_cpu_moe}: VRAM {fmt_size(r.peak_vram_bytes or 0)} "
                     f"by {r.vram_by}, device-wide {fmt_size(sum(r.vram_device_by_gpu))}, planner "
                     f"{fmt_size(r.predicted_vram_bytes or 0)}")
# a baseline with its own -ot placement (--fit's) is checked below, by what llama.cpp reports for it
wrong = [
    int(r.trial_number)
    for r in okt.itertuples()
    if not len(r.overrides) and placed(list(r.overrides_applied)) != expected(r.n_cpu_moe, r.moe_part)
]
check(not wrong, f"every ok trial's expert placement matches its n_cpu_moe and moe_part (mismatched: {wrong})")
rec = json.loads((study / "recommended.json").read_text())
if not cpu:  # llama-server's own placement (--fit, on by default) measured as the baseline to beat
    fitted = trials[trials["baseline"] == "llama-server default (--fit)"]
    check(len(fitted) >= 1, f"llama-server's --fit placement measured as a baseline: "
          f"{[(r.outcome, list(r.overrides)[:2]) for r in fitted.itertuples()]}")
    lines.append(f"--   headline: {json.dumps(rec.get('vs_defaults'))}")
    lines.append(f"--   vs --fit (confirmation): {json.dumps((rec.get('confirmation') or {}).get('vs_fit'))}")
n = rec["config"]["n_cpu_moe"]
if not cpu:
    check(rec["config"]["n_gpu_layers"] == info.n_layer + 1 and n >= lo,
          f"recommended -ngl {rec['config']['n_gpu_layers']} --n-cpu-moe {n} under --max-vram (region from {lo})")
argv = rec["forms"]["llama_server_argv"]
has = "--n-cpu-moe" in argv and argv[argv.index("--n-cpu-moe") + 1] == str(n)
check(has == (n > 0) and shlex.split(rec["forms"]["llama_server"]) == argv,
      f"recommended.json: n_cpu_moe={n}, llama-server form: {rec['forms']['llama_server']}")
cols = ["trial_number", "outcome", "n_gpu_layers", "n_cpu_moe", "tg_ts_mean", "pp_ts_mean", "peak_vram_bytes",
        "peak_rss_bytes", "cause"]
(out / "trials.txt").write_text(trials[[c for c in cols if c in trials]].sort_values("trial_number")
                                .to_string(index=False) + "\n")
(out / "verify.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(1 if bad else 0)
PY
}
step verify verify

# -- 6c. the recommendation against llama-bench with the same flags; fidelity at 4, 8, 16 threads ---------------
against_llama_bench() {
  local flags
  flags=$("$PY" -c 'import json,sys; c=json.load(open(sys.argv[1]))["config"]; print(f"-ngl {c[\"n_gpu_layers\"]} -ncmoe {c[\"n_cpu_moe\"]} -ub {c[\"n_ubatch\"]} -fa {1 if c[\"flash_attn\"] == \"on\" else 0}")' \
    "$STUDY/recommended.json")
  # shellcheck disable=SC2086
  "$LLAMA_BENCH" -m "$MODEL" $flags -p 512 -n 64 -r 3 -o json >"$OUT/llama-bench-recommended.json"
  "$TUNER" bench --config "$STUDY/recommended.json" -p 512 -n 64 -r 3 -o "$OUT/bench.parquet" --json \
    >"$OUT/tuner-bench-recommended.json"
  "$PY" benchmarks/fidelity.py --model "$MODEL" -t 4,8,16 --rounds 3 --out "$OUT/fidelity-gpu.json" -ngl 99 || true
}
if [[ -n ${LLAMA_BENCH:-} && $CPU != 1 ]]; then step llama-bench --optional against_llama_bench
else skip llama-bench "LLAMA_BENCH unset (build it: see benchmarks/README.md)"; fi

# -- 7b. planner vs llama.cpp's own buffers per device (issue 13) -------------------------------------------------
# Sparse GGUFs (real headers, no weights: tuner.plan.oracle) loaded for real with mmap and use_extra_bufts off, for
# several n_gpu_layers / n_cpu_moe; llama.cpp's buffers per device (CUDA0 model/KV/compute, host) against the
# planner's split. Targets: GPU weights within 2 %, KV per device exact to the log's 0.01 MiB; the CUDA compute
# buffer is reported, not judged (the planner's compute formulas were checked on the CPU backend only).
# CPU fallback: small shapes, everything on the CPU. Output: oracle-gpu.json, oracle-gpu.txt.
planner_oracle() {
  "$PY" - "$OUT" "$MODELS/oracle" "$CPU" <<'PY'
import json, sys
from pathlib import Path

from tuner.plan import oracle, planner
from tuner.model.meta import read_model
from tuner.record import TrialConfig

out, models, cpu = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
MiB, HALF = 1 << 20, 0.005 * (1 << 20) + 1
if cpu:  # few layers, small vocabulary: seconds, a few hundred MB of (sparse) file pages
    shapes = [(a, "", dict(small=True)) for a in ("llama", "gpt-oss", "qwen3moe")]
else:  # published sizes that a real load maps in seconds (the files are holes; 5-19 GB apparent)
    shapes = [(a, t, dims) for t, (a, dims) in oracle.HELD_OUT.items() if t in ("llama/8B", "gpt-oss/20b", "qwen3moe/30B-A3B")]
jobs = []
for arch, tag, dims in shapes:
    path = oracle.model_file(arch, models, tag=tag.split("/")[-1], **dims)
    n = read_model(path).n_layer
    splits = [(0, 0), (n // 2, 0), (n + 1, 0)] + ([(n + 1, n // 2)] if read_model(path).is_moe else [])
    jobs += [oracle.Job(model=str(path), n_ctx=8192, mode="real", n_gpu_layers=g, n_cpu_moe=c) for g, c in splits]
lines, rows, bad = [], [], []
for job, res in zip(jobs, oracle.measure(jobs, timeout=600)):
    info = read_model(job.model)
    name = f"{Path(job.model).stem} ngl {job.n_gpu_layers} ncmoe {job.n_cpu_moe}"
    if res["outcome"] != "ok":
        bad.append(name)
        lines.append(f"FAIL {name}: {res.get('cause')}")
        continue
    cfg = TrialConfig(model=job.model, n_ctx=job.n_ctx, n_ubatch=job.n_ubatch, n_gpu_layers=job.n_gpu_layers,
                      n_cpu_moe=job.n_cpu_moe, flash_attn=job.flash_attn)
    p = planner.predict(cfg, info, gpu_offload=not cpu)
    dev = lambda d: sum(v for k, v in d.items() if k.startswith("CUDA") and not k.endswith("_Host"))
    host = lambda d: sum(v for k, v in d.items() if not (k.startswith("CUDA") and not k.endswith("_Host")))
    seen = {"weights_gpu": dev(res["model"]), "kv_gpu": dev(res["kv"]), "kv_host": host(res["kv"]),
            "compute_gpu": dev(res["compute"]), "compute_host": host(res["compute"])}
    want = {"weights_gpu": p.weights_gpu, "kv_gpu": p.kv_gpu, "kv_host": p.kv_host,
            "compute_gpu": p.compute_gpu, "compute_host": p.compute_reserved}
    ok = (abs(want["weights_gpu"] - seen["weights_gpu"]) <= max(0.02 * seen["weights_gpu"], HALF)
          and abs(want["kv_gpu"] - seen["kv_gpu"]) <= 2 * HALF and abs(want["kv_host"] - seen["kv_host"]) <= 2 * HALF)
    if cpu:  # no offload: everything is host memory, the whole file mapped
        ok = ok and abs(sum(res["model"].values()) / p.weights_total - 1) < 0.02
    bad += [] if ok else [name]
    rows.append({"model": job.model, "n_gpu_layers": job.n_gpu_layers, "n_cpu_moe": job.n_cpu_moe,
                 "llama_cpp": res, "planner": want, "ok": ok})
    lines.append(("ok   " if ok else "FAIL ") + name + ": " + "  ".join(
        f"{k} {seen[k] / MiB:.2f}/{want[k] / MiB:.2f}" for k in seen) + " MiB (llama.cpp/planner)")
(out / "oracle-gpu.json").write_text(json.dumps({"cpu_fallback": cpu, "rows": rows}, indent=1))
(out / "oracle-gpu.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(1 if bad or not rows else 0)
PY
}
step planner-oracle planner_oracle
# -- end of 7b ------------------------------------------------------------------------------------------------------

# -- 8. the hybrid pick under a VRAM cap (nothing re-run; no fitting trial is a warning, not a failure) -----------
capped() {
  "$TUNER" recommend "$STUDY" --max-vram "$MAX_VRAM" --no-write --json >"$OUT/recommended-max-vram.json"
  "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print("under", sys.argv[2], "->", r["forms"]["llama_server"])' \
    "$OUT/recommended-max-vram.json" "$MAX_VRAM"
}
if [[ $CPU == 1 ]]; then skip recommend-cap "no VRAM on the CPU fallback"; else step recommend-cap --optional capped; fi

# -- 9. the report ---------------------------------------------------------------------------------------------------
if "$TUNER" report --help >/dev/null 2>&1; then
  step report "$TUNER" report "$STUDY" --out "$OUT/report" --outcome-map n_gpu_layers,n_cpu_moe
else
  skip report "this install has no tuner report"
fi

# -- 10. the MoE tests on this build -------------------------------------------------------------------------------
if [[ ${GPU_CHECK_TESTS:-1} == 1 ]] && "$PY" -c 'import pytest' 2>/dev/null; then
  step pytest-moe env TUNER_TEST_MODELS="$MODELS/test-models" "$PY" -m pytest -q -p no:cacheprovider tests/test_moe.py
else
  skip pytest-moe "GPU_CHECK_TESTS=0 or no pytest in $VENV"
fi

# -- 11. the rest of the suite on this build (the tests assert on what the build reports, GPU or not) -----------
suite() {
  # the test extra (pytest-timeout, hypothesis) from the index or the wheelhouse, if this venv lacks it
  "$PY" -c 'import pytest, pytest_timeout, hypothesis' 2>/dev/null ||
    "$PY" -m pip install "${PIP_SRC[@]}" pytest pytest-timeout hypothesis
  env TUNER_TEST_MODELS="$MODELS/test-models" "$PY" -m pytest -q -p no:cacheprovider --ignore=tests/test_moe.py \
    --junitxml="$OUT/pytest-suite.xml" tests
}
if [[ ${GPU_CHECK_TESTS:-1} == 1 && ${GPU_CHECK_SUITE:-1} == 1 ]]; then
  step pytest-suite suite
else
  skip pytest-suite "GPU_CHECK_TESTS=0 or GPU_CHECK_SUITE=0"
fi

#!/usr/bin/env python3
"""Parallel fidelity: `tuner bench --parallel N` vs llama-batched-bench -npl N on the same model, shape and source.

For each N, each round runs llama-batched-bench (`-npl N,N,...`: one process, `--reps` measurements after its
own 16-token warm-up, `--output-format jsonl`) and `tuner bench --parallel N --json` (the real CLI, as a
subprocess: `--reps` repetitions after one untimed) one after the other, the order alternating by round (A B,
then B A), so drift and the neighbours' load hit both alike. Both get the same context: N x (n_prompt + n_gen)
cells (-c), n_ctx / N each (neither unifies the KV cache unless --kv-unified). Per round and N it takes the
ratio tuner / batched-bench of the median aggregate tg (S_TG) and pp (S_PP) of the repetitions; the verdict is the
median ratio over the rounds, tg and pp each within ±5 %; the range of the ratios says how much of it is load.
On a shared machine the neighbours' load only ever slows a tool down, by seconds-long bursts that a round's two runs
do not share alike, so the script also compares each tool's fastest samples (the median of its `FASTEST` fastest over
all rounds: what it measures when it ran uncontended); `--rescore FILE` recomputes both from a saved result.

The binary: llama-batched-bench built from the llama.cpp source llama-cpp-python vendors
(`cmake --build /tmp/llcpp/build --target llama-batched-bench`).

Examples:
  benchmarks/parallel_fidelity.py                                   # Gemma 3 270M, N = 1,2,4, 5 rounds
  benchmarks/parallel_fidelity.py -npl 1,2,4,8 -p 256 -n 64 --rounds 3 -t 2
  benchmarks/parallel_fidelity.py --model models/dense-q4_0.gguf --kv-unified
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._results import MODEL_CACHE, model_facts, save  # noqa: E402
from benchmarks.fidelity import csv_ints  # noqa: E402

TOLERANCE = 0.05
FASTEST = 3  # samples per tool and N taken as its uncontended speed
DEFAULT_BIN = "/tmp/llcpp/build/bin/llama-batched-bench"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__[__doc__.index("Examples:") :],
    )
    ap.add_argument("--model", default="gemma", help="a GGUF file, or gemma (Gemma 3 270M from the model cache)")
    ap.add_argument("--batched-bench", default=DEFAULT_BIN, help="the llama-batched-bench binary")
    ap.add_argument("-npl", type=csv_ints, default=[1, 2, 4], help="parallel counts [1,2,4]")
    ap.add_argument("-p", type=int, default=128, help="prompt tokens per sequence [128]")
    ap.add_argument("-n", type=int, default=32, help="generated tokens per sequence [32]")
    ap.add_argument("-t", type=int, default=2, help="threads [2]")
    ap.add_argument("--kv-unified", action="store_true", help="one KV cache for all sequences (-kvu) in both")
    ap.add_argument("--reps", type=int, default=3, help="measurements per tool, round and N [3]")
    ap.add_argument("--rounds", type=int, default=5, help="rounds [5]")
    ap.add_argument(
        "--own-libs",
        action="store_true",
        help="run llama-batched-bench on its build's libllama/libggml (default: llama-cpp-python's, by "
        "LD_LIBRARY_PATH, so that only the two measuring loops differ, not the compile flags)",
    )
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per tool run")
    ap.add_argument("--rescore", default=None, help="a saved result JSON: recompute its figures, measure nothing")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/parallel_fidelity-*.json)")
    return ap.parse_args(argv)


def resolve_model(name: str) -> str:
    if name != "gemma":
        return name
    from tuner.model.real import gemma

    return str(gemma(MODEL_CACHE))


def llama_cpp_lib_dir() -> Path:
    """llama-cpp-python's shared libraries, found without loading them into this process."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        sys.exit("parallel_fidelity: llama_cpp is not installed in this Python")
    return Path(spec.origin).parent / "lib"


def run(cmd: list[str], env: dict, timeout: float) -> str:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        sys.exit(f"parallel_fidelity: {Path(cmd[0]).name} failed ({p.returncode}): {p.stderr.strip()[-600:]}")
    return p.stdout + "\n" + p.stderr


def batched_bench(a, model: str, n: int, env: dict) -> dict:
    cmd = [a.batched_bench, "-m", model, "-c", str(n * (a.p + a.n)), "-npp", str(a.p), "-ntg", str(a.n)]
    cmd += ["-npl", ",".join([str(n)] * a.reps), "-t", str(a.t), "-tb", str(a.t), "--output-format", "jsonl"]
    cmd += ["-kvu"] if a.kv_unified else []
    t0 = time.time()
    text = run(cmd, env, a.timeout)
    rows = [json.loads(ln[ln.index("{") :]) for ln in text.splitlines() if '"speed_tg"' in ln]
    if len(rows) != a.reps:
        sys.exit(f"parallel_fidelity: llama-batched-bench printed {len(rows)} results, {a.reps} expected")
    return {
        "tg": statistics.median(r["speed_tg"] for r in rows),
        "pp": statistics.median(r["speed_pp"] for r in rows),
        "tg_samples": [r["speed_tg"] for r in rows],
        "pp_samples": [r["speed_pp"] for r in rows],
        "n_kv_max": rows[0]["n_kv_max"],
        "wall_s": time.time() - t0,
        "cmd": cmd,
    }


def tuner_bench(a, model: str, n: int, env: dict, tmp: Path) -> dict:
    cmd = [sys.executable, "-c", "import sys; sys.argv[0] = 'tuner'; from tuner.cli import main; main()"]
    cmd += ["bench", model, "--parallel", str(n), "-c", str(n * (a.p + a.n)), "-p", str(a.p), "-n", str(a.n)]
    cmd += ["-t", str(a.t), "-tb", str(a.t), "-r", str(a.reps), "--json", "-o", str(tmp / "bench.parquet")]
    cmd += ["-kvu"] if a.kv_unified else []
    t0 = time.time()
    text = run(cmd, env, a.timeout)
    rec = json.loads(next(ln for ln in text.splitlines() if ln.startswith("{")))
    if rec["outcome"] != "ok":
        sys.exit(f"parallel_fidelity: tuner bench: {rec['outcome']}: {rec['cause']}")
    return {
        "tg": statistics.median(rec["tg_samples"]),
        "pp": statistics.median(rec["pp_samples"]),
        "tg_samples": rec["tg_samples"],
        "pp_samples": rec["pp_samples"],
        "tg_stream": statistics.fmean(rec["tg_stream_samples"]),
        "ttft_stream_ms": rec["ttft_stream_ms"],
        "peak_rss_bytes": rec["peak_rss_bytes"],
        "kv_bytes": (rec.get("buffers") or {}).get("CPU", {}).get("kv"),
        "wall_s": time.time() - t0,
    }


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.rescore:
        return finish(json.loads(Path(a.rescore).read_text()), a.out or a.rescore)
    model = resolve_model(a.model)
    if not Path(a.batched_bench).exists():
        sys.exit(f"parallel_fidelity: no llama-batched-bench at {a.batched_bench} (--batched-bench PATH)")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    bb_env = dict(env)
    if not a.own_libs:
        bb_env["LD_LIBRARY_PATH"] = os.pathsep.join([str(llama_cpp_lib_dir())] + [env.get("LD_LIBRARY_PATH", "")])
    rounds = []
    with tempfile.TemporaryDirectory(prefix="parallel-fidelity-") as tmp:
        env["TUNER_LOCK_FILE"] = str(Path(tmp) / "measure.lock")  # the two tools take turns by this script's order
        for i in range(a.rounds):
            for n in a.npl:
                order = ("tuner", "batched") if i % 2 == 0 else ("batched", "tuner")
                got = {}
                for tool in order:
                    if tool == "tuner":
                        got[tool] = tuner_bench(a, model, n, env, Path(tmp))
                    else:
                        got[tool] = batched_bench(a, model, n, bb_env)
                row = {
                    "round": i,
                    "n_seq": n,
                    "order": list(order),
                    "tuner": got["tuner"],
                    "batched_bench": {k: v for k, v in got["batched"].items() if k != "cmd"},
                    "tg_ratio": got["tuner"]["tg"] / got["batched"]["tg"],
                    "pp_ratio": got["tuner"]["pp"] / got["batched"]["pp"],
                    "loadavg": os.getloadavg()[0],
                }
                rounds.append(row)
                print(
                    f"round {i} N={n}: tg {row['tuner']['tg']:.2f} vs {row['batched_bench']['tg']:.2f} "
                    f"({row['tg_ratio']:.3f}), pp {row['tuner']['pp']:.1f} vs {row['batched_bench']['pp']:.1f} "
                    f"({row['pp_ratio']:.3f}), load {row['loadavg']:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
    result = {
        "benchmark": "parallel_fidelity",
        "what": "tuner bench --parallel N vs llama-batched-bench -npl N: aggregate tg (S_TG) and pp (S_PP)",
        "model": model_facts(model),
        "shape": {"n_prompt": a.p, "n_gen": a.n, "threads": a.t, "kv_unified": a.kv_unified, "reps": a.reps},
        "batched_bench": a.batched_bench,
        "batched_bench_libs": "its own build (RUNPATH)" if a.own_libs else str(llama_cpp_lib_dir()),
        "tolerance": TOLERANCE,
        "rounds": rounds,
    }
    return finish(result, a.out)


def fastest(rs: list[dict], tool: str, k: str) -> float:
    """The median of a tool's FASTEST fastest samples of k over the rounds."""
    return statistics.median(sorted(x for r in rs for x in r[tool][f"{k}_samples"])[-FASTEST:])


def finish(result: dict, out: str | None) -> int:
    """Per-N figures and the verdict from the rounds; saves and prints them."""
    rounds = result["rounds"]
    per_n = {}
    for n in sorted({r["n_seq"] for r in rounds}):
        rs = [r for r in rounds if r["n_seq"] == n]
        tg = statistics.median(r["tg_ratio"] for r in rs)
        pp = statistics.median(r["pp_ratio"] for r in rs)
        per_n[str(n)] = {
            "tuner_tg_aggregate": statistics.median(r["tuner"]["tg"] for r in rs),
            "batched_bench_tg_aggregate": statistics.median(r["batched_bench"]["tg"] for r in rs),
            "tuner_pp_aggregate": statistics.median(r["tuner"]["pp"] for r in rs),
            "batched_bench_pp_aggregate": statistics.median(r["batched_bench"]["pp"] for r in rs),
            "tuner_tg_per_stream": statistics.median(r["tuner"]["tg_stream"] for r in rs),
            "tg_ratio_median": tg,
            "pp_ratio_median": pp,
            # the spread says whether the median is the tools' difference or the neighbours' load
            "tg_ratio_range": [min(r["tg_ratio"] for r in rs), max(r["tg_ratio"] for r in rs)],
            "pp_ratio_range": [min(r["pp_ratio"] for r in rs), max(r["pp_ratio"] for r in rs)],
            "tg_ratios": [r["tg_ratio"] for r in rs],
            "pp_ratios": [r["pp_ratio"] for r in rs],
            "tg_within": abs(tg - 1) <= TOLERANCE,
            "pp_within": abs(pp - 1) <= TOLERANCE,
        }
        for k in ("tg", "pp"):
            ratio = fastest(rs, "tuner", k) / fastest(rs, "batched_bench", k)
            per_n[str(n)][f"{k}_fastest_ratio"] = ratio
            per_n[str(n)][f"{k}_fastest_within"] = abs(ratio - 1) <= TOLERANCE
    result["fastest"] = FASTEST
    result["per_n"] = per_n
    if all(v["tg_within"] and v["pp_within"] for v in per_n.values()):
        result["verdict"] = "within"
    elif all(v["tg_fastest_within"] and v["pp_fastest_within"] for v in per_n.values()):
        result["verdict"] = "within at the fastest samples; the round medians are outside (load)"
    else:
        result["verdict"] = "outside"
    save("parallel_fidelity", result, echo=False, path=out)
    for n, v in per_n.items():
        print(
            f"N={n}: tg {v['tuner_tg_aggregate']:.2f} vs {v['batched_bench_tg_aggregate']:.2f} t/s "
            f"(median ratio {v['tg_ratio_median']:.3f}, {v['tg_ratio_range'][0]:.3f}-{v['tg_ratio_range'][1]:.3f}), "
            f"pp {v['tuner_pp_aggregate']:.1f} vs {v['batched_bench_pp_aggregate']:.1f} "
            f"(median ratio {v['pp_ratio_median']:.3f}, {v['pp_ratio_range'][0]:.3f}-{v['pp_ratio_range'][1]:.3f}); "
            f"fastest {FASTEST}: tg {v['tg_fastest_ratio']:.3f}, pp {v['pp_fastest_ratio']:.3f}"
        )
    print(f"verdict: {result['verdict']}")
    return 0 if result["verdict"] == "within" else 1


if __name__ == "__main__":
    sys.exit(main())

"""`tuner quality` against llama-perplexity --kl-divergence: same models, same text, same context.

Each round runs, in alternating order, llama-perplexity (one `--kl-divergence-base` pass over the reference, then
one `--kl-divergence` pass per quant) and `tuner quality --no-cache` (the real CLI, a subprocess: its reference
pass, then one pass per quant). Targets, per quant: tuner's mean KLD within 5 % (relative) of llama-perplexity's
and same-top within 1 point; per case: the median over rounds of the wall-time ratio tuner / llama-perplexity
(all passes, process start-up and model loads included) at most 1.2. Exit 1 when any target is missed.

Cases: `gemma` (the real Gemma 3 270M: its Q4_K_M is the reference, llama.cpp requantizes it to lower quants)
and `synthetic` (tuner.model.synth's tiny model: an F32 reference and llama.cpp's q8_0 / q4_k_m / q2_k of it).
Everything it ran goes to benchmarks/results/quality-vs-perplexity-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import save  # noqa: E402

from tuner import files  # noqa: E402
from tuner.measure.lock import measurement_lock  # noqa: E402

KLD_TOL = 0.05  # relative
KLD_PRINT = 5e-7  # llama-perplexity prints the mean KLD with 6 decimals: half a unit of the last digit
SAME_TOP_TOL = 1.0  # percentage points
TIME_TOL = 1.2  # tuner / llama-perplexity wall time
# The wall-time target is judged where the work per token dominates: on the tiny synthetic model a whole
# llama-perplexity pass takes well under a second and the ratio measures Python's start-up, not the pass.
TIME_MIN_S = 20.0
MODEL_CACHE = Path(os.environ.get("TUNER_TEST_MODELS", Path.home() / ".cache" / "tuner-test-models"))
LLAMA_PERPLEXITY = "/work/llama-tools/build/bin/llama-perplexity"

# what llama-perplexity prints at the end of --kl-divergence (tools/perplexity/perplexity.cpp)
PATTERNS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([-\d.]+)",
    "ppl_ref": r"Mean PPL\(base\)\s*:\s*([-\d.]+)",
    "ln_ppl_ratio": r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*([-\d.]+)",
    "kld_mean": r"Mean\s+KLD:\s*([-\d.]+)",
    "kld_mean_err": r"Mean\s+KLD:\s*[-\d.]+\s*±\s*([-\d.]+)",
    "kld_median": r"Median\s+KLD:\s*([-\d.]+)",
    "kld_p99": r"99\.0%\s+KLD:\s*([-\d.]+)",
    "kld_max": r"Maximum KLD:\s*([-\d.]+)",
    "same_top_pct": r"Same top p:\s*([-\d.]+)",
}
COMPARED = ("kld_mean", "kld_mean_err", "kld_median", "kld_p99", "same_top_pct", "ppl", "ppl_ref", "ln_ppl_ratio")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-perplexity", default=os.environ.get("LLAMA_PERPLEXITY", LLAMA_PERPLEXITY))
    ap.add_argument("--cases", default="gemma,synthetic", help="gemma and/or synthetic")
    ap.add_argument("--gemma-quants", default="q4_0,q2_k", help="lower quants requantized from Gemma's Q4_K_M")
    ap.add_argument("--synthetic-quants", default="q8_0,q4_k_m,q2_k")
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument(
        "-t", "--threads", type=int, default=1, help="threads for both tools (1: far less sensitive to a busy machine)"
    )
    ap.add_argument("--text", default=None, help="UTF-8 text (default: the text tuner ships)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="judge the time target on CPU seconds (user + sys of each tool's whole process tree) "
        "instead of wall seconds: on a busy machine wall time measures the scheduler",
    )
    return ap.parse_args(argv)


def gemma_case(quants: list[str]) -> dict:
    from tuner.llama import quantize
    from tuner.model.synth import quant_ftypes

    ref = MODEL_CACHE / "gemma-3-270m-q4_k_m.gguf"
    if not ref.is_file():
        sys.exit(f"quality_vs_perplexity: error: the real Gemma model is not at {ref}")
    out = []
    for q in quants:
        dst = MODEL_CACHE / "quality" / f"gemma-3-270m-{q}.gguf"
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            with files.atomic_path(dst, tmp=dst.with_suffix(".gguf.part")) as part:
                quantize(ref, part, quant_ftypes()[q], allow_requantize=True)
        out.append(str(dst))
    return {"name": "gemma", "reference": str(ref), "quants": out}


def synthetic_case(quants: list[str]) -> dict:
    from tuner.model.synth import synthesize

    paths = [str(p) for p in synthesize(MODEL_CACHE / "quality", "tiny", ("f32", *quants))]
    return {"name": "synthetic", "reference": paths[0], "quants": paths[1:]}


def run(cmd: list[str], env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, float, float]:
    """The finished process, wall seconds and CPU seconds (user + sys of the whole tree, workers included)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, start_new_session=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"quality_vs_perplexity: error: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return proc, wall, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)


def llama_side(a, case: dict, text: str, tmp: Path) -> dict:
    base = tmp / "base.bin"
    common = ["-c", str(a.ctx), "-t", str(a.threads)]
    proc, wall, cpu = run(
        [a.llama_perplexity, "-m", case["reference"], "-f", text, *common, "--kl-divergence-base", str(base)],
        os.environ.copy(),
        a.timeout,
    )
    # (its log is asynchronous: on a fast run the last lines can be missing, so the base PPL is optional)
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", proc.stdout + proc.stderr)
    out = {
        "reference": {
            "ppl": float(m[1]) if m else None,
            "ppl_err": float(m[2]) if m else None,
            "wall_s": wall,
            "cpu_s": cpu,
            "base_file_bytes": base.stat().st_size,
        },
        "quants": {},
    }
    for q in case["quants"]:
        # llama.cpp's log is written by a thread; a short run can exit before its last lines are out (seen on
        # the tiny model). The figures are deterministic, so such a run is repeated (and counted).
        for attempt in range(3):
            proc, wall, cpu = run(
                [a.llama_perplexity, "-m", q, *common, "--kl-divergence-base", str(base), "--kl-divergence"],
                os.environ.copy(),
                a.timeout,
            )
            found = {k: re.search(p, proc.stdout + proc.stderr) for k, p in PATTERNS.items()}  # LOG() is stdout
            missing = [k for k, m in found.items() if not m]
            if not missing:
                break
        else:
            sys.exit(
                f"quality_vs_perplexity: error: no {', '.join(missing)} in llama-perplexity's output for {q} "
                f"(3 tries):\n{proc.stderr[-1500:]}"
            )
        fig = {k: float(m[1]) for k, m in found.items()}
        out["quants"][q] = {**fig, "wall_s": wall, "cpu_s": cpu, "output_retries": attempt}
    base.unlink()
    out["wall_s"] = out["reference"]["wall_s"] + sum(x["wall_s"] for x in out["quants"].values())
    out["cpu_s"] = out["reference"]["cpu_s"] + sum(x["cpu_s"] for x in out["quants"].values())
    return out


def tuner_side(a, case: dict, text: str, env: dict) -> dict:
    cmd = [
        sys.executable,
        "-c",
        "from tuner.cli import cli; cli()",
        "quality",
        "-m",
        case["reference"],
        *sum((["-m", q] for q in case["quants"]), []),
        "--reference",
        case["reference"],
        "--text",
        text,
        "-c",
        str(a.ctx),
        "-t",
        str(a.threads),
        "--no-cache",
        "--json",
    ]
    proc, wall, cpu = run(cmd, env, a.timeout)
    rows = {r["model"]: r for r in json.loads(proc.stdout)}
    ref = rows[case["reference"]]
    return {
        "reference": {
            "ppl": ref["ppl"],
            "ppl_err": ref.get("ppl_err"),
            "pass_wall_s": ref["wall_s"],
            "decode_s": ref["decode_s"],
            "numpy_s": ref["numpy_s"],
        },
        "quants": {
            q: {
                **{k: rows[q][k] for k in COMPARED},
                "pass_wall_s": rows[q]["wall_s"],
                "decode_s": rows[q]["decode_s"],
                "numpy_s": rows[q]["numpy_s"],
            }
            for q in case["quants"]
        },
        "wall_s": wall,
        "cpu_s": cpu,
        "top_k": ref["top_k"],
        "tail_samples": ref["tail_samples"],
    }


def summarize(case: dict, cpu_time: bool = False) -> dict:
    rounds = case["rounds"]
    per_quant = {}
    ok = True
    for q in case["quants"]:
        # the figures are deterministic on a CPU (same logits every round): the first round's are the verdict,
        # later rounds show that they repeat
        t, lp = rounds[0]["tuner"]["quants"][q], rounds[0]["llama_perplexity"]["quants"][q]
        kld_rel = t["kld_mean"] / lp["kld_mean"] - 1 if lp["kld_mean"] else float("inf")
        top_diff = t["same_top_pct"] - lp["same_top_pct"]
        repeat = all(r["tuner"]["quants"][q]["kld_mean"] == t["kld_mean"] for r in rounds)
        # within 5 %, or (for a KLD of a few 1e-5) within what llama-perplexity's 6 printed decimals resolve
        kld_ok = abs(t["kld_mean"] - lp["kld_mean"]) <= max(KLD_TOL * abs(lp["kld_mean"]), KLD_PRINT)
        q_ok = kld_ok and abs(top_diff) <= SAME_TOP_TOL
        ok &= q_ok
        per_quant[Path(q).name] = {
            "tuner": {k: t[k] for k in COMPARED},
            "llama_perplexity": {k: lp[k] for k in COMPARED},
            "kld_mean_rel_diff": kld_rel,
            "same_top_diff_points": top_diff,
            "kld_median_rel_diff": t["kld_median"] / lp["kld_median"] - 1 if lp["kld_median"] else None,
            "kld_p99_rel_diff": t["kld_p99"] / lp["kld_p99"] - 1 if lp["kld_p99"] else None,
            "ppl_rel_diff": t["ppl"] / lp["ppl"] - 1,
            "tuner_figures_repeat": repeat,
            "kld_limited_by_print_resolution": KLD_TOL * abs(lp["kld_mean"]) < KLD_PRINT,
            "within_targets": q_ok,
        }
    wall = [r["tuner"]["wall_s"] / r["llama_perplexity"]["wall_s"] for r in rounds]
    cpu = [r["tuner"]["cpu_s"] / r["llama_perplexity"]["cpu_s"] for r in rounds]
    judged = statistics.median(r["llama_perplexity"]["wall_s"] for r in rounds) >= TIME_MIN_S
    time_ok = statistics.median(cpu if cpu_time else wall) <= TIME_TOL or not judged
    return {
        "quants": per_quant,
        "time_judged": judged,
        "time_judged_on": "cpu" if cpu_time else "wall",
        "wall_ratio_median": statistics.median(wall),
        "wall_ratio_min": min(wall),
        "wall_ratio_max": max(wall),
        "cpu_ratio_median": statistics.median(cpu),
        "figures_within_targets": ok,
        "time_within_target": time_ok,
        "ok": ok and time_ok,
    }


def main(argv=None) -> int:
    a = parse_args(argv)
    from tuner.measure import hardware
    from tuner.quality.logits import default_text_path

    if not Path(a.llama_perplexity).is_file():
        sys.exit(
            f"quality_vs_perplexity: error: llama-perplexity not found at {a.llama_perplexity} "
            "(see benchmarks/README.md to build it)"
        )
    text = a.text or str(default_text_path())
    names = [c.strip() for c in a.cases.split(",") if c.strip()]
    cases = [
        gemma_case(a.gemma_quants.split(",")) if n == "gemma" else synthetic_case(a.synthetic_quants.split(","))
        for n in names
    ]
    tmp = Path(tempfile.mkdtemp(prefix="quality-bench-"))
    env = {**os.environ, "TUNER_LOCK_FILE": str(tmp / "child.lock"), "PYTHONPATH": str(ROOT)}
    version = subprocess.run([a.llama_perplexity, "--version"], capture_output=True, text=True)
    started = dt.datetime.now(dt.timezone.utc)
    with measurement_lock(wait=True, what="benchmarks/quality_vs_perplexity.py"):
        for rnd in range(a.rounds):
            for i, case in enumerate(cases):
                lp_first = (rnd + i) % 2 == 0
                load = os.getloadavg()[0]
                sides = [
                    ("llama_perplexity", lambda: llama_side(a, case, text, tmp)),
                    ("tuner", lambda: tuner_side(a, case, text, env)),
                ]
                got = {name: f() for name, f in (sides if lp_first else sides[::-1])}
                case.setdefault("rounds", []).append(
                    {"round": rnd, "first": sides[0 if lp_first else 1][0], "loadavg_1m": load, **got}
                )
                line = ", ".join(
                    f"{Path(q).name} KLD {got['tuner']['quants'][q]['kld_mean']:.5f} vs "
                    f"{got['llama_perplexity']['quants'][q]['kld_mean']:.5f}"
                    for q in case["quants"]
                )
                print(
                    f"round {rnd + 1}/{a.rounds} {case['name']}: wall tuner {got['tuner']['wall_s']:.1f} s, "
                    f"llama-perplexity {got['llama_perplexity']['wall_s']:.1f} s; {line}",
                    flush=True,
                )
    shutil.rmtree(tmp, ignore_errors=True)
    for case in cases:
        case["summary"] = summarize(case, a.cpu_time)
    ok = all(c["summary"]["ok"] for c in cases)
    result = {
        "time_judged_on": "cpu" if a.cpu_time else "wall",
        "benchmark": "quality_vs_perplexity",
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "ctx": a.ctx,
            "threads": a.threads,
            "rounds": a.rounds,
            "text": text,
            "targets": {
                "kld_mean_rel": KLD_TOL,
                "kld_mean_abs_print_resolution": KLD_PRINT,
                "time_judged_above_s": TIME_MIN_S,
                "same_top_points": SAME_TOP_TOL,
                "wall_ratio": TIME_TOL,
            },
        },
        "llama_perplexity": {"path": a.llama_perplexity, "version": (version.stdout + version.stderr).strip()},
        "tuner_build": hardware.build_info(),
        "host": {"cpus": os.cpu_count(), "loadavg_end": os.getloadavg()},
        "cases": cases,
        "ok": ok,
    }
    path = save("quality-vs-perplexity", result)
    for c in cases:
        s = c["summary"]
        what = "not judged: start-up dominates" if not s["time_judged"] else f"judged on {s['time_judged_on']}"
        print(
            f"{c['name']}: tuner/llama-perplexity median wall ratio {s['wall_ratio_median']:.3f}, "
            f"CPU ratio {s['cpu_ratio_median']:.3f} (target <= {TIME_TOL}, {what})"
        )
        for name, qv in s["quants"].items():
            print(
                f"  {name}: KLD {qv['tuner']['kld_mean']:.6f} vs {qv['llama_perplexity']['kld_mean']:.6f} "
                f"({100 * qv['kld_mean_rel_diff']:+.2f} %), same top {qv['tuner']['same_top_pct']:.3f} vs "
                f"{qv['llama_perplexity']['same_top_pct']:.3f} ({qv['same_top_diff_points']:+.3f} points)"
                + ("" if qv["within_targets"] else "  MISS")
            )
    print(f"{'OK' if ok else 'MISS'}: results in {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

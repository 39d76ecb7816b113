"""Overhead of crash isolation: `tuner search --sampler grid` against llama-bench over the same grid.

Both sides measure the same configs with the same repetitions (pp and tg tests, warmups as llama-bench).
llama-bench runs the whole grid in one process and reloads the model only when a load parameter changes;
tuner runs every trial outside its own process, with Optuna, Parquet and recommended.json written after
every trial, and (by default) keeps a worker's model loaded for the next trial with the same load parameters.
Rounds alternate which side goes first; the report is the median wall-time ratio (target <= 1.15; exit 1 when
missed). The JSON in benchmarks/results/ holds the grid, the shape, the model, both builds and every round.

    .venv/bin/python benchmarks/search_overhead.py --llama-bench /path/to/llama-bench --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import model_facts, save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TUNER = str(Path(sys.executable).with_name("tuner"))


def timed(cmd: list[str], env=None) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.monotonic() - t0


def llama_bench_version(path: str) -> str:
    p = subprocess.run([path, "--version"], capture_output=True, text=True)
    return (p.stdout + p.stderr).strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH"), required=False)
    ap.add_argument("--model", default=None, help="default: the dense synthetic model (q4_0)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--ubatch", default="64,128,256,512")
    ap.add_argument("--fa", default="on,off")
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--fresh-workers", action="store_true", help="tuner: a fresh worker (and load) per trial")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if not args.llama_bench:
        sys.exit("pass --llama-bench PATH (or set LLAMA_BENCH); see benchmarks/README.md")
    if args.model is None:
        from tuner.model.synth import synthesize

        args.model = str(synthesize(Path.home() / ".cache" / "tuner-test-models", "dense", ("q4_0",))[0])
    n_configs = len(args.threads.split(",")) * len(args.ubatch.split(",")) * len(args.fa.split(","))
    lb = [
        args.llama_bench,
        "-m",
        args.model,
        "-t",
        args.threads,
        "-ub",
        args.ubatch,
        "-fa",
        args.fa,
        "-p",
        str(args.p),
        "-n",
        str(args.n),
        "-r",
        str(args.r),
        "-o",
        "json",
    ]
    env = dict(os.environ, TUNER_LOCK_FILE=str(Path(tempfile.gettempdir()) / "tuner-overhead.lock"))
    rows = []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory() as d:
            tn = [
                TUNER,
                "search",
                "-m",
                args.model,
                "--sampler",
                "grid",
                "--no-baselines",
                "--drift-every",
                "0",
                "--threads",
                args.threads.replace(",", ","),
                "-ub",
                args.ubatch,
                "-fa",
                args.fa,
                "-p",
                str(args.p),
                "-n",
                str(args.n),
                "-r",
                str(args.r),
                "--results",
                d,
                "--study",
                "ovh",
            ]
            if args.fresh_workers:
                tn.append("--fresh-workers")
            order = [("llama-bench", lb), ("tuner", tn)] if i % 2 == 0 else [("tuner", tn), ("llama-bench", lb)]
            t = {name: timed(cmd, env) for name, cmd in order}
        rows.append({"round": i, "first": order[0][0], **t, "ratio": t["tuner"] / t["llama-bench"]})
        print(
            f"round {i}: llama-bench {t['llama-bench']:.1f} s, tuner {t['tuner']:.1f} s, "
            f"ratio {t['tuner'] / t['llama-bench']:.3f}",
            file=sys.stderr,
        )
    ratios = [r["ratio"] for r in rows]
    result = {
        "configs": n_configs,
        "grid": {"threads": args.threads, "n_ubatch": args.ubatch, "flash_attn": args.fa},
        "p": args.p,
        "n": args.n,
        "r": args.r,
        "model": model_facts(args.model),
        "llama_bench": {"path": args.llama_bench, "version": llama_bench_version(args.llama_bench)},
        "commands": {"llama-bench": lb, "tuner": [x if x != d else "TMPDIR" for x in tn]},
        "fresh_workers": args.fresh_workers,
        "rounds": rows,
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
        "target": "median_ratio <= 1.15",
        "target_met": statistics.median(ratios) <= 1.15,
    }
    save("search-overhead", result, args.out)
    print(
        f"median wall-time ratio tuner/llama-bench over {n_configs} configs: {result['median_ratio']:.3f} "
        f"(target <= 1.15: {'met' if result['target_met'] else 'NOT met'})"
    )
    return 0 if result["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())

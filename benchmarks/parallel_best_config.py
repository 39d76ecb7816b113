#!/usr/bin/env python3
"""Does the best config for N parallel sequences differ from the best for one? Two `tuner search` studies of the
same grid, one with --parallel 1 and one with --parallel N, summarized side by side.

Each study measures every config of the grid (n_ubatch x threads x flash attention: --sampler grid) at its N and
confirms its top configs in an interleaved race; its recommendation is its best. Because both studies measured the
whole grid, each winner's figure at the other N is in the other study's trials: the table says how much the N=1
winner loses when serving N sequences, and the other way round. The objective is the searches' default, mixed
(end-to-end t/s of the test shape: with --parallel, of the N requests together).

Run the searches (the commands are recorded in the result), then summarize them:
  tuner search -m gemma-3-270m-q4_k_m.gguf --parallel 1 --sampler grid --ubatch-size 32,128,512 --threads 1,2 \\
      --flash-attn on,off -c 1024 -p 128 -n 32 -r 3 --no-auto-space --results /tmp/par-search --study n1
  (the same with --parallel 4 --study n4)
  benchmarks/parallel_best_config.py /tmp/par-search/n1 /tmp/par-search/n4 --interleave 4

A grid point is one trial, measured minutes apart from the next: on a shared machine the winners' figures at the
other N can be the neighbours' load. --interleave R re-measures the two winners at both N with `tuner bench`,
alternating which goes first, R rounds, and reports the paired ratios (medians and range).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._results import model_facts, save  # noqa: E402
from tuner.measure import store  # noqa: E402

KNOBS = ("n_ubatch", "n_threads", "flash_attn")


def key(cfg) -> tuple:
    return tuple(getattr(cfg, k) for k in KNOBS)


def study(folder: Path) -> dict:
    """A study's grid (each config's objective in the search phase, its best repetition-median) and its winner."""
    rec = json.loads((folder / "recommended.json").read_text())
    objective = rec["objective"]
    grid: dict[tuple, list[float]] = {}
    for r in store.records(folder / "trials.parquet"):
        if r.ok and r.confirm_round is None:  # the search phase: one trial per grid point (and anchors)
            grid.setdefault(key(r.config), []).append(r.objective(objective))
    cands = rec["confirmation"]["candidates"]
    return {
        "n_seq": rec["config"]["n_seq"],
        "objective": objective,
        "winner": dict(zip(KNOBS, (rec["config"][k] for k in KNOBS))),
        "confirmed_median": {json.dumps([c["config"][k] for k in KNOBS]): c["median"] for c in cands},
        "grid": {json.dumps(list(k)): statistics.median(v) for k, v in sorted(grid.items(), key=str)},
        "parallel": rec.get("parallel"),
        "model": rec["config"]["model"],
        "shape": {k: rec["config"][k] for k in ("n_ctx", "n_prompt", "n_gen", "repetitions")},
    }


def bench(model: str, cfg: dict, n_seq: int, shape: dict, tmp: Path) -> float:
    """The mixed objective of one `tuner bench --parallel N` run of a winner (the real CLI, as a subprocess)."""
    cmd = [sys.executable, "-c", "import sys; sys.argv[0] = 'tuner'; from tuner.cli import main; main()", "bench"]
    cmd += [model, "--parallel", str(n_seq), "-c", str(shape["n_ctx"]), "-p", str(shape["n_prompt"])]
    cmd += ["-n", str(shape["n_gen"]), "-r", str(shape["repetitions"]), "-ub", str(cfg["n_ubatch"])]
    cmd += ["-t", str(cfg["n_threads"]), "-tb", str(cfg["n_threads"]), "-fa", cfg["flash_attn"]]
    cmd += ["--json", "-o", str(tmp / "bench.parquet")]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    rec = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("{")))
    tg, pp = statistics.median(rec["tg_samples"]), statistics.median(rec["pp_samples"])
    return (shape["n_prompt"] + shape["n_gen"]) / (shape["n_prompt"] / pp + shape["n_gen"] / tg)


def interleave(s1: dict, sn: dict, shape: dict, rounds: int) -> dict:
    """Both winners at both N, alternating order by round: per N the ratio (this N's winner / the other's)."""
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="parallel-best-") as tmp:
        for n in (s1["n_seq"], sn["n_seq"]):
            own, other = (s1, sn) if n == s1["n_seq"] else (sn, s1)
            ratios = []
            for i in range(rounds):
                pair = [own["winner"], other["winner"]][:: 1 if i % 2 == 0 else -1]
                got = [bench(s1["model"], c, n, shape, Path(tmp)) for c in pair]
                ratio = got[0] / got[1] if i % 2 == 0 else got[1] / got[0]
                ratios.append(ratio)
                print(f"N={n} round {i}: own winner / other's {ratio:.3f}", file=sys.stderr, flush=True)
            out[str(n)] = {"own_winner_over_other": statistics.median(ratios), "ratios": ratios}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__[__doc__.index("Run the searches") :],
    )
    ap.add_argument("one", type=Path, help="the --parallel 1 study folder")
    ap.add_argument("many", type=Path, help="the --parallel N study folder")
    ap.add_argument("--interleave", type=int, default=0, metavar="R", help="paired rounds of the two winners [0]")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/parallel_best_config-*.json)")
    a = ap.parse_args(argv)
    s1, sn = study(a.one), study(a.many)
    w1, wn = json.dumps(list(s1["winner"].values())), json.dumps(list(sn["winner"].values()))
    cross = {
        # each winner at the other N, from the search phase (one trial per grid point in each study)
        f"N={s1['n_seq']} winner at N={sn['n_seq']} / N={sn['n_seq']} winner": sn["grid"][w1] / sn["grid"][wn],
        f"N={sn['n_seq']} winner at N={s1['n_seq']} / N={s1['n_seq']} winner": s1["grid"][wn] / s1["grid"][w1],
    }
    result = {
        "benchmark": "parallel_best_config",
        "what": "best config of the same grid searched at --parallel 1 and at --parallel N (tuner search, grid)",
        "model": model_facts(s1["model"]),
        "knobs": list(KNOBS),
        "same_winner": w1 == wn,
        "cross": cross,
        "studies": {str(s["n_seq"]): {k: v for k, v in s.items() if k != "model"} for s in (s1, sn)},
    }
    if a.interleave and w1 != wn:
        result["interleaved"] = interleave(s1, sn, s1["shape"], a.interleave)
    save("parallel_best_config", result, echo=False, path=a.out)
    for s in (s1, sn):
        print(f"N={s['n_seq']}: winner {s['winner']} ({s['objective']})")
        for k, v in s["grid"].items():
            print(f"  {k:28s} {v:8.2f}" + ("  <- winner" if k == json.dumps(list(s["winner"].values())) else ""))
    for k, v in cross.items():
        print(f"{k}: {v:.3f}")
    for n, v in result.get("interleaved", {}).items():
        r = v["ratios"]
        print(f"interleaved N={n}: own winner / other's {v['own_winner_over_other']:.3f} ({min(r):.3f}-{max(r):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
  benchmarks/parallel_best_config.py /tmp/par-search/n1 /tmp/par-search/n4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
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
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__[__doc__.index("Run the searches") :],
    )
    ap.add_argument("one", type=Path, help="the --parallel 1 study folder")
    ap.add_argument("many", type=Path, help="the --parallel N study folder")
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
    save("parallel_best_config", result, echo=False, path=a.out)
    for s in (s1, sn):
        print(f"N={s['n_seq']}: winner {s['winner']} ({s['objective']})")
        for k, v in s["grid"].items():
            print(f"  {k:28s} {v:8.2f}" + ("  <- winner" if k == json.dumps(list(s["winner"].values())) else ""))
    for k, v in cross.items():
        print(f"{k}: {v:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

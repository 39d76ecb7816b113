"""The context ladder as a user runs it: `tuner search --model MODEL --ctx 4096,16384,32768 --n-trials 10`.

Saves the command's output, its wall time, recommended.json's ladder and what the fills cost (from
trials.parquet) to benchmarks/results/context-ladder-*.json. Checks that every rung was measured filled (depth =
n_ctx - n_prompt - n_gen) for the recommended config and the defaults, with a paired ratio; exit 1 otherwise.

    .venv/bin/python benchmarks/context_ladder.py                 # the real Gemma 3 270M; ~45 min on 2 cores
    .venv/bin/python benchmarks/context_ladder.py --ctx 1024,4096 --model some.gguf
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import model_facts, provenance, save  # noqa: E402

from tuner.measure import store  # noqa: E402
from tuner.model.real import gemma  # noqa: E402

TUNER = str(Path(sys.executable).with_name("tuner"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the real Gemma 3 270M Q4_K_M")
    ap.add_argument("--ctx", default="4096,16384,32768")
    ap.add_argument("--n-trials", default="10")
    ap.add_argument("extra", nargs="*", help="more tuner search options (after --)")
    a = ap.parse_args()
    model = a.model or str(gemma(Path.home() / ".cache" / "tuner-test-models"))
    work = Path(tempfile.mkdtemp(prefix="tuner-ladder-"))
    cmd = [TUNER, "search", "--model", model, "--ctx", a.ctx, "--n-trials", a.n_trials, *a.extra]
    prov = provenance()  # the tree that ran, taken before the run (it can take an hour)
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    wall = time.monotonic() - t0
    rec_path = next(work.glob("results/*/recommended.json"), None)
    rec = json.loads(rec_path.read_text()) if rec_path else {}
    ladder = rec.get("context_ladder") or []
    df = store.read(rec_path.parent) if rec_path else None
    fills, restores = [], []
    if df is not None:
        fills = [
            {
                "n_ctx": int(r["n_ctx"]),
                "n_depth": int(r["n_depth"]),
                "fill_s": r["depth_fill_ms"] / 1000,
                "n_ubatch": int(r["n_ubatch"]),
                "flash_attn": r["flash_attn"],
                "state": r["state"],
            }
            for r in df.to_dict("records")
            if r.get("depth_fill_ms") == r.get("depth_fill_ms") and r.get("depth_fill_ms")
        ]
        restores = [float(x) for x in df["depth_restore_ms"].dropna()]
    rungs = [int(c) for c in a.ctx.split(",")]
    shape = rec.get("config", {})
    want = {c: c - shape.get("n_prompt", 512) - shape.get("n_gen", 128) for c in rungs}
    by = {r["n_ctx"]: r for r in ladder}
    checks = {
        "exit_code_0": res.returncode == 0,
        "every_rung_measured": sorted(by) == sorted(rungs),
        "every_rung_filled": all(by.get(c, {}).get("n_depth") == d for c, d in want.items()),
        "defaults_at_every_rung": all("defaults" in r and (r.get("vs_defaults") or {}).get("ratio") for r in ladder),
        "searched_once_at_the_working_context": df is not None
        and set(df[df["state"] != "confirm"]["n_ctx"]) == {max(rungs)},
    }
    lo, hi = min(rungs), max(rungs)
    result = {
        "benchmark": "context_ladder",
        "command": " ".join(["tuner"] + cmd[1:]),
        "model": model_facts(model),
        "exit_code": res.returncode,
        "wall_s": wall,
        "checks": checks,
        "passed": all(checks.values()),
        "tg_top_vs_bottom": (by[hi]["tg_ts"] / by[lo]["tg_ts"]) if lo in by and hi in by else None,
        "pp_top_vs_bottom": (by[hi]["pp_ts"] / by[lo]["pp_ts"]) if lo in by and hi in by else None,
        "ladder": ladder,
        "confirmation": {
            k: (rec.get("confirmation") or {}).get(k) for k in ("verdict", "reason", "rounds", "vs_baseline")
        },
        "fills": fills,
        "fill_s_total": sum(f["fill_s"] for f in fills),
        "restore_ms_median": statistics.median(restores) if restores else None,
        "restores": len(restores),
        "trials": {
            "searched": int((df["state"] != "confirm").sum()) if df is not None else 0,
            "confirm_and_ladder_runs": int((df["state"] == "confirm").sum()) if df is not None else 0,
        },
        # where the wall time went: the search, the race, the ladder (each run's own wall, fills included)
        "wall_s_by_phase": {}
        if df is None
        else {
            "search": float(df[df["state"] != "confirm"]["wall_s"].sum()),
            "race": float(df[(df["state"] == "confirm") & ~df["baseline"].str.contains("rung")]["wall_s"].sum()),
            "ladder": float(df[(df["state"] == "confirm") & df["baseline"].str.contains("rung")]["wall_s"].sum()),
        },
        "provenance": prov,
        "stdout": res.stdout,
        "stderr": res.stderr[-30000:],
        "recommended": rec,
    }
    path = save("context-ladder", result, echo=False)
    print(f"saved {path}: wall {wall / 60:.1f} min, checks {checks}", file=sys.stderr)
    for r in ladder:
        d = r.get("defaults") or {}
        print(
            f"  n_ctx {r['n_ctx']} depth {r['n_depth']}: tg {r['tg_ts']:.1f} (defaults {d.get('tg_ts') or 0:.1f}), "
            f"pp {r['pp_ts']:.1f} (defaults {d.get('pp_ts') or 0:.1f}), x defaults "
            f"{(r.get('vs_defaults') or {}).get('ratio')}",
            file=sys.stderr,
        )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

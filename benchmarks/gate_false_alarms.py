#!/usr/bin/env python3
"""False-alarm rate of the regression gate: the same config measured twice must not fail `tuner compare`.

Each run measures one config for both sides with the real CLI (`tuner bench --config CFG`, a fresh
worker each, `--trials` rounds interleaved, which side goes first alternating between runs), then runs
`tuner compare BASE CUR` and records its exit status and verdicts. A run that alerts (exit 1) is then
judged once more with `--rerun-on-alert` (on a copy of CUR), as CI would, so both rates are reported:
the bare gate and the gate with confirmation.

Target: no regression verdict in at least 19 of 20 runs.

Examples:
  benchmarks/gate_false_alarms.py                          # dense q4_0 (synthesized), 20 runs, -p 128 -n 32 -r 5
  benchmarks/gate_false_alarms.py -t 1 --trials 3         # as CI measures: 3 interleaved rounds
  benchmarks/gate_false_alarms.py --runs 40 -r 10 --model models/dense-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL_CACHE = Path(os.environ.get("TUNER_TEST_MODELS", Path.home() / ".cache" / "tuner-test-models"))


def tuner(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from tuner.cli import cli; cli()", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if check and p.returncode not in (0, 1):
        sys.exit(f"tuner {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file (default: the synthetic dense q4_0 model, made if missing)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("-t", "--threads", type=int, default=0, help="0 = physical cores")
    ap.add_argument("--trials", type=int, default=1,
                    help="trials per side and run, interleaved (CI measures 3 rounds; 1 is the harshest case)")
    ap.add_argument("--out", help="folder for the Parquet files and results.json (default: a temp folder)")
    a = ap.parse_args()

    if a.model:
        model = Path(a.model)
    else:
        from tuner.synth import synthesize
        model = synthesize(MODEL_CACHE, "dense", ("q4_0",))[0]
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="gate-false-alarms-"))
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"model": str(model), "n_prompt": a.n_prompt, "n_gen": a.n_gen, "repetitions": a.repetitions}
    if a.threads:
        cfg["n_threads"] = a.threads
    cfg_path = out / "config.json"
    cfg_path.write_text(json.dumps({"config": cfg}))

    bare_alarms = confirmed_alarms = 0
    per_metric = collections.Counter()
    tally = collections.Counter()  # (metric, verdict): an "unchanged" gate is only as good as its data
    changes = collections.defaultdict(list)
    runs = []
    print(f"model {model.name}, -p {a.n_prompt} -n {a.n_gen} -r {a.repetitions} -t {a.threads or 'cores'}, "
          f"{a.trials} trial(s) a side, {a.runs} runs; files in {out}")
    for i in range(a.runs):
        base, cur = out / f"run{i:02d}-base.parquet", out / f"run{i:02d}-cur.parquet"
        # alternate which side goes first so a warming or cooling machine favours neither
        for _ in range(a.trials):
            for side in ((base, cur) if i % 2 == 0 else (cur, base)):
                tuner("bench", "--config", str(cfg_path), "-o", str(side), "--json")
        gate = tuner("compare", str(base), str(cur), "--json")
        rep = json.loads(gate.stdout)
        verdicts = {m["metric"]: m for p in rep["pairs"] for m in p["metrics"]}
        for name, m in verdicts.items():
            if m["change_pct"] is not None:
                changes[name].append(m["change_pct"])
            tally[name, m["verdict"]] += 1
            if m["verdict"] == "regression":
                per_metric[name] += 1
        confirmed = None
        if gate.returncode == 1:
            bare_alarms += 1
            cur2 = out / f"run{i:02d}-cur-rerun.parquet"
            shutil.copy(cur, cur2)
            again = tuner("compare", str(base), str(cur2), "--rerun-on-alert", "--json")
            confirmed = again.returncode == 1
            confirmed_alarms += confirmed
        runs.append({"run": i, "exit": gate.returncode, "confirmed": confirmed,
                     "verdicts": {k: (v["verdict"], v["change_pct"]) for k, v in verdicts.items()}})
        line = "  ".join(f"{k} {v['verdict'][:5]} {v['change_pct']:+.1f}%" if v["change_pct"] is not None
                         else f"{k} {v['verdict'][:5]}" for k, v in verdicts.items())
        flag = "" if gate.returncode == 0 else (" ALERT, confirmed on rerun" if confirmed else " ALERT, not confirmed")
        print(f"run {i + 1:2d}: exit {gate.returncode}  {line}{flag}", flush=True)

    n = a.runs
    print()
    print(f"bare gate:             no regression in {n - bare_alarms}/{n} runs ({bare_alarms} false alarm(s): "
          f"{dict(per_metric) or 'none'})")
    print(f"with --rerun-on-alert: no regression in {n - confirmed_alarms}/{n} runs")
    for name, xs in changes.items():
        xs = sorted(abs(x) for x in xs)
        verdicts = ", ".join(f"{v} {tally[name, v]}" for v in ("unchanged", "inconclusive", "regression",
                                                                "improvement", "missing") if tally[name, v])
        print(f"  {name:9s} |change| median {xs[len(xs) // 2]:.1f}%, max {xs[-1]:.1f}%; verdicts: {verdicts}")
    target = n - n // 20
    print(f"target (>= {target}/{n} without a regression verdict): "
          f"{'met' if n - bare_alarms >= target else 'NOT met'} by the bare gate, "
          f"{'met' if n - confirmed_alarms >= target else 'NOT met'} with --rerun-on-alert")
    (out / "results.json").write_text(json.dumps({
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "config": cfg,
        "trials_per_side": a.trials, "runs": runs,
        "bare_alarms": bare_alarms, "confirmed_alarms": confirmed_alarms,
        "verdicts": {f"{m}:{v}": n for (m, v), n in tally.items()}}, indent=2))


if __name__ == "__main__":
    main()

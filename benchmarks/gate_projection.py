#!/usr/bin/env python3
"""How many rounds would the regression gate need? A projection from gate-power runs already measured.

gate_power.py measures the shipped gate: R interleaved rounds a side, judged by `tuner compare`. Measuring
another round count costs a full run (about 40 min for 20 A/A + 20 A/B runs at 7 rounds). This script
answers "which settings would reach detection >= 95 % with false alarms <= 5 %?" from the trials those
runs saved, without measuring anything:

  m blocks = m x R rounds: the baseline and current trials of m distinct runs of one kind (A/A or A/B) are
  joined into one side each, keeping each run's trials together (a block bootstrap: trials of one run share
  that run's machine state; joining runs measured minutes apart adds that spread to both sides alike).
  The joined sides are judged with tuner.report.compare's own rule (judge(), the shipped thresholds and alpha).
  --rerun-on-alert is emulated as the gate runs it: on a regression, CURRENT is measured again as many
  times (the current trials of m other runs of the same kind) and the regression stands only when a metric
  that regressed regresses again.

--blocks 1 re-judges every saved run on its own trials with the current rule (tuner.report.compare as it is now):
the shipped gate's rates under a changed rule without measuring again, with Clopper-Pearson bounds.

It is a projection, not a measurement: joined runs were not interleaved with each other, and a machine that changes
between sessions is not in the data. The draws overlap (each run is in many), so they are not independent: each
projected rate is saved with the exact 95 % bounds it would have from the runs it rests on, len(runs) // m
independent joined runs of that kind (false_alarm_upper95, detection_lower95). Verify a chosen setting with
gate_power.py --rounds N.
Writes benchmarks/results/gate-projection-*.json.

Examples:
  benchmarks/gate_projection.py benchmarks/results/gate-power-20261129-062540.json
  benchmarks/gate_projection.py results/gate-power-A.json results/gate-power-B.json --blocks 1,2,3 --draws 500
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import bounded_rates, rate_ci, save  # noqa: E402


def records(trials: list[dict]) -> list:
    """gate_power.py's saved trials as the TrialRecords `tuner compare` judges (only what it reads)."""
    from tuner.record import TrialConfig, TrialRecord

    # started_utc: the gate pairs interleaved rounds by their start times (tuner.report.compare.interleaved)
    return [
        TrialRecord(
            TrialConfig(model="gate"),
            outcome=t["outcome"],
            tg_samples=t["tg"],
            pp_samples=t["pp"],
            ttft_samples_ms=t["ttft_ms"],
            peak_rss_bytes=t.get("peak_rss_bytes"),
            started_utc=t.get("started_utc", ""),
        )
        for t in trials
    ]


def judge_sides(base: list[dict], cur: list[dict], settings) -> dict[str, str]:
    """The gate's verdict per metric for two lists of saved trials: tuner.report.compare.judge_pair, the shipped rule
    (speeds pooled per repetition, peak RAM one sample per trial, a CURRENT that only failed is a regression)."""
    from tuner.report.compare import judge_pair

    b, c = records(base), records(cur)
    results = judge_pair(
        [r for r in b if r.ok], [r for r in c if r.ok], [r for r in b if not r.ok], [r for r in c if not r.ok], settings
    )
    return {r.metric: r.verdict for r in results}


def classify(verdicts: dict[str, str]) -> str:
    v = verdicts.values()
    return "regression" if "regression" in v else "inconclusive" if "inconclusive" in v else "pass"


def gate(base: list[dict], cur: list[dict], rerun: list[dict] | None, settings) -> tuple[str, str]:
    """(bare verdict, verdict with --rerun-on-alert)."""
    first = judge_sides(base, cur, settings)
    bare = classify(first)
    if bare != "regression" or rerun is None:
        return bare, bare
    again = judge_sides(base, rerun, settings)
    if any(first[m] == "regression" and again.get(m) == "regression" for m in first):
        return bare, "regression"
    # as rerun_alerts: each regression not confirmed takes the rerun's verdict (missing when it has none)
    return bare, classify({m: (again.get(m, "missing") if v == "regression" else v) for m, v in first.items()})


def project(runs: list[dict], m: int, draws: int, rng: random.Random, settings) -> dict:
    """Rates for one kind's runs joined m at a time (every combination, or `draws` random ones)."""
    combos = list(itertools.combinations(range(len(runs)), m))
    if len(combos) > draws:
        combos = rng.sample(combos, draws)
    tally = {"bare": {}, "gate": {}}
    for combo in combos:
        base = [t for i in combo for t in runs[i]["trials"]["baseline"]]
        cur = [t for i in combo for t in runs[i]["trials"]["current"]]
        others = [i for i in range(len(runs)) if i not in combo]
        rerun = [t for i in rng.sample(others, m) for t in runs[i]["trials"]["current"]] if len(others) >= m else None
        bare, with_rerun = gate(base, cur, rerun, settings)
        tally["bare"][bare] = tally["bare"].get(bare, 0) + 1
        tally["gate"][with_rerun] = tally["gate"].get(with_rerun, 0) + 1
    n = len(combos)
    return {
        "draws": n,
        "regressions": {w: t.get("regression", 0) for w, t in tally.items()},
        **{which: {c: t.get(c, 0) / n for c in ("regression", "inconclusive", "pass")} for which, t in tally.items()},
    }


def bounds(false_alarm: float, detection: float, n_aa: int, n_ab: int) -> dict:
    """A projected row's rates with the exact 95 % bounds of as many independent joined runs as the data holds
    (n_aa, n_ab), and whether the bounds (not the rates) meet the target."""
    fa, det = rate_ci(round(false_alarm * n_aa), n_aa), rate_ci(round(detection * n_ab), n_ab)
    return {
        "false_alarm_rate": false_alarm,
        "false_alarm_upper95": fa["upper95"],
        "false_alarm_ci95": fa["ci95"],
        "detection_rate": detection,
        "detection_lower95": det["lower95"],
        "detection_ci95": det["ci95"],
        "independent_runs": {"A/A": n_aa, "A/B": n_ab},
        "rates_meet_target": detection >= 0.95 and false_alarm <= 0.05,
        "target_met": (det["lower95"] or 0) >= 0.95 and (fa["upper95"] or 1) <= 0.05,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__[__doc__.index("Examples:") :],
    )
    ap.add_argument("files", nargs="+", help="gate-power-*.json files measured with the same rounds, reps and shape")
    ap.add_argument("--blocks", default="1,2,3,4", help="runs joined per side: m x the files' rounds [1,2,3,4]")
    ap.add_argument("--draws", type=int, default=400, help="most combinations judged per kind and m [400]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for the JSON result (default benchmarks/results)")
    a = ap.parse_args(argv)
    from tuner.report.compare import Settings

    docs = [json.loads(Path(f).read_text()) for f in a.files]
    shape = {
        (
            d["settings"]["rounds"],
            tuple(d["settings"]["bench_args"]),
            d["settings"]["n_prompt"],
            d["settings"]["n_gen"],
            d["model"]["content_hash"],
        )
        for d in docs
    }
    if len(shape) != 1:
        sys.exit("gate_projection: error: the files were measured with different rounds, reps, shape or model")
    if any("trials" not in r for d in docs for r in d["runs"]):
        sys.exit("gate_projection: error: a file has runs without their trials (gate_power.py before 2026-11-29)")
    rounds = docs[0]["settings"]["rounds"]
    settings = Settings()  # the shipped rule: the gate's thresholds and alpha, as `make perf-check` runs it
    rng = random.Random(a.seed)
    kinds = {k: [r for d in docs for r in d["runs"] if r["kind"] == k] for k in ("A/A", "A/B")}
    rows = []
    print(
        f"{len(kinds['A/A'])} A/A + {len(kinds['A/B'])} A/B runs of {rounds} rounds "
        f"(`tuner bench {' '.join(docs[0]['settings']['bench_args'])}`); shipped compare rule, projected:"
    )
    print(
        f"{'rounds':>6}  {'false alarms':>12} {'(bare)':>7}  {'detection':>9} {'(bare)':>7}  "
        f"{'inconclusive A/A, A/B':>22}  draws"
    )
    for m in (int(x) for x in a.blocks.split(",")):
        aa = project(kinds["A/A"], m, a.draws, rng, settings)
        ab = project(kinds["A/B"], m, a.draws, rng, settings)
        row = {
            "blocks": m,
            "rounds": m * rounds,
            "A/A": aa,
            "A/B": ab,
            **bounds(
                aa["gate"]["regression"], ab["gate"]["regression"], len(kinds["A/A"]) // m, len(kinds["A/B"]) // m
            ),
        }
        if m == 1:  # each run judged alone: independent runs, so the rates get Clopper-Pearson bounds
            row.update(bounded_rates(aa["regressions"]["gate"], aa["draws"], ab["regressions"]["gate"], ab["draws"]))
            row["bare_bounds"] = bounded_rates(
                aa["regressions"]["bare"], aa["draws"], ab["regressions"]["bare"], ab["draws"]
            )
        rows.append(row)
        print(
            f"{m * rounds:6d}  {100 * aa['gate']['regression']:11.1f}% {100 * aa['bare']['regression']:6.1f}%  "
            f"{100 * ab['gate']['regression']:8.1f}% {100 * ab['bare']['regression']:6.1f}%  "
            f"{100 * aa['gate']['inconclusive']:10.1f}%, {100 * ab['gate']['inconclusive']:5.1f}%      "
            f"{aa['draws']}/{ab['draws']}{'  rates meet target' if row['rates_meet_target'] else ''}"
        )
    first = next((r for r in rows if r["rates_meet_target"]), None)
    result = {
        "sources": [str(Path(f)) for f in a.files],
        "rounds_per_run": rounds,
        "bench_args": docs[0]["settings"]["bench_args"],
        "model": docs[0]["model"],
        "rule": {
            "alpha": settings.alpha,
            "max_cv": settings.max_cv,
            "test": "tuner.stats (per-trial values; Wilcoxon paired / Mann-Whitney U)",
            "rerun_on_alert": True,
        },
        "method": "block bootstrap over gate_power runs: m runs of one kind joined per side",
        "projection": rows,
        "fewest_rounds_meeting_target": first["rounds"] if first else None,
        "note": "fewest_rounds_meeting_target is judged on the projected rates; target_met per row on "
        "their 95 % bounds, which the runs behind a projection rarely reach",
    }
    path = save("gate-projection", result, a.out or Path(__file__).resolve().parent / "results", echo=False)
    print(
        f"fewest rounds whose projected rates meet detection >= 95 % with false alarms <= 5 %: "
        f"{first['rounds'] if first else 'none of those tried'}; {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Power of the regression gate: does `make perf-check` catch a real ~10 % slowdown, and how often does it cry wolf?

Each run measures one config for BASELINE and CURRENT exactly as `make perf-check` does (the Makefile's
PERF_ROUNDS interleaved rounds of `tuner bench --config CFG PERF_ARGS`, in the order A B B A: files saved
before 2026-12-03 put the baseline first in every round; the synthetic dense q4_0 model, the Makefile's
shape), then judges with the shipped gate, `tuner compare BASE CUR $PERF_COMPARE_ARGS`.
The settings are read from the Makefile, so the benchmark measures what ships.

Runs alternate between two kinds, so a drifting machine hits both alike:
  A/A  both sides as they are: any regression verdict is a false alarm.
  A/B  CURRENT's trials (and the gate's re-measurement of an alert) run next to a CPU hog: one process pinned
       to each CPU, all busy at the same time for DUTY of every PERIOD (default 10 % of 10 ms). While they
       burn, every CPU is taken, wherever llama.cpp's threads sit, so the measured process loses about DUTY of
       its time: a real slowdown of known size. Its size is measured in the same run (the median change of
       each metric over the A/B runs, against the same over the A/A runs) and reported with the hogs'
       achieved CPU share.

Per kind: the share of runs with a regression verdict (false_alarm_rate for A/A, detection_rate for A/B, each with
its one-sided 95 % Clopper-Pearson bound: false_alarm_upper95, detection_lower95), with
an inconclusive verdict and no regression (inconclusive_rate), and with a pass; for the first judgement (bare)
and the gate as shipped (with --rerun-on-alert when PERF_COMPARE_ARGS has it). Every rate is saved with its exact
(Clopper-Pearson) 95 % interval; false_alarm_upper95 and detection_lower95, the one-sided 95 % bounds, are what a
claim may cite, because 0 false alarms in 20 runs only shows a rate below 14 %. Everything (settings, model, build,
every run's verdicts and medians) goes to benchmarks/results/gate-power-*.json.

Target: detection_lower95 >= 0.95 with false_alarm_upper95 <= 0.05 (the gate as shipped; about 60 runs of
each kind when none misses), and the injected tg slowdown within --effect (default 7-13 %; otherwise the run
did not measure a ~10 % slowdown). Exit 0 when met, 1 when not.

The result is saved after every A/B run (replacing the last save), so a run stopped early keeps what it measured;
--join FILE... makes one result of the runs of several saved files with the same settings and model (or one made
alike on another machine: _results.same_make) (60 + 60
runs take hours: sessions can measure them in parts). --rejudge FILE... recomputes the intervals of saved
gate-power-*.json and gate-projection-*.json files (no
measurement) and writes them to benchmarks/results/gate-intervals-*.json.

Examples:
  benchmarks/gate_power.py                        # 20 A/A + 20 A/B runs (about 60 min on an idle 2-core box)
  benchmarks/gate_power.py --runs 60              # enough for the 95 % bounds to reach the target (~3 h)
  benchmarks/gate_power.py --join benchmarks/results/gate-power-A.json benchmarks/results/gate-power-B.json
  benchmarks/gate_power.py --rejudge benchmarks/results/gate-power-*.json benchmarks/results/gate-projection-*.json
  benchmarks/gate_power.py --runs 1 --threads 1 --rounds 2 --reps 3 --model tiny-q8_0.gguf   # the machinery
  benchmarks/gate_power.py --rounds 5 --reps 10   # other gate settings than the Makefile's
  benchmarks/gate_power.py --gate-args '--alpha 0.05'   # another gate rule on the shipped measurements
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import ROOT, model_facts, rate_ci, same_make, save  # noqa: E402

MODEL_CACHE = Path(os.environ.get("TUNER_TEST_MODELS", Path.home() / ".cache" / "tuner-test-models"))
SPEED = ("tg", "pp", "ttft")
# A process pinned to one CPU, busy for duty × period out of every period, on a schedule shared by all hogs
# (CLOCK_MONOTONIC from a common t0), so their bursts coincide. It never catches up on a slot it missed (when
# it was itself descheduled), so it takes at most its duty.
HOG = """
import os, sys, time
cpu, duty, period, t0 = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
os.sched_setaffinity(0, {cpu})
k = max(0, int((time.monotonic() - t0) // period) + 1)
while True:
    start = t0 + k * period
    left = start - time.monotonic()
    if left > 0:
        time.sleep(left)
    while time.monotonic() < start + duty * period:
        pass
    k = max(k + 1, int((time.monotonic() - t0) // period) + 1)
"""


def shipped() -> dict:
    """`make perf-check`'s rounds, bench arguments and shape, read from the Makefile."""
    text = (ROOT / "Makefile").read_text()

    def var(name: str) -> str:
        m = re.search(rf"^{name}[ \t]*\?=[ \t]*(.*)$", text, re.M)
        if not m:
            sys.exit(f"Makefile: no {name} (gate_power.py reads make perf-check's settings from it)")
        return m.group(1).strip()

    shape = re.search(r'"n_prompt": (\d+), "n_gen": (\d+)', text)
    if not shape:
        sys.exit("Makefile: perf-check's config line (n_prompt, n_gen) not found")
    return {
        "rounds": int(var("PERF_ROUNDS")),
        "bench_args": shlex.split(var("PERF_ARGS")),
        "n_prompt": int(shape.group(1)),
        "n_gen": int(shape.group(2)),
        "gate_args": shlex.split(var("PERF_COMPARE_ARGS")),
    }


class Tuner:
    """The real CLI in a child interpreter, with a private measurement lock (this script holds the real one)."""

    def __init__(self, lock: Path):
        self.env = dict(os.environ, TUNER_LOCK_FILE=str(lock))

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-c", "from tuner.cli import cli; cli()", *map(str, args)]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=self.env)
        if p.returncode not in (0, 1):  # 1: a failed trial (recorded) or a regression; 2: bad input
            sys.exit(f"tuner {' '.join(map(str, args))} failed ({p.returncode}): {p.stderr.strip()[-800:]}")
        return p


class Hog:
    """The injected slowdown, started and stopped around CURRENT's measurements; it keeps its CPU share."""

    def __init__(self, cpus: list[int], duty: float, period_s: float):
        self.cpus, self.duty, self.period = cpus, duty, period_s
        self.procs: list[subprocess.Popen] = []
        self.cpu_s = self.wall_s = 0.0

    def __enter__(self):
        self.t0 = time.monotonic()
        start = self.t0 + 0.05  # every hog starts on the same period boundary
        self.procs = [
            subprocess.Popen([sys.executable, "-c", HOG, str(c), str(self.duty), str(self.period), str(start)])
            for c in self.cpus
        ]
        return self

    def __exit__(self, *exc):
        import psutil

        for p in self.procs:
            try:
                t = psutil.Process(p.pid).cpu_times()
                self.cpu_s += t.user + t.system
            except psutil.Error:
                pass
            p.kill()
            p.wait()
        self.wall_s += time.monotonic() - self.t0
        self.procs = []

    @property
    def share(self) -> float | None:
        """The hogs' CPU time as a share of the CPUs' time while they ran (the duty they achieved)."""
        return self.cpu_s / (self.wall_s * len(self.cpus)) if self.wall_s else None


class Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def verdicts(report: dict) -> dict[str, dict]:
    return {
        m["metric"]: {
            "verdict": m["verdict"],
            "change_pct": m["change_pct"],
            "p": m["p"],
            "n": [m["n_base"], m["n_cur"]],
            "note": m["note"],
        }
        for p in report["pairs"]
        for m in p["metrics"]
    }


def classify(exit_code: int, judged: dict[str, dict]) -> str:
    if exit_code == 1:
        return "regression"
    return "inconclusive" if any(v["verdict"] == "inconclusive" for v in judged.values()) else "pass"


def trials(path: Path, skip: int = 0) -> list[dict]:
    """Every trial a side measured, with its samples (the JSON keeps what ran, for any later re-analysis)."""
    from tuner.measure import store

    return (
        [
            {
                "started_utc": r.started_utc,
                "outcome": r.outcome,
                "tg": r.tg_samples,
                "pp": r.pp_samples,
                "ttft_ms": r.ttft_samples_ms,
                "peak_rss_bytes": r.peak_rss_bytes,
            }
            for r in store.records(path)[skip:]
        ]
        if path.exists()
        else []
    )


def one_run(tuner: Tuner, cfg: Path, work: Path, settings: dict, slow) -> dict:
    base, cur = work / "baseline.parquet", work / "current.parquet"
    for i in range(settings["rounds"]):  # as make perf-check: A B B A, the side measured first alternates
        for side in (base, cur) if i % 2 == 0 else (cur, base):
            with slow if side == cur else Nothing():
                tuner("bench", "--config", cfg, *settings["bench_args"], "-o", side)
    rerun = "--rerun-on-alert" in settings["gate_args"]
    judge_args = [x for x in settings["gate_args"] if x != "--rerun-on-alert"]
    bare = tuner("compare", base, cur, *judge_args, "--json")
    first = verdicts(json.loads(bare.stdout))
    run = {
        "bare": {"exit": bare.returncode, "class": classify(bare.returncode, first), "metrics": first},
        "trials": {"baseline": trials(base), "current": trials(cur)},
    }
    if bare.returncode == 1 and rerun:  # the gate re-measures an alert (CURRENT's build: the hog runs)
        cur2 = work / "current-rerun.parquet"
        shutil.copy(cur, cur2)
        with slow:
            gate = tuner("compare", base, cur2, *judge_args, "--rerun-on-alert", "--json")
        judged = verdicts(json.loads(gate.stdout))
        run["gate"] = {"exit": gate.returncode, "class": classify(gate.returncode, judged), "metrics": judged}
        run["trials"]["rerun"] = trials(cur2, skip=len(run["trials"]["current"]))
    else:
        run["gate"] = run["bare"]  # judged once (no rerun in this gate, or nothing to re-measure)
    return run


def rates(runs: list[dict], which: str) -> dict:
    """Per class: the count, the rate and its exact 95 % bounds over the runs (rate_ci)."""
    n = len(runs)
    out: dict = {"runs": n}
    for c in ("regression", "inconclusive", "pass"):
        ci = rate_ci(sum(r[which]["class"] == c for r in runs), n)
        out.update(
            {
                f"{c}_count": ci["count"],
                f"{c}_rate": ci["rate"],
                f"{c}_ci95": ci["ci95"],
                f"{c}_lower95": ci["lower95"],
                f"{c}_upper95": ci["upper95"],
            }
        )
    return out


def gate_figures(gate_aa: dict, gate_ab: dict) -> dict:
    """The claim's four figures: false alarms with their one-sided 95 % upper bound, detection with its lower."""
    return {
        "false_alarm_rate": gate_aa["regression_rate"],
        "false_alarm_upper95": gate_aa["regression_upper95"],
        "false_alarms": [gate_aa["regression_count"], gate_aa["runs"]],
        "detection_rate": gate_ab["regression_rate"],
        "detection_lower95": gate_ab["regression_lower95"],
        "detections": [gate_ab["regression_count"], gate_ab["runs"]],
    }


def target_met(fig: dict) -> bool:
    return (fig["detection_lower95"] or 0) >= 0.95 and (fig["false_alarm_upper95"] or 1) <= 0.05


TARGET = "detection_lower95 >= 0.95 and false_alarm_upper95 <= 0.05 (exact 95 % bounds, not the rates)"


def effect(runs: list[dict]) -> dict[str, float | None]:
    """Median change per speed metric (percent, sign as measured) over the runs' first judgements."""
    out = {}
    for m in SPEED:
        xs = [
            r["bare"]["metrics"][m]["change_pct"]
            for r in runs
            if m in r["bare"]["metrics"] and r["bare"]["metrics"][m]["change_pct"] is not None
        ]
        out[m] = statistics.median(xs) if xs else None
    return out


def rejudge(files: list[str], out: str | None) -> int:
    """The 95 % bounds of saved gate-power and gate-projection files, from their saved runs (nothing measured)."""
    from gate_projection import bounds

    rows = []
    for f in files:
        doc = json.loads(Path(f).read_text())
        name = Path(f).name
        if "runs" in doc:  # gate-power: the runs' saved verdicts
            aa = [r for r in doc["runs"] if r["kind"] == "A/A"]
            ab = [r for r in doc["runs"] if r["kind"] == "A/B"]
            s = doc["settings"]
            for which in ("gate", "bare"):
                fig = gate_figures(rates(aa, which), rates(ab, which))
                rows.append(
                    {
                        "file": name,
                        "kind": "gate-power",
                        "judged": which,
                        "rounds": s["rounds"],
                        "gate": s.get("gate"),
                        "order": s.get("order", "baseline first"),
                        **fig,
                        "target_met": target_met(fig),
                    }
                )
        else:  # gate-projection: each row's rates, bounded by the independent joined runs behind it
            n = {
                k: sum(r["kind"] == k for src in doc["sources"] for r in json.loads((ROOT / src).read_text())["runs"])
                for k in ("A/A", "A/B")
            }
            for p in doc["projection"]:
                for which in ("gate", "bare"):
                    b = bounds(
                        p["A/A"][which]["regression"],
                        p["A/B"][which]["regression"],
                        n["A/A"] // p["blocks"],
                        n["A/B"] // p["blocks"],
                    )
                    rows.append(
                        {
                            "file": name,
                            "kind": "gate-projection",
                            "judged": which,
                            "rounds": p["rounds"],
                            "gate": "projected (rerun emulated)" if which == "gate" else "projected, judged once",
                            **b,
                        }
                    )
    print(f"{'file':40s} {'judged':6s} {'rounds':>6}  {'false alarms (upper95)':>22}  {'detection (lower95)':>20}")
    for r in rows:
        fa = f"{100 * r['false_alarm_rate']:.1f} % ({100 * r['false_alarm_upper95']:.1f} %)"
        det = f"{100 * r['detection_rate']:.1f} % ({100 * r['detection_lower95']:.1f} %)"
        print(
            f"{r['file']:40s} {r['judged']:6s} {r['rounds']:6d}  {fa:>22}  {det:>20}"
            + ("  target met" if r["target_met"] else "")
        )
    save(
        "gate-intervals",
        {"sources": files, "target": TARGET, "rows": rows},
        out or Path(__file__).resolve().parent / "results",
        echo=False,
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="A/A runs and as many A/B runs (default 20 each)")
    ap.add_argument("--model", help="GGUF file (default: the synthetic dense q4_0 model, as make perf-check)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds per run (default: the Makefile's PERF_ROUNDS)")
    ap.add_argument("--reps", type=int, help="repetitions per trial (default: the Makefile's PERF_ARGS -r)")
    ap.add_argument("--threads", type=int, help="n_threads of the config (default: physical cores, as shipped)")
    ap.add_argument("--duty", type=float, default=0.10, help="the hog's busy share of each period [0.10]")
    ap.add_argument("--period-ms", type=float, default=10.0, help="the hog's period [10 ms]")
    ap.add_argument("--hog-cpus", help="CPUs to hog, e.g. 0,1 (default: every CPU this process may use)")
    ap.add_argument("--effect", default="7,13", help="the injected tg slowdown must fall in this range, percent")
    ap.add_argument("--out", default=None, help="folder for the JSON result (default benchmarks/results)")
    ap.add_argument(
        "--gate-args",
        default=None,
        help="`tuner compare` options instead of the Makefile's "
        "PERF_COMPARE_ARGS, e.g. '--alpha 0.05' or '--rerun-on-alert' (not the shipped gate)",
    )
    ap.add_argument(
        "--rejudge",
        nargs="+",
        metavar="FILE",
        help="saved gate-power/gate-projection JSON files: recompute their rates' 95 %% bounds, measure nothing",
    )
    ap.add_argument(
        "--join",
        nargs="+",
        metavar="FILE",
        help="saved gate-power JSON files of the same settings: one result from all their runs, measure nothing",
    )
    a = ap.parse_args()
    if a.rejudge:
        return rejudge(a.rejudge, a.out)
    lo, hi = (float(x) for x in a.effect.split(","))
    if a.join:
        return join(a.join, a.out, lo, hi)

    from_makefile = shipped()
    settings = dict(from_makefile)
    if a.gate_args is not None:
        settings["gate_args"] = shlex.split(a.gate_args)
    if a.rounds:
        settings["rounds"] = a.rounds
    if a.reps:
        args, it = [], iter(from_makefile["bench_args"])
        for x in it:
            if x in ("-r", "--repetitions"):
                next(it, None)
            else:
                args.append(x)
        settings["bench_args"] = [*args, "-r", str(a.reps)]
    if a.threads:
        settings["n_threads"] = a.threads
    settings["shipped"] = settings == from_makefile

    if a.model:
        model = Path(a.model)
    else:
        from tuner.model.synth import synthesize

        model = synthesize(MODEL_CACHE, "dense", ("q4_0",))[0]
    from tuner.measure.lock import measurement_lock

    work = Path(tempfile.mkdtemp(prefix="gate-power-"))
    cfg = work / "config.json"
    cpus = [int(c) for c in a.hog_cpus.split(",")] if a.hog_cpus else sorted(os.sched_getaffinity(0))
    config = {"model": str(model), "n_prompt": settings["n_prompt"], "n_gen": settings["n_gen"]}
    if a.threads:
        config["n_threads"] = a.threads
    cfg.write_text(json.dumps({"config": config}))
    tuner = Tuner(work / "child.lock")
    hog = Hog(cpus, a.duty, a.period_ms / 1000)
    print(
        f"{model.name}: {settings['rounds']} rounds of `tuner bench {' '.join(settings['bench_args'])}` a side, "
        f"-p {settings['n_prompt']} -n {settings['n_gen']} ({'the Makefile' if settings['shipped'] else 'NOT'} "
        f"the shipped settings); {a.runs} A/A + {a.runs} A/B runs; hog {100 * a.duty:g} % of "
        f"{a.period_ms:g} ms on CPUs {','.join(map(str, cpus))}; files in {work}",
        flush=True,
    )
    runs: list[dict] = []
    t0 = time.monotonic()
    path = None
    with measurement_lock(wait=True, what="benchmarks/gate_power.py"):
        for i in range(2 * a.runs):
            kind = "A/A" if i % 2 == 0 else "A/B"
            d = work / f"run{i:03d}"
            d.mkdir()
            start = time.monotonic()
            run = one_run(tuner, cfg, d, settings, hog if kind == "A/B" else Nothing())
            run.update(run=i, kind=kind, wall_s=round(time.monotonic() - start, 1), loadavg_1m=os.getloadavg()[0])
            runs.append(run)
            ch = "  ".join(
                f"{m} {v['change_pct']:+.1f}% {v['verdict'][:5]}"
                for m, v in run["bare"]["metrics"].items()
                if m in SPEED and v["change_pct"] is not None
            )
            print(
                f"run {i + 1:3d}/{2 * a.runs} {kind}: gate {run['gate']['class']:12s} (bare "
                f"{run['bare']['class']}) {ch}  [{run['wall_s']:.0f} s, load {run['loadavg_1m']:.1f}]",
                flush=True,
            )
            if kind == "A/B":  # saved after every pair of runs, replacing the last: a stopped run keeps its runs
                result = {
                    "settings": {
                        **settings,
                        "makefile": from_makefile,
                        "order": "ABBA",
                        "runs_per_kind": a.runs,
                        "duty": a.duty,
                        "period_ms": a.period_ms,
                        "hog_cpus": cpus,
                        "gate": " ".join(["tuner compare", *settings["gate_args"]]),
                        "config": config,
                    },
                    "model": model_facts(model),
                    "summary": summarize(runs, hog.share, lo, hi),
                    "wall_s": round(time.monotonic() - t0),
                    "runs": runs,
                }
                last, path = (
                    path,
                    save("gate-power", result, a.out or Path(__file__).resolve().parent / "results", echo=False),
                )
                if last and last != path:
                    last.unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)

    return 0 if path and finish(path, lo, hi) else 1


def summarize(runs: list[dict], hog_share: float | None, lo: float, hi: float) -> dict:
    """The rates (with their bounds), the injected slowdown and the verdict on the target, from the runs."""
    aa = [r for r in runs if r["kind"] == "A/A"]
    ab = [r for r in runs if r["kind"] == "A/B"]
    gate_aa, gate_ab = rates(aa, "gate"), rates(ab, "gate")
    summary = {
        **gate_figures(gate_aa, gate_ab),
        "inconclusive_rate": {"A/A": gate_aa["inconclusive_rate"], "A/B": gate_ab["inconclusive_rate"]},
        "gate": {"A/A": gate_aa, "A/B": gate_ab},
        "bare_gate": {"A/A": rates(aa, "bare"), "A/B": rates(ab, "bare")},
        "effect_pct": {"A/A": effect(aa), "A/B": effect(ab)},
        "hog_cpu_share": hog_share,
    }
    slowdown = summary["effect_pct"]["A/B"]["tg"]
    aa_tg = summary["effect_pct"]["A/A"]["tg"]
    injected = -(slowdown - (aa_tg or 0.0)) if slowdown is not None else None
    summary["injected_tg_slowdown_pct"] = injected
    summary.update(
        target=TARGET,
        target_met=target_met(summary),
        effect_range_pct=[lo, hi],
        effect_in_range=injected is not None and lo <= injected <= hi,
    )
    return summary


def finish(path: Path, lo: float, hi: float) -> bool:
    """Print a saved file's figures; True when the target is met with the slowdown in range."""
    summary = json.loads(path.read_text())["summary"]
    gate_aa, gate_ab = summary["gate"]["A/A"], summary["gate"]["A/B"]

    def pct(x):
        return "-" if x is None else f"{100 * x:.0f} %"

    print(
        f"\nA/A ({gate_aa['runs']} runs): false alarms {pct(gate_aa['regression_rate'])} (95 % upper bound "
        f"{pct(summary['false_alarm_upper95'])}), inconclusive "
        f"{pct(gate_aa['inconclusive_rate'])}, pass {pct(gate_aa['pass_rate'])}   "
        f"[bare gate: false alarms {pct(summary['bare_gate']['A/A']['regression_rate'])}]"
    )
    print(
        f"A/B ({gate_ab['runs']} runs): detected {pct(gate_ab['regression_rate'])} (95 % lower bound "
        f"{pct(summary['detection_lower95'])}), inconclusive "
        f"{pct(gate_ab['inconclusive_rate'])}, missed (pass) {pct(gate_ab['pass_rate'])}   "
        f"[bare gate: detected {pct(summary['bare_gate']['A/B']['regression_rate'])}]"
    )
    eff, share, injected = summary["effect_pct"], summary["hog_cpu_share"], summary["injected_tg_slowdown_pct"]
    print(
        "median change A/B: "
        + ", ".join(f"{m} {v:+.1f} %" for m, v in eff["A/B"].items() if v is not None)
        + "; A/A: "
        + ", ".join(f"{m} {v:+.1f} %" for m, v in eff["A/A"].items() if v is not None)
        + (f"; the hogs took {100 * share:.1f} % of their CPUs" if share else "")
    )
    print(
        f"injected tg slowdown {'-' if injected is None else f'{injected:.1f} %'} "
        f"({'within' if summary['effect_in_range'] else 'OUTSIDE'} {lo:g}-{hi:g} %); target "
        f"(bounds: detection >= 95 %, false alarms <= 5 %): {'met' if summary['target_met'] else 'NOT met'}; {path}"
    )
    return summary["target_met"] and summary["effect_in_range"]


# what makes two files' runs one experiment: the measurement and the gate, not when or where it ran
SAME = ("rounds", "bench_args", "gate_args", "n_prompt", "n_gen", "n_threads", "order", "duty", "period_ms")


def join(files: list[str], out: str | None, lo: float, hi: float) -> int:
    """One result from the runs of several saved gate-power files with the same settings and model (runs of
    60 + 60 take hours: sessions can measure them in parts)."""
    docs = []
    for f in files:
        try:
            doc = json.loads(Path(f).read_text())
            doc["settings"], doc["runs"], doc["model"]["content_hash"]  # noqa: B018 - a gate-power file has them
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: {f}: not a gate-power result ({type(e).__name__})", file=sys.stderr)
            return 2
        docs.append((f, doc))
    first = docs[0][1]
    for f, doc in docs[1:]:
        diff = [k for k in SAME if doc["settings"].get(k) != first["settings"].get(k)]
        if not same_make(doc["model"], first["model"]):  # the quantizer's bytes differ between machines
            diff.append("model")
        if diff:
            print(
                f"error: {f} was measured with other {', '.join(diff)} than {docs[0][0]}: its runs do not join",
                file=sys.stderr,
            )
            return 2
    runs = [{**r, "source": Path(f).name} for f, doc in docs for r in doc["runs"]]
    shares = [(doc["summary"]["hog_cpu_share"], sum(r["kind"] == "A/B" for r in doc["runs"])) for _, doc in docs]
    weight = sum(n for v, n in shares if v is not None)
    share = sum(v * n for v, n in shares if v is not None) / weight if weight else None
    result = {
        "settings": first["settings"],
        "model": first["model"],
        "joined": [Path(f).name for f, _ in docs],
        "summary": summarize(runs, share, lo, hi),
        "wall_s": sum(doc["wall_s"] for _, doc in docs),
        "runs": runs,
    }
    path = save("gate-power", result, out or Path(__file__).resolve().parent / "results", echo=False)
    return 0 if finish(path, lo, hi) else 1


if __name__ == "__main__":
    sys.exit(main())

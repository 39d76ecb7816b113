"""Planner accuracy: predicted vs measured peak RSS over real trials (tuner.measure.runner.Runner, real llama.cpp).

Grid: synthetic tiny, dense (q4_0: CPU_REPACK on x86) and moe presets × n_ctx × (n_batch, n_ubatch) × KV type
× mmap. Each trial's prediction is made with a calibration learned from all the *other* trials
(leave-one-out), so no trial predicts itself; the uncalibrated defaults are printed too.

    python benchmarks/planner_accuracy.py                  # 48 trials, ~5 min on 2 cores
    python benchmarks/planner_accuracy.py --full           # 108 trials
    python benchmarks/planner_accuracy.py --save r.parquet # keep the records; --load r.parquet re-analyses

Exit 0 when every completed trial is predicted within ±10 % (leave-one-out); the grid, the models, the build,
every trial's prediction and error go to benchmarks/results/planner-accuracy-*.json.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS, model_facts, save  # noqa: E402

from tuner.measure import store
from tuner.model.meta import read_model  # noqa: E402
from tuner.model.synth import synthesize  # noqa: E402
from tuner.plan import planner  # noqa: E402
from tuner.record import TrialConfig  # noqa: E402

CACHE = Path(os.environ.get("TUNER_TEST_MODELS", Path.home() / ".cache" / "tuner-test-models"))


def grid(full: bool, n_prompt: int) -> list[TrialConfig]:
    models = [
        synthesize(CACHE, "tiny", ("q8_0",))[0],
        synthesize(CACHE, "dense", ("q4_0",))[0],
        synthesize(CACHE, "moe", ("q8_0",))[0],
    ]
    ctxs = (1024, 4096, 16384) if full else (1024, 8192)
    batches = ((2048, 512), (512, 128), (256, 256)) if full else ((2048, 512), (256, 128))
    return [
        TrialConfig(
            model=str(m),
            n_ctx=c,
            n_batch=b,
            n_ubatch=ub,
            type_k=t,
            type_v=t,
            use_mmap=mm,
            n_prompt=n_prompt,
            n_gen=16,
            repetitions=1,
            n_threads=2,
        )
        for m, c, (b, ub), t, mm in itertools.product(models, ctxs, batches, ("f16", "q8_0"), (True, False))
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--save", help="write the trial records to this Parquet file")
    ap.add_argument("--load", help="analyse records from this Parquet file instead of running trials")
    ap.add_argument("--out", default=str(RESULTS), help="folder for the JSON result")
    args = ap.parse_args()
    if args.load:
        recs = store.records(args.load)
    else:
        from tuner.measure.runner import Runner

        cfgs = grid(args.full, args.n_prompt)
        recs = []
        with Runner(timeout=600) as runner:
            for i, cfg in enumerate(cfgs, 1):
                rec = runner.run(cfg)
                recs.append(rec)
                print(
                    f"[{i}/{len(cfgs)}] {Path(cfg.model).stem} ctx={cfg.n_ctx} b={cfg.n_batch} ub={cfg.n_ubatch} "
                    f"kv={cfg.type_k} mmap={cfg.use_mmap}: {rec.outcome} {(rec.peak_rss_bytes or 0) / 2**20:.1f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
        if args.save:
            store.append(args.save, recs)
    ok = [r for r in recs if r.outcome == "ok" and r.peak_rss_bytes]
    infos = {r.config.model: read_model(r.config.model) for r in ok}
    full_cal = planner.Calibration.from_records(ok, infos)
    print(
        f"calibration from all {len(ok)} trials: baseline {full_cal.baseline_ram / 2**20:.1f} MiB, "
        f"compute scale {full_cal.compute_scale:.3f}"
    )
    head = (
        f"{'model':<12}{'n_ctx':>7}{'b':>6}{'ub':>5}{'kv':>6}{'mmap':>6}{'measured':>11}{'pred(LOO)':>11}"
        f"{'err':>8}{'pred(def)':>11}{'err':>8}"
    )
    print(head)
    print("-" * len(head))
    worst: dict[str, float] = {}
    worst_def = 0.0
    rows = []
    for i, r in enumerate(ok):
        cal = planner.Calibration.from_records(ok[:i] + ok[i + 1 :], infos)
        c = r.config
        info = infos[c.model]
        p = planner.predict(c, info, cal).ram_bytes
        d = planner.predict(c, info).ram_bytes
        e, ed = p / r.peak_rss_bytes - 1, d / r.peak_rss_bytes - 1
        name = Path(c.model).stem
        worst[name] = max(worst.get(name, 0.0), abs(e))
        worst_def = max(worst_def, abs(ed))
        rows.append(
            {
                "model": name,
                "n_ctx": c.n_ctx,
                "n_batch": c.n_batch,
                "n_ubatch": c.n_ubatch,
                "type_kv": c.type_k,
                "use_mmap": c.use_mmap,
                "measured_bytes": r.peak_rss_bytes,
                "predicted_loo_bytes": p,
                "error_loo": e,
                "predicted_default_bytes": d,
                "error_default": ed,
            }
        )
        print(
            f"{name:<12}{c.n_ctx:>7}{c.n_batch:>6}{c.n_ubatch:>5}{c.type_k:>6}{'on' if c.use_mmap else 'off':>6}"
            f"{r.peak_rss_bytes / 2**20:>9.1f}Mi{p / 2**20:>9.1f}Mi{100 * e:>+7.1f}%{d / 2**20:>9.1f}"
            f"Mi{100 * ed:>+7.1f}%"
        )
    failed = len(recs) - len(ok)
    print("-" * len(head))
    for name, w in worst.items():
        print(f"worst |error| {name}: {100 * w:.1f} % (leave-one-out calibration)")
    print(
        f"worst |error| with uncalibrated defaults: {100 * worst_def:.1f} %"
        + (f"; {failed} trial(s) did not complete" if failed else "")
    )
    met = bool(worst) and max(worst.values()) < 0.10
    shape = {k: sorted({getattr(r.config, k) for r in recs}) for k in ("n_prompt", "n_gen", "repetitions", "n_threads")}
    save(
        "planner-accuracy",
        {
            "grid": {
                "full": args.full,
                "loaded_from": args.load,
                "trials": len(recs),
                "completed": len(ok),
                "n_ctx": sorted({r.config.n_ctx for r in recs}),
                "batches": sorted({(r.config.n_batch, r.config.n_ubatch) for r in recs}),
                "type_kv": sorted({r.config.type_k for r in recs}),
                "use_mmap": sorted({r.config.use_mmap for r in recs}),
            },
            "shape": shape,
            "models": [model_facts(m) for m in sorted({r.config.model for r in recs})],
            "trial_build": sorted({r.build_fingerprint for r in recs}),
            "failed": [
                {"model": Path(r.config.model).stem, "n_ctx": r.config.n_ctx, "outcome": r.outcome, "cause": r.cause}
                for r in recs
                if r not in ok
            ],
            "calibration_all": {"baseline_ram": full_cal.baseline_ram, "compute_scale": full_cal.compute_scale},
            "worst_abs_error_loo": worst,
            "worst_abs_error_default": worst_def,
            "trials": rows,
            "target": "every completed trial within ±10 % (leave-one-out)",
            "target_met": met,
        },
        args.out,
        echo=False,
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())

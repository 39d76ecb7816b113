#!/usr/bin/env python3
"""Does a worker waiting with its model loaded slow the trial measured beside it? (tuner.measure.runner)

The runner keeps other loads' workers waiting, so that a race alternating between a few configs reloads none of
them. That is only worth it if the waiting workers cost the measured trial nothing. This measures one config (A)
in the same reused worker, round by round, in two arms interleaved (ABBA):

- `waiting`: another file's model (B) loaded in a worker that waits beside A's;
- `alone`: no other worker (B's stopped first).

In both arms B loads afresh and runs right before A, so A always follows the same work.

Per arm and round: tg and pp (the median of the trial's repetitions); the paired median ratio waiting/alone with
its bootstrap 95 % interval (tuner.stats.ratio_ci) and the exact Wilcoxon test. Also the waiting worker's CPU time
over the rounds (it blocks on its pipe: expected ~0).

    python benchmarks/pool_bias.py                 # ~3 min on 2 cores
    python benchmarks/pool_bias.py --rounds 6

Writes benchmarks/results/pool-bias-*.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import MODEL_CACHE, RESULTS, model_facts, save  # noqa: E402
from tuner import stats  # noqa: E402
from tuner.measure.runner import Runner, resolve  # noqa: E402
from tuner.model.synth import synthesize  # noqa: E402
from tuner.record import TrialConfig  # noqa: E402
from tuner.search.confirm import ALPHA, MIN_EFFECT  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--preset", default="dense-xl")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    paths = synthesize(MODEL_CACHE, a.preset, ("q4_0", "f16"))
    measured, other = (str(MODEL_CACHE / f"{a.preset}-{q}.gguf") for q in ("q4_0", "f16"))
    assert {measured, other} <= {str(p) for p in paths}, paths
    shape = dict(n_prompt=64, n_gen=32, repetitions=3, use_mmap=False)
    cfg_a = resolve(TrialConfig(model=measured, **shape))
    cfg_b = resolve(TrialConfig(model=other, **{**shape, "n_gen": 1, "repetitions": 1}))
    values = {"waiting": {"tg": [], "pp": []}, "alone": {"tg": [], "pp": []}}
    idle_cpu, failed = [], []
    with Runner(reuse=True) as r:
        r.run(cfg_a)  # A's worker loads once; every measured run below reuses it
        for rnd in range(a.rounds):
            for arm in ("waiting", "alone") if rnd % 2 == 0 else ("alone", "waiting"):
                # both arms: B loads afresh and runs right before A (A always follows the same work); then its
                # worker waits beside A's, or is stopped
                for k, w in list(r._waiting.items()):
                    if k == cfg_b.load_key():
                        r._reap(r._waiting.pop(k), kill=False)
                r.run(cfg_b)
                b = r._worker
                waiting = [b]
                if arm == "alone":
                    r._reap(b, kill=False)
                    waiting = []
                cpu0 = [sum(w_cpu(w.pid)) for w in waiting]
                rec = r.run(cfg_a)
                if not rec.ok or rec.model_loaded:
                    failed.append({"round": rnd, "arm": arm, "outcome": rec.outcome, "reloaded": rec.model_loaded})
                    continue
                idle_cpu += [sum(w_cpu(w.pid)) - c for w, c in zip(waiting, cpu0)]
                for m in ("tg", "pp"):
                    values[arm][m].append(stats.trial_value(rec.samples(m)))
    out = {"models": {"measured": model_facts(measured), "waiting": model_facts(other)}, "shape": shape}
    out["rounds"], out["failed"], out["values"] = a.rounds, failed, values
    out["waiting_worker_cpu_s"] = {"max": max(idle_cpu, default=None), "sum": sum(idle_cpu)}
    n = min(len(values["waiting"]["tg"]), len(values["alone"]["tg"]))
    for m in ("tg", "pp"):
        x, y = values["waiting"][m][:n], values["alone"][m][:n]
        ratio, lo, hi = stats.ratio_ci(x, y, paired=True)
        cmp = stats.compare(x, y, paired=True, alpha=ALPHA, min_effect=MIN_EFFECT, alternative="less")
        out[m] = {"ratio_waiting_vs_alone": ratio, "ci95": [lo, hi], "p_slower": cmp.p, "rounds": n}
        print(f"{m}: waiting/alone {ratio:.3f} ({lo:.3f}-{hi:.3f}), p(slower) {cmp.p:.3g}, {n} rounds")
    print(f"the waiting worker's CPU over the measured trials: {out['waiting_worker_cpu_s']}")
    save("pool-bias", out, a.out or RESULTS, echo=False)
    return 0


def w_cpu(pid: int) -> tuple[float, float]:
    import psutil

    try:
        return tuple(psutil.Process(pid).cpu_times()[:2])
    except psutil.Error:
        return (0.0, 0.0)


if __name__ == "__main__":
    raise SystemExit(main())

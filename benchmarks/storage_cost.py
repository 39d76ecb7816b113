"""What a fleet's shared storage costs per trial: PostgreSQL against SQLite, through tuner's own fleet code.

Each backend gets a search over a FleetLedger (tuner.search.fleet) on a 384-config space; per trial the script runs
the host's whole bookkeeping path with the measurement left out: the budget check (fail stale trials, read the other
hosts' new records, count), ask + suggest, the heartbeat, the config claim, then the record (local Parquet + the shared
records table) and the tell. The record is a real one: `tuner bench --json` on the tiny synthetic model, once,
re-labelled per trial (same size as a search's records). Trials alternate between the backends (interleaved), so
machine load hits both alike; the report is the median and p90 per phase and backend, over --trials trials each.
A repeated config (the sampler proposing a claimed one) is timed apart: it is told the pooled figure, nothing runs.
PostgreSQL is a real server started for the run (tests/pg.py) on this machine.

Target: median per-trial cost <= 0.5 s on both (1 % of a 50-s trial of a real model); exit 1 when missed.

    .venv/bin/python benchmarks/storage_cost.py --trials 60
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _results import save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TUNER = str(Path(sys.executable).with_name("tuner"))
TARGET_S = 0.5
PHASES = ("budget", "ask", "record_tell")


def real_record(model: str, lock: str):
    from tuner.record import TrialRecord

    out = subprocess.run(
        [
            TUNER,
            "bench",
            model,
            "-t",
            "1",
            "-p",
            "64",
            "-n",
            "16",
            "-r",
            "5",
            "--json",
            "-o",
            str(Path(lock).with_suffix(".parquet")),
            "--lock-file",
            lock,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return TrialRecord.from_json(out.stdout.strip().splitlines()[-1])


def make_search(url: str, folder: Path, model: str, rec):
    from tuner.measure import hardware
    from tuner.model.meta import read_model
    from tuner.record import TrialConfig
    from tuner.search import fleet
    from tuner.search import space as spacelib
    from tuner.search.loop import Search
    from tuner.search.options import SearchOptions

    infos = {model: read_model(model)}
    hw, build = hardware.from_dict(rec.hw), rec.build
    base = TrialConfig(model=model, n_prompt=64, n_gen=16, repetitions=5)
    specs = {
        "n_threads": "1:8",
        "n_ubatch": "64,128,256,512",
        "n_batch": "256,512,1024,2048",
        "n_ctx": "1024,2048,4096",
    }
    space = spacelib.build_space([model], infos, specs, base, False, 8, 8)
    opts = SearchOptions(results=folder, study="cost", storage=url, n_trials=None, confirm=0, drift_every=0, plan=False)
    srch = Search(space, opts, infos, hw, build, ledger=fleet.FleetLedger(opts))
    srch.prepare()
    return srch


def one_trial(srch, real) -> dict:
    """The host's per-trial path from tuner.search.loop.Search.search_loop/run_one, without the measurement (and
    without the heartbeat's thread: one heartbeat is recorded, as the thread's first beat does)."""

    t0 = time.perf_counter()
    srch.budget_left()
    t1 = time.perf_counter()
    trial = srch.study.ask()
    cfg = srch._suggest(trial)
    srch.ledger.backend.record_heartbeat(trial._trial_id)
    key = cfg.key()
    first = srch.ledger.claim(key, trial.number, srch.seen)
    t2 = time.perf_counter()
    if first is not None:
        srch._duplicate(trial, first, key)
        return {"duplicate": True, "total": time.perf_counter() - t0}
    srch.seen.setdefault(key, trial.number)
    rec = dataclasses.replace(real, config=cfg, study=srch.study_name, trial_number=trial.number, state="COMPLETE")
    srch._tell_and_write(trial.number, rec)
    t3 = time.perf_counter()
    return {"duplicate": False, "budget": t1 - t0, "ask": t2 - t1, "record_tell": t3 - t2, "total": t3 - t0}


def stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {
        "median_s": statistics.median(xs),
        "p90_s": xs[int(0.9 * (len(xs) - 1))],
        "min_s": xs[0],
        "max_s": xs[-1],
        "n": len(xs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=60, help="trials per backend (>= 50)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.trials < 50:
        sys.exit("--trials must be at least 50")
    import optuna
    import pg
    import psycopg
    import sqlalchemy

    from tuner.measure import hardware
    from tuner.model.synth import synthesize

    model = str(synthesize(Path.home() / ".cache" / "tuner-test-models", "tiny", ("q8_0",))[0])
    srv = pg.start()
    try:
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            real = real_record(model, str(d / "bench.lock"))
            record_bytes = len(real.to_json())
            backends = {
                "postgresql": make_search(srv.url(), d / "pg", model, real),
                "sqlite": make_search(f"sqlite:///{d / 'cost.db'}", d / "sqlite", model, real),
            }
            rows = []
            for i in range(args.trials * 3):  # repeats (duplicates) do not count toward --trials
                if all(sum(not r["duplicate"] for r in rows if r["backend"] == b) >= args.trials for b in backends):
                    break
                order = list(backends) if i % 2 == 0 else list(reversed(backends))
                for name in order:
                    if sum(not r["duplicate"] for r in rows if r["backend"] == name) < args.trials:
                        rows.append({"backend": name, "i": i, **one_trial(backends[name], real)})
            with backends["postgresql"].ledger.backend.engine.connect() as c:
                server = c.execute(sqlalchemy.text("SHOW server_version")).scalar()
            for s in backends.values():
                s.close()
    finally:
        pg.stop(srv)
    result = {
        "trials_per_backend": args.trials,
        "record_json_bytes": record_bytes,
        "space_configs": 384,
        "target_median_s": TARGET_S,
        "postgresql_server": server,
        "optuna": optuna.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg": psycopg.__version__,
        "machine": hardware.probe().fingerprint_dict(),
        "model": model,
        "rounds": rows,
        "summary": {},
    }
    ok = True
    for name in ("postgresql", "sqlite"):
        full = [r for r in rows if r["backend"] == name and not r["duplicate"]]
        dup = [r["total"] for r in rows if r["backend"] == name and r["duplicate"]]
        summ = {p: stats([r[p] for r in full]) for p in (*PHASES, "total")}
        summ["first_10_total"] = stats([r["total"] for r in full[:10]])
        summ["last_10_total"] = stats([r["total"] for r in full[-10:]])
        summ["repeats"] = stats(dup) if dup else None
        result["summary"][name] = summ
        ok &= summ["total"]["median_s"] <= TARGET_S
        print(
            f"{name:10s} per trial: median {summ['total']['median_s'] * 1000:.1f} ms, "
            f"p90 {summ['total']['p90_s'] * 1000:.1f} ms (budget {summ['budget']['median_s'] * 1000:.1f}, "
            f"ask {summ['ask']['median_s'] * 1000:.1f}, record+tell {summ['record_tell']['median_s'] * 1000:.1f});"
            f" first 10 {summ['first_10_total']['median_s'] * 1000:.1f} ms, last 10 "
            f"{summ['last_10_total']['median_s'] * 1000:.1f} ms",
            file=sys.stderr,
        )
    result["passed"] = bool(ok)
    save("storage-cost", result, args.out)
    print(json.dumps({k: v["total"] for k, v in result["summary"].items()}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

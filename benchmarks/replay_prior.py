#!/usr/bin/env python3
"""The search's prior (tuner.search.prior) on the replay's tables (replay.py), against the ceiling and controls.

For each table, over SEEDS seeds, the same budget (a share of the grid, the same race):
    search      TPE with the prior: the predicted best measured first, corrected as it goes (`tuner search`)
    tpe         TPE without the prior (`tuner search --no-prior`, the search before issue 36)
    random      the random sampler, no prior
    prediction  the prediction alone: its START top configs (distinct loads) and the defaults, raced; nothing else
    ceiling     every config measured once, then the race (fewer seeds: it costs a whole grid a seed)
Each reports its rate of landing within 2 % and 5 % of the grid's best (the best config's median over all the
table's rounds), its median share of the best and its median wall time relative to measuring the grid once (the
race included). Saved per grid as benchmarks/results/replay-prior-GRID-*.json.

The prior predicts from a probe of the machine that measured the table: the probe a speed-accuracy run of that
machine recorded (benchmarks/results/speed-accuracy-*.json, the same hardware fingerprint), else this machine's
own (~/.cache/tuner) when the table was measured here.

Examples:
  benchmarks/replay_prior.py benchmarks/results/replay-grid-dense-64-20261203-204121.json --seeds 30
  benchmarks/replay_prior.py benchmarks/results/replay-grid-cold-48-*.json --held-out --seeds 100
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import save  # noqa: E402
from replay import OBJECTIVE, ReplayError, Settings, load_table, replay_seed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# the settings the replay chose on dense-64 (replay-tune-20261203-210804.json): 1/8 of the grid, the top 1 raced
SHARE, K, MAX_ROUNDS = 0.125, 1, 5
# what the held-out runs use: chosen on dense-64 (replay-grid-dense-64-20261203-204121.json) and nommap-60, 30 seeds
# each, pairs of share 0.125-0.25 and race top 1-3: the best median share on both, within the wall target on dense-64
TUNED = {"share": 0.125, "k": 2, "tuned_on": ["dense-64 (20261203-204121)", "nommap-60 (20261203-212331)"]}


def table_probe(table) -> dict:
    """The probe of the machine that measured the table (see the module docstring)."""
    from tuner.plan import probe as probelib
    from tuner.plan.roofline import cache_dir

    fp = table.doc["provenance"]["hardware"]["fingerprint"]
    for f in sorted(RESULTS.glob("speed-accuracy-*.json"), reverse=True):
        for r in json.loads(f.read_text()).get("rounds") or []:
            p = r.get("probe") or {}
            if p.get("hw_fingerprint") == fp and p.get("version") == probelib.VERSION:
                return p
    for f in sorted(cache_dir().glob(f"probe-{fp}-*.json")):
        return probelib.load(f)
    raise ReplayError(f"no probe of the machine that measured {table.path} (hardware {fp})")


def make_prior(table, probe: dict, **knobs):
    from tuner.search.prior import Prior

    return Prior.build(table.space, table.infos, probe, OBJECTIVE, gpu_offload=False, fits=lambda c: True, **knobs)


def seeded(prior, seed: int):
    """The prior of one seed: its ties in that seed's order, nothing proposed yet."""
    p = dataclasses.replace(prior, seed=seed, picked=0, proposed=set())
    p.picks = p.start_picks()
    return p


def method(table, name: str, seeds: int, n_trials: int, prior=None, work: Path | None = None, k: int = K) -> dict:
    """`seeds` replayed searches of one method: the summary keys of the saved JSON (`k`: the race's top K, the same
    for every method but the prediction's)."""
    st = Settings("tpe", n_trials, k, MAX_ROUNDS)
    per_load = None
    if name == "random":
        st = dataclasses.replace(st, sampler="random")
    elif name == "ceiling":
        st = dataclasses.replace(st, sampler="grid", n_trials=len(table.entries))
    elif name == "prediction":  # its top configs and the defaults, raced; no block after a load
        st = dataclasses.replace(st, n_trials=1 + prior.start, confirm=prior.start)
        per_load = 1
    grid_s = table.grid_once_s()
    runs = []
    for seed in range(seeds):
        pr = seeded(prior, seed) if prior is not None and name in ("search", "prediction") else None
        runs.append(replay_seed(table, seed, st, work, prior=pr, per_load=per_load))
    shares = [r["share_of_best"] for r in runs]
    return {
        "settings": dataclasses.asdict(st),
        "seeds": seeds,
        "within_2pct_rate": sum(s >= 0.98 for s in shares) / seeds,
        "within_5pct_rate": sum(s >= 0.95 for s in shares) / seeds,
        "median_share_of_best": statistics.median(shares),
        "wall_vs_grid_median": statistics.median(r["wall_s"] / grid_s for r in runs),
        "shares": [round(s, 4) for s in shares],
    }


def evaluate(
    path: str,
    seeds: int,
    ceiling_seeds: int,
    held_out: bool,
    knobs: dict,
    k: int = K,
    only=None,
    log=print,
    share: float = SHARE,
) -> dict:
    table = load_table(path)
    probe = table_probe(table)
    prior = make_prior(table, probe, **knobs)
    n = max(3, round(share * len(table.entries)))
    out = {"grid": table.doc["grid"], "table": path, "configs": len(table.entries), "n_trials": n}
    with tempfile.TemporaryDirectory(prefix="tuner-replay-prior-") as work:
        res = {}
        for name, s in (
            ("search", seeds),
            ("tpe", seeds),
            ("random", seeds),
            ("prediction", seeds),
            ("ceiling", ceiling_seeds),
        ):
            if only and name not in only:
                continue
            t0 = time.monotonic()
            res[name] = method(table, name, s, n, prior, Path(work) / name, k)
            r = res[name]
            log(
                f"  {table.doc['grid']} {name}: within 2 % {r['within_2pct_rate']:.2f}, "
                f"5 % {r['within_5pct_rate']:.2f}, share {r['median_share_of_best']:.3f}, "
                f"wall {r['wall_vs_grid_median']:.2f} "
                f"({time.monotonic() - t0:.0f} s)"
            )
    if only:
        return res
    s = res.pop("search")
    out.update(
        seeds=seeds,
        held_out=held_out,
        within_2pct_rate=s["within_2pct_rate"],
        within_5pct_rate=s["within_5pct_rate"],
        median_share_of_best=s["median_share_of_best"],
        wall_vs_grid_median=s["wall_vs_grid_median"],
        ceiling_within_2pct_rate=res["ceiling"]["within_2pct_rate"],
        settings={"share": share, "k": k, "max_rounds": MAX_ROUNDS, "tuned_on": TUNED["tuned_on"]},
        prior={
            "knobs": knobs,
            "values": {n: getattr(prior, n) for n in ("start", "keep", "block", "ridge", "own", "lead")},
            "probe_hw_fingerprint": probe.get("hw_fingerprint"),
            "start": [prior.describe(k) for k in prior.picks],
            "unmodelled": prior.unmodelled,
        },
        search=s,
        controls=res,
    )
    out["target"] = {
        "within_2pct_vs_ceiling": 0.9,
        "median_share_of_best": 0.97,
        "wall_vs_grid": 0.35,
        "met": (
            s["within_2pct_rate"] >= 0.9 * out["ceiling_within_2pct_rate"]
            and s["median_share_of_best"] >= 0.97
            and s["wall_vs_grid_median"] <= 0.35
            and all(s["median_share_of_best"] > c["median_share_of_best"] for n, c in res.items() if n != "ceiling")
        ),
    }
    return out


def live_check(path: str, seeds: int, k: int, share: float, log=print) -> dict:
    """The search with the prior run for real (`tuner search`'s own run_search, this machine's probe) for `seeds`
    seeds on a grid's space, against what the replay of the same settings predicts (30 seeds)."""
    from replay import live

    table = load_table(path)
    n = max(3, round(share * len(table.entries)))
    st = Settings("tpe", n, k, MAX_ROUNDS)
    prior = make_prior(table, table_probe(table))
    with tempfile.TemporaryDirectory(prefix="tuner-replay-prior-") as work:
        out = live(table, st, seeds, log, predict=lambda: method(table, "search", 30, n, prior, Path(work), k))
    out.update(grid=table.doc["grid"], table=path, grid_once_s=table.grid_once_s(), models_made_alike=table.alike)
    out["cold_loads_replayed_not_live"] = bool(table.doc["recipe"].get("cold"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__[__doc__.index("Examples:") :],
    )
    ap.add_argument("tables", nargs="+")
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--ceiling-seeds", type=int, default=100)
    ap.add_argument("--held-out", action="store_true", help="these tables were not used to choose the knobs")
    ap.add_argument("--start", type=int, default=None, help="the prior's start picks (tuner.search.prior.START)")
    ap.add_argument("--keep", type=float, default=None, help="tuner.search.prior.KEEP")
    ap.add_argument("--block", type=int, default=None, help="tuner.search.prior.BLOCK")
    ap.add_argument("--own", type=float, default=None, help="tuner.search.prior.OWN")
    ap.add_argument("--ridge", type=float, default=None, help="tuner.search.prior.RIDGE")
    ap.add_argument("--k", type=int, default=TUNED["k"], help="the race: its top K and the defaults")
    ap.add_argument("--share", type=float, default=TUNED["share"], help="the search's trials, a share of the grid")
    ap.add_argument("--only", default=None, help="methods to run, comma-separated (tuning: nothing is saved)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--live", type=int, default=0, help="run the search for real this many seeds (one table)")
    a = ap.parse_args(argv)
    if a.live:
        out = live_check(a.tables[0], a.live, a.k, a.share)
        saved = save("replay-prior-live", out, a.out or RESULTS, echo=False)
        print(
            f"live: within 2 % {out['within_2pct_rate']:.2f}, share {out['median_share_of_best']:.3f}, wall "
            f"{out['wall_vs_grid_median']:.2f}; the replay: {out['replay_within_2pct_rate']:.2f}, "
            f"{out['replay_median_share_of_best']:.3f}, {out['replay_wall_vs_grid_median']:.2f}; {saved}"
        )
        return 0
    knobs = {k: v for k in ("start", "keep", "block", "own", "ridge") if (v := getattr(a, k)) is not None}
    for path in a.tables:
        try:
            only = a.only.split(",") if a.only else None
            out = evaluate(path, a.seeds, a.ceiling_seeds, a.held_out, knobs, a.k, only, share=a.share)
            if only:
                if a.out:  # a part of a grid's figures, to merge (nothing under results)
                    Path(a.out).write_text(json.dumps(out, indent=1))
                continue
        except ReplayError as e:
            print(f"replay_prior.py: error: {e}", file=sys.stderr)
            return 2
        saved = save(f"replay-prior-{out['grid']}", out, a.out or RESULTS, echo=False)
        print(f"{out['grid']}: target {'met' if out['target']['met'] else 'NOT met'}; {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A tabular replay benchmark of `tuner search`: measure a grid once, thoroughly; replay the real search on it.

    measure  every config of a small space for R interleaved rounds (fresh worker per trial, so every trial
             records its load time; the order of the load-key groups alternates between rounds, A B B A),
             saved as benchmarks/results/replay-grid-NAME-*.json with provenance.
    run      the real `tuner.search.loop.Search` (its sampler, baselines, constraints, duplicate handling, the
             confirmation race and the recommendation) on that table for many seeds, with only the runner
             replaced: each run draws one recorded trial of its config (a random round, not reused within a
             seed while unused ones are left) and advances a clock by that trial's recorded cost, its load
             counted only when the load key changes from the previous run (as a reused worker does). The
             recommendation's "true" objective is the config's median over all recorded rounds; no drift
             enters, and 100 seeds take minutes instead of nights.

Tabular HPO benchmarks (NAS-Bench-201, HPOBench's tabular set) work this way; see ../shared/README.md. The
table's costs are this machine's, measured with the same worker the search uses.

Examples:
  benchmarks/replay.py measure --grid quant-kv --rounds 9
  benchmarks/replay.py run benchmarks/results/replay-grid-quant-kv-*.json --seeds 100 --n-trials 5
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import MODEL_CACHE, clopper_pearson, model_facts, same_make, save  # noqa: E402

from tuner.record import TrialConfig, TrialRecord  # noqa: E402

# Grids: small spaces where llama.cpp's defaults (the first model file, f16 KV, every core) are not the best.
GRIDS = {
    # quant files × K-cache type × flash attention × threads (24 configs); the defaults run the first file (f16),
    # which reads the most bytes
    "quant-kv": {
        "preset": "dense",
        "quants": ["f16", "q8_0", "q4_0"],
        "specs": {"n_threads": "1,2", "type_k": "f16,q8_0", "flash_attn": "on,off"},
        "shape": {"n_prompt": 64, "n_gen": 16, "repetitions": 2},
    },
    # 12 configs, mmap off: every change of file reloads it from the page cache into anonymous memory, a large part of a
    # short trial's cost; the batch size matters for the prompt
    "nommap-batch": {
        "preset": "dense",
        "quants": ["f32", "q8_0", "q4_k_m"],
        "specs": {"n_threads": "1,2", "n_ubatch": "8,64", "use_mmap": "false"},
        "shape": {"n_prompt": 64, "n_gen": 8, "repetitions": 2},
    },
    # Two grids measured on a quiet machine (2026-12-03 evening), big enough that a search of a fifth of a grid
    # and a 5-round race can fit in 35 % of measuring it once. A request of 128 + 128 tokens: at 64 + 16 a trial's
    # value scattered 12 % (log sd) between rounds on this VM (replay-grid-dense-64-20261203-195841.json), more
    # than the gaps between the best configs; 256 generated tokens scatter about 4 %. 64 configs: quant files ×
    # threads × K-cache type × flash attention × micro-batch; the defaults (f16, every core, f16 K, ubatch 512)
    # are not the best.
    "dense-64": {
        "preset": "dense",
        "quants": ["f16", "q8_0", "q4_0", "q4_k_m"],
        "specs": {"n_threads": "1,2", "type_k": "f16,q8_0", "flash_attn": "on,off", "n_ubatch": "16,512"},
        "shape": {"n_prompt": 128, "n_gen": 128, "repetitions": 2},
    },
    # 60 configs, mmap off and a short request: every file is read into anonymous memory, so a search that hops
    # between files pays for it (meant as the grid whose load is >= 30 % of a trial; measured: 9 % median, the
    # 518 MB f32 loads in 0.3-0.5 s from the page cache, so that grid still needs a model of several GB)
    "nommap-60": {
        "preset": "dense",
        "quants": ["f32", "f16", "q8_0", "q4_k_m", "q4_0"],
        "specs": {"n_threads": "1,2", "n_ubatch": "8,64,512", "type_k": "f16,q8_0", "use_mmap": "false"},
        "shape": {"n_prompt": 64, "n_gen": 32, "repetitions": 2},
    },
    # 48 configs whose loads are >= 30 % of a trial: a 575 M-parameter model, mmap off, its pages evicted before
    # every trial (as a model bigger than RAM loads: from the disk, every time) and a short request. On the 130 M
    # dense model cold loads were 15-55 % of a trial (median ~20 %): a trial's fixed costs did not scale with it;
    # one repetition, as two put the xl model's loads at a median ~31 % (probe of 8 configs)
    "cold-48": {
        "preset": "dense-xl",
        "quants": ["f16", "q8_0", "q4_k_m", "q4_0"],
        "specs": {"n_threads": "1,2", "n_ubatch": "8,64,512", "type_k": "f16,q8_0", "use_mmap": "false"},
        "shape": {"n_prompt": 32, "n_gen": 16, "repetitions": 1},
        "cold": True,
    },
    # 108 configs, held out for the prior (issue 36): two dimensions the speed model predicts (quant file, threads)
    # crossed with three it does not model (K-cache type, flash attention, micro-batch), so the prediction alone
    # cannot read the best off; a short request (one repetition) to keep the grid within ~15 minutes
    "prior-108": {
        "preset": "dense",
        "quants": ["f16", "q8_0", "q4_0"],
        "specs": {"n_threads": "1,2", "type_k": "f16,q8_0,q4_0", "flash_attn": "on,off", "n_ubatch": "8,16,512"},
        "shape": {"n_prompt": 64, "n_gen": 32, "repetitions": 1},
    },
    # for tests: loads in milliseconds
    "tiny": {
        "preset": "tiny",
        "quants": ["q8_0", "q4_k_m"],
        "specs": {"n_threads": "1,2"},
        "shape": {"n_prompt": 16, "n_gen": 4, "repetitions": 2},
    },
}
GRIDS["tiny-cold"] = {**GRIDS["tiny"], "cold": True}
OBJECTIVE = "mixed"


class ReplayError(ValueError):
    """Bad input for the replay (a table of another space, a missing model): one line, exit 2."""


# -- the space, as `tuner search` builds it ----------------------------------------------------------------------
def build(models: list[str], specs: dict, shape: dict):
    """The Space and model infos `tuner search -m ... --<specs>` would search (no default dimensions added)."""
    from tuner.measure import hardware
    from tuner.model.meta import read_model
    from tuner.search import space as spacelib

    infos = {m: read_model(m) for m in models}
    hw = hardware.probe()
    base = TrialConfig(model=models[0], n_threads=hw.cores_physical, n_threads_batch=0, **shape)
    space = spacelib.build_space(
        models,
        infos,
        dict(specs),
        base,
        False,
        hw.cores_physical,
        hw.cores_logical,
        objective=OBJECTIVE,
        auto=False,
        ram_total=hw.ram_total,
    )
    if "n_threads_batch" not in space.dims:  # as run_search: threads_batch follows threads
        space.base = dataclasses.replace(space.base, n_threads_batch=0)
    return space, infos, hw


def grid_configs(space, infos) -> list[TrialConfig]:
    """Every config of the space as the search resolves it (what its trials record)."""
    from tuner.measure.runner import resolve

    return [resolve(c, infos[c.model]) for c in space.configs()]


def grid_models(grid: dict) -> list[str]:
    from tuner.model.synth import synthesize

    return [str(p) for p in synthesize(MODEL_CACHE, grid["preset"], tuple(grid["quants"]))]


# -- measure ----------------------------------------------------------------------------------------------------
def measure(name: str, rounds: int, out=None, log=print) -> Path:
    from tuner.measure import pagecache
    from tuner.measure.lock import measurement_lock
    from tuner.measure.runner import Runner
    from tuner.search.confirm import run_order

    grid = GRIDS[name]
    models = grid_models(grid)
    space, infos, hw = build(models, grid["specs"], grid["shape"])
    cfgs = grid_configs(space, infos)
    table = {c.key(): {"config": c.to_dict(), "trials": []} for c in cfgs}
    log(f"{name}: {len(cfgs)} configs x {rounds} rounds")
    t0 = time.monotonic()
    with measurement_lock(wait=True, what="benchmarks/replay.py measure"), Runner(timeout=300, reuse=False) as runner:
        for rnd in range(rounds):
            for cfg in run_order(cfgs, rnd):
                if grid.get("cold"):  # as a model bigger than RAM loads: from the disk, every time
                    pagecache.evict(infos[cfg.model].shards)
                r = runner.run(cfg)
                table[cfg.key()]["trials"].append(
                    {
                        "round": rnd,
                        "outcome": r.outcome,
                        "cause": r.cause[:200],
                        "tg": r.tg_samples,
                        "pp": r.pp_samples,
                        "ttft_ms": r.ttft_samples_ms,
                        "load_ms": r.load_ms,
                        "wall_s": r.wall_s,
                        "peak_rss_bytes": r.peak_rss_bytes,
                        "page_cache_pct": r.page_cache_pct,
                        "started_utc": r.started_utc,
                    }
                )
            log(f"round {rnd + 1}/{rounds} done, {time.monotonic() - t0:.0f} s")
    result = {
        "grid": name,
        "recipe": grid,
        "rounds": rounds,
        "objective": OBJECTIVE,
        "models": [model_facts(m) for m in models],
        "space": space.describe(),
        "configs": list(table.values()),
        "wall_s": round(time.monotonic() - t0, 1),
    }
    return save(f"replay-grid-{name}", result, out or Path(__file__).resolve().parent / "results", echo=False)


# -- the table ---------------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One config of the table: its recorded trials (ok ones), their values and the truth (their median)."""

    config: TrialConfig
    trials: list[dict]
    values: list[float] = field(default_factory=list)  # each ok trial's objective, in the order of `trials`
    truth: float | None = None
    cost_s: float = 0.0  # a trial's median wall time without its load
    load_s: float = 0.0  # its median load


@dataclass
class Table:
    path: str
    doc: dict
    space: object
    infos: dict
    hw: object
    entries: dict[tuple, Entry] = field(default_factory=dict)
    alike: list[str] = field(default_factory=list)  # model files made alike, not the measured bytes

    @property
    def best(self) -> float:
        return max(e.truth for e in self.entries.values() if e.truth is not None)

    def truth(self, key: tuple) -> float | None:
        e = self.entries.get(key)
        return e.truth if e else None

    def grid_once_s(self) -> float:
        """Measuring every config once, in the order that reloads least: the reference cost of the grid."""
        from tuner.search.confirm import run_order

        cfgs = [e.config for e in self.entries.values()]
        total, last = 0.0, None
        for c in run_order(cfgs, 0):
            e = self.entries[c.key()]
            total += e.cost_s + (e.load_s if c.load_key() != last else 0.0)
            last = c.load_key()
        return total


def trial_objective(t: dict, cfg: TrialConfig) -> float | None:
    from tuner import stats
    from tuner.search.confirm import objective_samples

    rec = TrialRecord(cfg, outcome=t["outcome"], tg_samples=t["tg"], pp_samples=t["pp"], ttft_samples_ms=t["ttft_ms"])
    return stats.trial_value(objective_samples(rec, OBJECTIVE)) if rec.ok else None


def local_models(doc: dict) -> tuple[list[str], list[str]]:
    """The table's model files on this machine (re-made from the recipe when missing) and those of them that are
    not the measured bytes but made alike (_results.same_make: the quantizer's bytes differ between machines)."""
    want = doc["models"]
    paths = [m["path"] for m in want]
    if not all(Path(p).is_file() for p in paths) and "recipe" in doc:
        paths = grid_models(doc["recipe"])
    have = [model_facts(p) if Path(p).is_file() else {} for p in paths]
    bad = next((p for p, h, w in zip(paths, have, want) if not same_make(h, w)), None)
    if bad:
        raise ReplayError(
            f"model {bad} is not the file the table measured, nor made alike (size, type or parameters differ)"
        )
    return paths, [p for p, h, w in zip(paths, have, want) if h["content_hash"] != w["content_hash"]]


def load_table(path: str | Path, grid: str | None = None) -> Table:
    """A measured table, checked against the space the replay searches (its own recipe, or GRIDS[grid])."""
    from tuner import stats

    try:
        doc = json.loads(Path(path).read_text())
        recipe = doc["recipe"]
        doc["configs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReplayError(f"{path}: not a replay table ({type(e).__name__}: {str(e)[:80]})") from None
    models, alike = local_models(doc)
    want = GRIDS[grid] if grid else recipe
    if grid and (want["preset"], want["quants"]) != (recipe["preset"], recipe["quants"]):
        raise ReplayError(
            f"{path} was measured on another space (models {recipe['preset']} "
            f"{','.join(recipe['quants'])}), not grid {grid!r}"
        )
    space, infos, hw = build(models, want["specs"], want["shape"])
    by_model = dict(zip([m["path"] for m in doc["models"]], models))
    recorded = {}
    for c in doc["configs"]:
        d = dict(c["config"], model=by_model.get(c["config"]["model"], c["config"]["model"]))
        cfg = TrialConfig.from_dict({**d, "overrides": tuple(d.get("overrides", ()))})
        recorded[cfg.key()] = (cfg, c["trials"])
    table = Table(str(path), doc, space, infos, hw, alike=alike)
    for cfg in grid_configs(space, infos):
        k = cfg.key()
        if k not in recorded:
            what = ", ".join(f"{n}={getattr(cfg, n)}" for n in space.varying())
            raise ReplayError(
                f"{path} was measured on another space: it has no trial of {what} (model {Path(cfg.model).name})"
            )
        cfg, trials = recorded[k]
        valued = [(t, v) for t in trials if t["outcome"] == "ok" and (v := trial_objective(t, cfg))]
        ok = [t for t, _ in valued]
        e = Entry(cfg, ok or trials, [v for _, v in valued])
        if ok:
            e.truth = stats.center(e.values)
            e.load_s = statistics.median((t["load_ms"] or 0) / 1000 for t in ok)
            e.cost_s = statistics.median(max(0.0, t["wall_s"] - (t["load_ms"] or 0) / 1000) for t in ok)
        else:
            e.cost_s = statistics.median(t["wall_s"] or 0 for t in trials)
        table.entries[k] = e
    return table


# -- the replay -------------------------------------------------------------------------------------------------
class Clock:
    """The replay's time: advanced by the recorded cost of every run, nothing else."""

    def __init__(self):
        self.t = 0.0

    def monotonic(self) -> float:  # the search's clock (Search(clock=...)): its budget, its typical trial
        return self.t


class ReplayRunner:
    """The runner `tuner.search.loop.Search` calls, answering from the table: a recorded trial of the config (a search
    trial: a round not drawn yet in this seed, while any is left; a confirmation run: the recorded round this
    seed maps the confirmation round to, the same for every candidate), its cost on the clock, the load only
    when no worker has the config's load: the last run's, or one of those tuner.measure.runner keeps waiting
    (KEEP_LOADED, least recently used evicted, where their recorded peak RSS leaves the new load's need and the
    reserve free in the probed RAM)."""

    last_log = ""
    reuse = True  # as the search's default Runner: a worker that finished cleanly keeps its model

    @property
    def loaded_key(self) -> tuple | None:
        """The load key the (replayed) last worker keeps loaded: the study steers duplicates to it."""
        return self.last_key

    @property
    def loaded_keys(self) -> list[tuple]:
        return [*self.waiting, *([self.last_key] if self.last_key is not None else [])]

    def _load(self, cfg: TrialConfig, rss: int, need_bytes: int | None) -> bool:
        """The runner's worker choice (tuner.measure.runner.Runner._worker_for) on the replay's books: True when
        this run loads its model."""
        from tuner.measure import runner as rn

        k = cfg.load_key()
        if k == self.last_key:
            return False
        if self.last_key is not None and self.last_host_only:
            self.waiting[self.last_key] = self.last_rss
        hit = self.waiting.pop(k, None) is not None
        if not hit:
            need = rn.load_need(cfg.model, need_bytes)
            free = self.hw.ram_available or self.hw.ram_total
            while self.waiting and rn.too_many_waiting(
                len(self.waiting), rn.KEEP_LOADED, free - sum(self.waiting.values()), need, self.hw.ram_total
            ):
                self.waiting.pop(next(iter(self.waiting)))
        self.last_key, self.last_rss = k, rss
        self.last_host_only = rn.keeps_host_only(cfg, self.build)
        return not hit

    def __init__(self, table: Table, clock: Clock, rng: random.Random):
        from tuner.measure import hardware

        self.table, self.clock, self.rng = table, clock, rng
        self.hw, self.build = table.hw, hardware.build_info()
        self.last_key, self.last_rss, self.last_host_only = None, 0, False
        self.waiting: dict[tuple, int] = {}  # load key → its worker's RSS, least recently used first
        self.drawn: dict[tuple, list[int]] = {}
        self.runs = 0
        self.loads = 0
        # a confirmation round draws the same recorded round for every candidate: the table's rounds were
        # interleaved over every config, as a live race's rounds are over its candidates, so a paired test sees
        # the machine's drift cancel as it would live (a random round per candidate would add it as noise)
        rounds = sorted({t.get("round", i) for e in table.entries.values() for i, t in enumerate(e.trials)})
        self.round_of = rng.sample(rounds, len(rounds))
        self.search = None  # the replayed search: its confirm_round pairs a confirmation run with a recorded round

    @property
    def confirm_round(self) -> int | None:
        """The round of the confirmation (or ladder) run the search measures now; None for a search trial."""
        return self.search.confirm_round if self.search is not None else None

    def run(self, cfg: TrialConfig, need_bytes: int | None = None) -> TrialRecord:
        from tuner.measure.runner import new_record

        k = cfg.key()
        e = self.table.entries[k]
        left = [i for i in range(len(e.trials)) if i not in self.drawn.get(k, [])] or list(range(len(e.trials)))
        paired = (
            []
            if self.confirm_round is None
            else [
                i
                for i, t in enumerate(e.trials)
                if t.get("round", i) == self.round_of[self.confirm_round % len(self.round_of)]
            ]
        )
        i = paired[0] if paired else self.rng.choice(left)
        self.drawn.setdefault(k, []).append(i)
        t = e.trials[i]
        load = (t["load_ms"] or 0) / 1000
        reload = self._load(cfg, t["peak_rss_bytes"] or 0, need_bytes)
        if t["outcome"] != "ok":  # a failed worker is stopped: nothing stays loaded
            self.last_key = None
        self.loads += reload
        self.runs += 1
        self.clock.t += max(0.0, (t["wall_s"] or 0) - load) + (load if reload else 0.0)
        rec = new_record(cfg, self.hw, self.build, self.table.infos[cfg.model])
        rec.outcome, rec.cause = t["outcome"], t.get("cause", "")
        rec.tg_samples, rec.pp_samples, rec.ttft_samples_ms = list(t["tg"]), list(t["pp"]), list(t["ttft_ms"])
        rec.load_ms, rec.wall_s, rec.peak_rss_bytes = t["load_ms"], t["wall_s"], t["peak_rss_bytes"]
        rec.model_loaded = reload  # the study queues more configs of this load after a trial that loaded
        return rec


@dataclass
class Settings:
    """What a replayed search runs with (the knobs the tuning grid chooses)."""

    sampler: str = "tpe"
    n_trials: int = 8
    confirm: int = 3  # top K (0: no confirmation)
    max_rounds: int = 8


_STORAGE = None
_N = itertools.count()  # study names in the shared storage


def replay_ledger(folder: Path):
    """tuner's own ledger of a study folder (tuner.search.ledger.LocalLedger), but its Optuna studies share one SQLite
    storage (made once) and its records stay in the search's memory instead of a Parquet file rewritten per trial:
    I/O that costs the replay ~0.2 s a run and changes no decision."""
    from tuner.search.ledger import LocalLedger, open_storage

    class ReplayLedger(LocalLedger):
        def add(self, rec):
            pass  # the search keeps every record in `records`

        def mark_drift(self, since):
            pass  # the replay runs no drift anchor

    global _STORAGE
    if _STORAGE is None:
        _STORAGE = open_storage(f"sqlite:///{tempfile.mkdtemp(prefix='tuner-replay-db-')}/optuna.db")
    return ReplayLedger(folder, storage=_STORAGE)


def replay_seed(
    table: Table, seed: int, st: Settings, work: Path, on_search=None, prior=None, per_load: int | None = None
) -> dict:
    """One seed of the real search on the table: its recommendation, true objective and wall time (clock).
    `on_search(search, runner, clock)` is called when it is done (tests look inside); `prior`: the search's
    tuner.search.prior.Prior (None: none, as without a probe); `per_load`: the search's --per-load."""
    from tuner.search import confirm
    from tuner.search.loop import Search
    from tuner.search.options import SearchOptions

    clock = Clock()
    opts = SearchOptions(
        results=work / f"seed-{seed}",
        study=f"replay-{seed}-{next(_N)}",
        sampler=st.sampler,
        seed=seed,
        n_trials=st.n_trials,
        objective=OBJECTIVE,
        confirm=st.confirm,
        confirm_rounds=st.max_rounds,
        drift_every=0,
        reuse_workers=True,
        **({"per_load": per_load} if per_load else {}),
    )
    opts.study_dir.mkdir(parents=True)
    runner = ReplayRunner(table, clock, random.Random(seed))
    # the study reads the replay's clock (its budget, its typical trial)
    srch = Search(
        table.space,
        opts,
        table.infos,
        table.hw,
        runner.build,
        runner=runner,
        ledger=replay_ledger(opts.study_dir),
        clock=clock.monotonic,
    )
    runner.search = srch
    srch.prior = prior
    srch.bandwidth = {}  # the roofline needs the machine's bandwidth; the replay never measures it (no bound)
    srch.prepare()
    rec = srch.run()
    srch.close()
    if on_search:
        on_search(srch, runner, clock)
    confirm_runs = sum(1 for r in srch.records if r.state == confirm.CONFIRM_STATE)
    key = None
    if rec is not None:
        cfg = TrialConfig.from_dict({**rec["config"], "overrides": tuple(rec["config"].get("overrides", ()))})
        key = cfg.key()
    truth = table.truth(key) if key else None
    defaults = next((r for r in srch.records if r.baseline == "llama.cpp defaults"), None)
    return {
        "seed": seed,
        "trial_number": rec and rec["trial_number"],
        "true": truth,
        "share_of_best": (truth or 0.0) / table.best,
        "wall_s": clock.t,
        "confirm_runs": confirm_runs,
        "search_trials": sum(1 for r in srch.records if r.searched),
        "runs": runner.runs,
        "loads": runner.loads,
        "verdict": (rec or {}).get("confirmation", {}).get("verdict"),
        "defaults_true": table.truth(defaults.config.key()) if defaults else None,
    }


def resolution(table: Table, boots: int = 1000, seed: int = 0) -> dict:
    """What the table itself can tell apart: its rounds resampled (with replacement, per config), how often the
    table's best config is still within 2 % of the resampled table's best, and how many configs are within 2 %.
    When the rounds scatter more than the gaps between the top configs, "within 2 % of the best" is decided by the
    noise of the table, and no search, however long, reaches it reliably (the exhaustive control shows it)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    keys = [k for k, e in table.entries.items() if e.truth is not None]
    vals = [np.array(table.entries[k].values) for k in keys]
    top = max(range(len(keys)), key=lambda i: table.entries[keys[i]].truth)
    meds = np.array([[np.median(rng.choice(v, len(v))) for v in vals] for _ in range(boots)])
    held = float(np.mean(meds[:, top] >= 0.98 * meds.max(axis=1)))
    sd = [float(np.std(np.log(v / np.median(v)))) for v in vals]
    return {
        "best_within_2pct_on_resampling": held,
        "configs_within_2pct": sum(table.entries[k].truth >= 0.98 * table.best for k in keys),
        "trial_log_sd_median": statistics.median(sd),
        "rounds": table.doc.get("rounds"),
    }


def load_share(table: Table) -> float:
    """The median share of a trial's recorded wall time that its model load took (every trial of the table)."""
    return statistics.median(
        (t["load_ms"] or 0) / 1000 / t["wall_s"]
        for e in table.entries.values()
        for t in e.trials
        if t["outcome"] == "ok" and t["wall_s"]
    )


def replay(table: Table, st: Settings, seeds: int, log=lambda s: None) -> dict:
    """`seeds` seeds of one setting: the rate within 2 % of the grid's best and the median wall time."""
    grid_s = table.grid_once_s()
    with tempfile.TemporaryDirectory(prefix="tuner-replay-") as work:
        runs = [replay_seed(table, seed, st, Path(work)) for seed in range(seeds)]
    walls = [r["wall_s"] / grid_s for r in runs]
    within = sum(r["share_of_best"] >= 0.98 for r in runs)
    out = {
        "settings": dataclasses.asdict(st),
        "seeds": seeds,
        "within_2pct": within,
        "within_2pct_rate": within / seeds,
        "within_2pct_ci95": clopper_pearson(within, seeds),
        "median_share_of_best": statistics.median(r["share_of_best"] for r in runs),
        "wall_vs_grid_median": statistics.median(walls),
        "wall_vs_grid_max": max(walls),
        "median_confirm_runs": statistics.median(r["confirm_runs"] for r in runs),
        "runs": runs,
    }
    log(f"  {st}: within 2 % in {within}/{seeds}, median wall {100 * out['wall_vs_grid_median']:.0f} % of the grid")
    return out


def live(table: Table, st: Settings, seeds: int, log=print, predict=None) -> dict:
    """The same search run for real (`tuner.search.run.run_search`, real workers) for `seeds` seeds: its regret
    (truth from the table) and wall time against what the replay predicts for the same settings (`predict()`:
    another replay of them, e.g. with the prior, replay_prior.py; its within_2pct_rate, wall_vs_grid_median and
    median_share_of_best)."""
    from search_regret import study_wall  # first trial started to last run finished: not the wait for the lock

    from tuner.search.run import run_search

    recipe = table.doc["recipe"]
    params = {k: v for k, v in recipe["specs"].items()}
    runs = []
    with tempfile.TemporaryDirectory(prefix="tuner-live-") as work:
        for seed in range(seeds):
            res = run_search(
                list(table.infos),
                study=f"live-{seed}",
                results=work,
                sampler=st.sampler,
                seed=seed,
                n_trials=st.n_trials,
                confirm=st.confirm,
                confirm_rounds=st.max_rounds,
                objective=OBJECTIVE,
                drift_every=0,
                quality=False,
                auto_space=False,
                **recipe["shape"],
                **params,
            )
            wall = study_wall(res.study_dir)
            rec = res.recommendation
            cfg = TrialConfig.from_dict({**rec["config"], "overrides": tuple(rec["config"].get("overrides", ()))})
            truth = table.truth(cfg.key())
            runs.append(
                {
                    "seed": seed,
                    "wall_s": wall,
                    "true": truth,
                    "share_of_best": (truth or 0) / table.best,
                    "verdict": rec["confirmation"].get("verdict"),
                    "confirm_runs": rec["trials"]["confirmation_runs"],
                }
            )
            log(f"  live seed {seed}: {wall:.0f} s, {100 * runs[-1]['share_of_best']:.1f} % of the best")
    grid_s = table.grid_once_s()
    within = sum(r["share_of_best"] >= 0.98 for r in runs)
    predicted = predict() if predict else replay(table, st, max(seeds, 30))
    return {
        "settings": dataclasses.asdict(st),
        "seeds": seeds,
        "within_2pct": within,
        "within_2pct_rate": within / seeds,
        "within_2pct_ci95": clopper_pearson(within, seeds),
        "wall_vs_grid_median": statistics.median(r["wall_s"] for r in runs) / grid_s,
        "replay_within_2pct_rate": predicted["within_2pct_rate"],
        "replay_wall_vs_grid_median": predicted["wall_vs_grid_median"],
        "median_share_of_best": statistics.median(r["share_of_best"] for r in runs),
        "replay_median_share_of_best": predicted["median_share_of_best"],
        "runs": runs,
    }


def choose(results: list[dict], wall_target: float) -> dict:
    """The tuning grid's pick: the highest within-2 % rate among settings within the wall target; when none is
    within it, the highest rate, then the lowest wall."""
    fit = [r for r in results if r["wall_vs_grid_median"] <= wall_target]
    return max(fit or results, key=lambda r: (r["within_2pct_rate"], -r["wall_vs_grid_median"]))


def tune_settings(tune: Table, tune_seeds: int, settings: list[Settings], wall_target: float, log=print) -> dict:
    """Every candidate setting replayed on the tuning table, and the pick (`choose`)."""
    log(f"tuning on {tune.doc['grid']} ({len(tune.entries)} configs, {tune_seeds} seeds a setting):")
    tuned = [replay(tune, st, tune_seeds, log) for st in settings]
    for t in tuned:
        t.pop("runs")  # the per-seed detail of 20+ settings is noise in the saved file
    return {
        "grid": tune.doc["grid"],
        "table": tune.path,
        "tune_seeds": tune_seeds,
        "wall_target": wall_target,
        "results": tuned,
        "chosen": choose(tuned, wall_target)["settings"],
    }


def evaluate(
    tune: Table, held: Table, seeds: int, tuning: dict, held_out_only: bool = False, log=print, ceiling_seeds: int = 20
) -> dict:
    """Report the settings chosen on the tuning table, and the controls, on both tables (the held-out one counts;
    `held_out_only`: that one alone)."""
    st = Settings(**tuning["chosen"])
    log(f"chosen: {st}; held-out {held.doc['grid']} ({len(held.entries)} configs, {seeds} seeds):")
    out = {}
    for name, table in (("tuning", tune), ("held_out", held))[1 if held_out_only else 0 :]:
        n = max(1, round(st.n_trials * len(table.entries) / len(tune.entries)))  # the same share of the grid
        search = replay(table, dataclasses.replace(st, n_trials=n), seeds, log)
        controls = {
            "random": replay(table, dataclasses.replace(st, sampler="random", n_trials=n), seeds, log),
            "no_confirmation": replay(table, dataclasses.replace(st, confirm=0, n_trials=n), seeds, log),
        }
        # the ceiling: every config measured once, then the same race (grid sampler, no baselines); slow, so
        # fewer seeds
        controls["exhaustive"] = replay(
            table, dataclasses.replace(st, sampler="grid", n_trials=len(table.entries)), ceiling_seeds, log
        )
        d = next(r["defaults_true"] for r in search["runs"] if r["defaults_true"] is not None)
        controls["defaults"] = {"share_of_best": d / table.best, "within_2pct": d / table.best >= 0.98}
        out[name] = {
            "grid": table.doc["grid"],
            "table": table.path,
            "models_made_alike": table.alike,
            "configs": len(table.entries),
            "grid_once_s": table.grid_once_s(),
            "held_out": name == "held_out",
            "seeds": seeds,
            "n_trials": n,
            "within_2pct_rate": search["within_2pct_rate"],
            "within_2pct_ci95": search["within_2pct_ci95"],
            "wall_vs_grid_median": search["wall_vs_grid_median"],
            "defaults_vs_best": d / table.best,
            "load_share_median": load_share(table),
            "resolution": resolution(table),
            "search": search,
            "controls": controls,
        }
    return {"tuning": tuning, "chosen": dataclasses.asdict(st), "grids": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__[__doc__.index("Examples:") :],
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="measure a grid's table")
    m.add_argument("--grid", choices=sorted(GRIDS), required=True)
    m.add_argument("--rounds", type=int, default=9)
    m.add_argument("--out", default=None)
    r = sub.add_parser("run", help="choose settings on TUNE, report them and the controls on HELD_OUT")
    r.add_argument("tune", help="the tuning grid's table (replay-grid-*.json)")
    r.add_argument("held_out", help="the held-out grid's table")
    r.add_argument("--seeds", type=int, default=100)
    r.add_argument("--tune-seeds", type=int, default=30)
    r.add_argument(
        "--ceiling-seeds",
        type=int,
        default=20,
        help="seeds of the exhaustive control (every config once, then the race) [20]",
    )
    r.add_argument("--k", default="1,2,3", help="top K candidates to try on the tuning grid")
    r.add_argument("--max-rounds", default=None, help="round limits to try (default: the race's minimum, +1, 8)")
    r.add_argument("--n-trials", default=None, help="search trials to try (default: 20,30,40 %% of the grid)")
    r.add_argument("--wall-target", type=float, default=0.35, help="median wall / the grid's, for choosing")
    r.add_argument("--tuned", default=None, help="a replay-tune-*.json: its chosen settings, no tuning again")
    r.add_argument("--tune-only", action="store_true", help="choose the settings on TUNE, save them, stop")
    r.add_argument("--held-out-only", action="store_true", help="report on HELD_OUT alone (not on TUNE again)")
    r.add_argument("--out", default=None)
    lv = sub.add_parser("live", help="the same search run for real on a grid, against the replay's prediction")
    lv.add_argument("table")
    lv.add_argument("--seeds", type=int, default=10)
    lv.add_argument("--n-trials", type=int, required=True)
    lv.add_argument("--k", type=int, default=3)
    lv.add_argument("--max-rounds", type=int, default=8)
    lv.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.cmd == "live":
        try:
            table = load_table(a.table)
        except ReplayError as e:
            print(f"replay.py: error: {e}", file=sys.stderr)
            return 2
        out = live(table, Settings("tpe", a.n_trials, a.k, a.max_rounds), a.seeds)
        out.update(
            grid=table.doc["grid"], table=a.table, grid_once_s=table.grid_once_s(), models_made_alike=table.alike
        )
        path = save("replay-live", out, a.out or Path(__file__).resolve().parent / "results", echo=False)
        print(
            f"live: within 2 % in {out['within_2pct']}/{a.seeds}, median wall "
            f"{100 * out['wall_vs_grid_median']:.0f} % of the grid; the replay predicted "
            f"{100 * out['replay_within_2pct_rate']:.0f} % and {100 * out['replay_wall_vs_grid_median']:.0f} %; {path}"
        )
        return 0
    if a.cmd == "measure":
        if a.rounds < 1:
            ap.error("--rounds must be at least 1")
        measure(a.grid, a.rounds, a.out)
        return 0
    from tuner.search.confirm import MIN_ROUNDS

    try:
        tune, held = load_table(a.tune), load_table(a.held_out)
        ks = [int(x) for x in a.k.split(",")]
        rounds = [int(x) for x in a.max_rounds.split(",")] if a.max_rounds else [MIN_ROUNDS, MIN_ROUNDS + 1, 8]
        if min(rounds) < MIN_ROUNDS:
            raise ReplayError(f"--max-rounds {min(rounds)} is below the confirmation race's minimum of {MIN_ROUNDS}")
        n = len(tune.entries)
        trials = (
            [int(x) for x in a.n_trials.split(",")]
            if a.n_trials
            else sorted({max(3, round(n * f)) for f in (0.2, 0.3, 0.4)})
        )
    except (ReplayError, ValueError) as e:
        print(f"replay.py: error: {e}", file=sys.stderr)
        return 2
    settings = [Settings("tpe", t, k, mr) for t in trials for k in ks for mr in rounds]
    t0 = time.monotonic()
    out_dir = a.out or Path(__file__).resolve().parent / "results"
    if a.tuned:
        tuning = json.loads(Path(a.tuned).read_text())
    else:
        tuning = tune_settings(tune, a.tune_seeds, settings, a.wall_target)
        tuning["wall_s"] = round(time.monotonic() - t0, 1)
        path = save("replay-tune", tuning, out_dir, echo=False)
        print(f"chosen on {tuning['grid']}: {tuning['chosen']}; {path}")
        if a.tune_only:
            return 0
    result = evaluate(tune, held, a.seeds, tuning, a.held_out_only, ceiling_seeds=a.ceiling_seeds)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    h = result["grids"]["held_out"]
    result["target"] = {
        "within_2pct_seeds": 95,
        "wall_vs_grid": a.wall_target,
        "met": h["within_2pct_rate"] >= 0.95 and h["wall_vs_grid_median"] <= a.wall_target,
    }
    path = save("replay", result, out_dir, echo=False)
    for name, g in result["grids"].items():
        c = g["controls"]
        print(
            f"{name} {g['grid']}: within 2 % in {100 * g['within_2pct_rate']:.0f} % of {g['seeds']} seeds "
            f"(95 % CI {100 * g['within_2pct_ci95'][0]:.0f}-{100 * g['within_2pct_ci95'][1]:.0f} %), median wall "
            f"{100 * g['wall_vs_grid_median']:.0f} % of the grid; random {100 * c['random']['within_2pct_rate']:.0f} %"
            f" ({100 * c['random']['wall_vs_grid_median']:.0f} %), no confirmation "
            f"{100 * c['no_confirmation']['within_2pct_rate']:.0f} % "
            f"({100 * c['no_confirmation']['wall_vs_grid_median']:.0f} %), every config once "
            f"{100 * c['exhaustive']['within_2pct_rate']:.0f} % ({100 * c['exhaustive']['wall_vs_grid_median']:.0f}"
            f" %), defaults at {100 * g['defaults_vs_best']:.0f} % of the best, loads "
            f"{100 * g['load_share_median']:.0f} % of a trial; the table's best stays within 2 % "
            f"in {100 * g['resolution']['best_within_2pct_on_resampling']:.0f} % of its resamplings"
        )
    print(
        f"target (held-out: >= 95 % within 2 %, wall <= {100 * a.wall_target:.0f} %): "
        f"{'met' if result['target']['met'] else 'NOT met'}; {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

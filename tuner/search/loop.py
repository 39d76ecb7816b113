"""`tuner search` as a library: an Optuna study whose every trial is a crash-isolated measurement.

Failures teach the sampler: a trial that ran out of memory, crashed or timed out is told to Optuna as a
COMPLETE trial with a worst-case value and a violated constraint (`trial.set_constraint`); TPE and GP model
infeasible trials, while a FAIL state would be invisible to them. A config that a known OOM dominates is
not run again. The Parquet file is written before Optuna is told, and a resume reconciles the two.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import random
import re
import signal
import sqlite3
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import optuna
from sqlalchemy import event

from tuner import stats
from tuner.errors import TunerError
from tuner.measure import store
from tuner.measure.runner import Runner, TrialInterrupted, new_record, resolve
from tuner.model.meta import ModelInfo
from tuner.plan import planner, roofline
from tuner.record import FAILED, KV_TYPE_BYTES, TrialConfig, TrialRecord, invalid_reason, utcnow
from tuner.search import confirm as confirmlib
from tuner.search import feasible as fit
from tuner.search import ladder as ladderlib
from tuner.search import recommend as recommendlib
from tuner.search.feasible import caps
from tuner.search.recommend import fits
from tuner.search.space import Space
from tuner.units import hms

OBJECTIVES = ("tg", "pp", "ttft", "mixed")
SAMPLERS = ("tpe", "random", "grid", "gp")
HEURISTIC_MB_PER_LAYER = 3500  # the seed script's guess
HEURISTIC_RESERVE_MB = 2048
DEFAULT_PER_LOAD = 4
LOAD_DIMS = frozenset(TrialConfig.LOAD_KEYS)  # dimensions whose change reloads the model
DEFAULT_HEADROOM = 1 << 30  # left free for the OS and the display (WDDM reserves VRAM on Windows)
WORST = {"tg": 0.0, "pp": 0.0, "mixed": 0.0, "ttft": 1e9, "mem": 1e15}


class StudyError(TunerError):
    """A search that cannot start (bad storage URL, study mismatch); one-line message."""


def redact(url: str) -> str:
    """Storage URLs may carry passwords: never print, log or store them."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


@dataclass
class Limits:
    min_ctx: int = 0
    max_vram: int | None = None
    max_ram: int | None = None
    headroom: int = DEFAULT_HEADROOM


@dataclass
class SearchOptions:
    study_dir: Path
    study_name: str
    storage: str | None = None
    sampler: str = "tpe"
    seed: int = 0
    n_trials: int | None = None
    timeout_s: float | None = None
    objective: str = "mixed"
    pareto: bool = False
    limits: Limits = field(default_factory=Limits)
    confirm: int = confirmlib.DEFAULT_K  # top configs re-measured against the baseline before recommending (0: none)
    confirm_rounds: tuple[int, int] = (confirmlib.MIN_ROUNDS, confirmlib.MAX_ROUNDS)
    trial_timeout: float = 600.0
    mem_limit: int | None = None
    reuse_workers: bool = True
    drift_every: int = 10
    drift_tolerance: float = 0.05
    baselines: bool = True
    resume: bool = False
    plan: bool = True  # skip configs the memory planner predicts cannot fit
    # fleet (tuner.search.fleet): several hosts on one shared --storage
    allow_mixed: bool = False  # hosts of another hw/build fingerprint join as a separate group
    heartbeat_s: int = 10  # a host silent for GRACE_FACTOR x this long is dead; its trial is run again
    per_load: int = DEFAULT_PER_LOAD  # configs measured in a row per model load (Search.after_load)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.study_dir / 'study.db').resolve()}"


def peak_memory(rec: TrialRecord) -> float:
    return float((rec.peak_rss_bytes or 0) + (rec.peak_vram_bytes or 0))


VRAM_OOM = re.compile(r"cuda|vram|device memory|hip|vulkan|metal|sycl|gpu", re.IGNORECASE)


def dominated_by(cfg: TrialConfig, failed: list[tuple[int, TrialConfig, str]]) -> tuple[int, str] | None:
    """A known OOM whose config needs no more memory than this one: this one would fail too.

    Same model, mmap, placement options; as large a context and batches; KV types at least as wide. Which way
    GPU layers and experts count depends on what ran out: after a GPU OOM, more layers on the GPU and fewer
    experts in host RAM need more; after a host OOM, fewer layers on the GPU and more experts in host RAM do.
    """
    for number, f, cause in failed:
        on_gpu = bool(VRAM_OOM.search(cause))
        more_gpu = cfg.n_gpu_layers >= f.n_gpu_layers and cfg.n_cpu_moe <= f.n_cpu_moe
        more_host = cfg.n_gpu_layers <= f.n_gpu_layers and cfg.n_cpu_moe >= f.n_cpu_moe
        if (cfg.model == f.model and cfg.use_mmap == f.use_mmap and cfg.overrides == f.overrides
                and cfg.cpu_moe == f.cpu_moe and cfg.split_mode == f.split_mode and cfg.main_gpu == f.main_gpu
                and cfg.tensor_split == f.tensor_split
                and (more_gpu if on_gpu else more_host)
                and cfg.effective_ctx() >= f.effective_ctx()
                and cfg.n_batch >= f.n_batch and cfg.n_ubatch >= f.n_ubatch
                and KV_TYPE_BYTES[cfg.type_k] >= KV_TYPE_BYTES[f.type_k]
                and KV_TYPE_BYTES[cfg.type_v] >= KV_TYPE_BYTES[f.type_v]
                and (cfg.flash_attn == f.flash_attn or f.flash_attn == "on")):
            return number, cause
    return None


def make_sampler(name: str, seed: int, space: Space, multi: bool,
                 constant_liar: bool = False) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # multivariate: n_gpu_layers × n_ctx interact (the OOM wall is diagonal). Random start-up trials:
        # Optuna's 10 for big spaces, fewer for small grids, where the baselines already inform the model
        # (benchmarks/search_efficiency.py: 5 reached 97 % of a 64-config grid's best in 17 of 20 seeds
        # within 16 trials, 10 in 5 of 20).
        # constant_liar: with several hosts asking at once, running trials count as bad, so hosts spread out
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=constant_liar,
                                          n_startup_trials=min(10, max(5, space.size() // 16)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid() or {"_": [0]}, seed=seed)
    if name == "gp":
        if multi:
            raise StudyError("--sampler gp supports one objective; use tpe with --pareto")

        if importlib.util.find_spec("torch") is None:
            raise StudyError("--sampler gp needs PyTorch, which is not installed (pip install torch), "
                             "or use --sampler tpe")
        return optuna.samplers.GPSampler(seed=seed)
    raise StudyError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")


def _sqlite_wal(dbapi_conn, _record) -> None:
    """SQLite in WAL mode with synchronous=NORMAL: a commit survives a crash of the process (SIGKILL), only a
    power cut may lose the last ones; every Optuna commit no longer waits for an fsync."""
    if isinstance(dbapi_conn, sqlite3.Connection):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()


def open_storage(url: str, **kwargs) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage, or a one-line StudyError (password redacted) for a bad URL or an unreachable server."""
    try:
        storage = optuna.storages.RDBStorage(url, **kwargs) if "://" in url else None
    except Exception as e:  # noqa: BLE001 - SQLAlchemy raises many types for bad URLs / unreachable servers
        msg = redact(str(e).splitlines()[0])[:160]
        raise StudyError(f"cannot open storage {redact(url)}: {msg}") from None
    if storage is None:
        raise StudyError(f"bad storage URL {redact(url)!r} (expected e.g. sqlite:///path/study.db)")
    return storage


def open_study(opts: SearchOptions, space: Space, storage: optuna.storages.RDBStorage | None = None,
               sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    multi = opts.pareto
    directions = (["maximize", "minimize"] if multi else
                  ["minimize" if opts.objective == "ttft" else "maximize"])
    storage = storage or open_storage(opts.storage_url)
    if storage.engine.dialect.name == "sqlite":
        event.listen(storage.engine, "connect", _sqlite_wal)
        storage.engine.dispose()  # connections made before the listener reconnect with it
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    exists = opts.study_name in names
    if opts.resume and not exists:
        raise StudyError(f"--resume: no study named {opts.study_name!r} in {redact(opts.storage_url)}")
    study = optuna.create_study(study_name=opts.study_name, storage=storage, directions=directions,
                                sampler=sampler or make_sampler(opts.sampler, opts.seed, space, multi),
                                load_if_exists=True)
    if exists:
        old = study.user_attrs.get("space")
        if old is not None and old != space.describe():
            raise StudyError(f"study {opts.study_name!r} exists with another search space; re-run the same "
                             f"command to resume it, or pick a new --study name")
        if study.user_attrs.get("objective") not in (None, _objective_label(opts)):
            raise StudyError(f"study {opts.study_name!r} exists with objective {study.user_attrs['objective']!r}")
    else:
        study.set_user_attr("space", space.describe())
        study.set_user_attr("objective", _objective_label(opts))
        study.set_user_attr("created_utc", utcnow())
    return study


def _objective_label(opts: SearchOptions) -> str:
    return "pareto:tg,mem" if opts.pareto else opts.objective


class Search:
    """Runs one study: ask Optuna, measure, record, tell. `on_trial` is called after every trial."""

    def __init__(self, space: Space, opts: SearchOptions, infos: dict[str, ModelInfo], hw, build,
                 on_trial: Callable[["Search", TrialRecord], None] | None = None,
                 runner: Runner | None = None, on_confirm: Callable | None = None):
        self.space, self.opts, self.infos, self.hw, self.build = space, opts, infos, hw, build
        self.on_trial = on_trial
        self.on_confirm = on_confirm  # (search, candidate, record, round) after every confirmation run
        self.dir = opts.study_dir
        self.parquet = self.dir / store.TRIALS_FILE
        self.logs = self.dir / "logs"
        self.runner = runner
        self.rig = fit.rig_from_hardware(hw, opts.limits, bool(build.get("gpu_offload")))
        self.calib = None  # the planner's calibration, refitted from this study's completed trials
        self.bandwidth = None
        self.stop_requested = False
        self.started = time.monotonic()
        self.records: list[TrialRecord] = []
        self.failed: list[tuple[int, TrialConfig, str]] = []
        self.anchor_tg: float | None = None
        self.anchor_samples: list[float] = []
        self.drifting = False
        self.study: optuna.Study | None = None
        self.seen: dict[tuple, int] = {}  # config key → the trial that measured it first
        self.unmeasured: dict[tuple, dict] | None = None  # key → sampler params, for spaces small enough to list
        self.finished = ""  # why the search ended before its budget (the space is exhausted, ...)
        self.confirmation: dict | None = None
        self.confirming: list[confirmlib.Candidate] | None = None  # the race's candidates while it runs
        self.laddering: list[confirmlib.Candidate] | None = None  # the ladder's runs while it runs
        self.quality = None  # tuner.quality.StudyQuality: the budget the recommendation keeps to
        self.n_run = 0
        self._dupes = 0
        self._baselines: list[tuple[dict, str, bool]] = []  # enqueued one at a time, each after the last one's block
        self._unmeasured_load: dict[tuple, tuple] = {}  # unmeasured config → its load key
        self._anchor_due = False
        self._block_left = 0  # queued configs of the loaded model not yet run (after_load)
        self._vram_warned = False

    # -- set-up and resume ---------------------------------------------------------------------------
    def prepare(self) -> optuna.Study:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if self.opts.storage:  # a storage of the user's: check it before anything is written
            self.study = self._open_study()
        store.check_writable(self.parquet)
        if not self.opts.storage:
            self.study = self._open_study()
        self.records = self._load_records()
        self._reconcile()
        for r in self.records:
            if r.outcome == "oom" and r.trial_number is not None and r.searched:
                self.failed.append((r.trial_number, r.config, r.cause))
            if r.state == "anchor" and r.ok and self.anchor_tg is None:
                self.anchor_tg, self.anchor_samples = r.metric("tg")[0], list(r.tg_samples)
        for r in self.records:
            if r.measured_config and r.trial_number is not None:
                self.seen.setdefault(confirmlib.config_key(r.config), r.trial_number)
        self._list_space()
        self.settle_rung()  # a resumed ladder search goes on at the rung it had stepped down to
        if self.opts.baselines and self.opts.sampler != "grid" and not self.study.trials:
            self._enqueue_baselines()
        return self.study

    def _open_study(self) -> optuna.Study:
        return open_study(self.opts, self.space)

    def _load_records(self) -> list[TrialRecord]:
        return store.records(self.parquet) if self.parquet.exists() else []

    SPACE_LIST_LIMIT = 20000  # configs; above it the space is never "finished" by enumeration

    def _list_space(self) -> None:
        """Small spaces are listed: a search that measured every config is finished, not re-sampled."""
        varying = self.space.varying()
        size = self.space.size()
        if size > self.SPACE_LIST_LIMIT:
            return
        names = list(varying)
        self.unmeasured = {}
        for model in self.space.models:
            for combo in itertools.product(*(varying[n].values for n in names)):
                params = dict(zip(names, combo))
                if len(self.space.models) > 1:
                    params["model"] = model
                cfg = self._config_from_params(params)
                key = confirmlib.config_key(cfg)
                if key not in self.seen:
                    self.unmeasured.setdefault(key, params)
                    self._unmeasured_load[key] = cfg.load_key()

    def exhausted(self) -> bool:
        return self.unmeasured is not None and not self.unmeasured

    def _reconcile(self) -> None:
        """After a crash of the parent: every Optuna trial left RUNNING gets its Parquet row, and is told."""
        by_number = {r.trial_number: r for r in self.records if r.trial_number is not None and r.searched}
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            rec = by_number.get(t.number)
            if rec is None:
                cfg = self._config_from_params(t.params)
                rec = self._blank(cfg, t.number, "interrupted",
                                  "the search stopped during this trial (parent killed); recorded on resume")
                rec.baseline = t.user_attrs.get("baseline", "")
                store.append(self.parquet, [rec])
                self.records.append(rec)
                self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            else:
                self._tell(t.number, rec)

    def _enqueue_baselines(self, again: bool = False) -> None:
        dims = self.space.dims
        n_layer = max(i.n_layer for i in self.infos.values())
        all_layers = n_layer + 1
        phys = self.hw.cores_physical

        def nearest(name, want):
            vals = dims[name].values if name in dims else [want]
            return min(vals, key=lambda v: (abs(v - want), v)) if isinstance(want, (int, float)) and not \
                isinstance(want, bool) else (want if want in vals else vals[0])

        defaults = {"n_gpu_layers": all_layers, "n_ctx": max(4096, self.opts.limits.min_ctx), "n_threads": phys,
                    "n_threads_batch": phys, "n_batch": 2048, "n_ubatch": 512, "flash_attn": "auto",
                    "type_k": "f16", "type_v": "f16", "use_mmap": True, "n_cpu_moe": 0}
        vram = sum(g.vram_total for g in self.hw.gpus)
        heuristic_ngl = max(0, min(all_layers, int((vram / 2**20 - HEURISTIC_RESERVE_MB) // HEURISTIC_MB_PER_LAYER)))
        seen = []
        for label, overrides in (("llama.cpp defaults", {}), ("heuristic", {"n_gpu_layers": heuristic_ngl})):
            params = {}
            for name, d in self.space.varying().items():
                params[name] = nearest(name, overrides.get(name, defaults.get(name, d.values[0])))
            if len(self.space.models) > 1:
                params["model"] = self.space.models[0]
            if params in seen:
                continue
            seen.append(params)
            self._baselines.append((params, label, again))
        self._next_baseline()

    def _next_baseline(self) -> None:
        """Baselines are queued one at a time, so a baseline's block (after_load) runs before the next one's load."""
        if self._baselines and not self.study.get_trials(deepcopy=False,
                                                         states=(optuna.trial.TrialState.WAITING,)):
            params, label, again = self._baselines.pop(0)
            # again (another rung): the same params ran at the rung above, so Optuna must not skip them
            self.study.enqueue_trial(params, user_attrs={"baseline": label}, skip_if_exists=not again)

    # -- trials ----------------------------------------------------------------------------------------
    def _suggest(self, trial: optuna.Trial) -> TrialConfig:
        params = {}
        for name, d in self.space.varying().items():
            if d.is_range:
                params[name] = trial.suggest_int(name, d.values[0], d.values[-1], step=d.step)
            else:
                params[name] = trial.suggest_categorical(name, d.values)
        model = trial.suggest_categorical("model", self.space.models) if len(self.space.models) > 1 \
            else self.space.models[0]
        return resolve(self.space.config(model, params), self.infos[model])

    def _config_from_params(self, params: dict) -> TrialConfig:
        params = dict(params)
        model = params.pop("model", self.space.models[0])
        return resolve(self.space.config(model, {k: v for k, v in params.items() if k in self.space.dims}),
                       self.infos[model])

    def _blank(self, cfg: TrialConfig, number: int, outcome: str, cause: str) -> TrialRecord:
        """A trial that never ran (skipped, interrupted): the same facts as a measured one."""
        rec = new_record(cfg, self.hw, self.build, self.infos.get(cfg.model))
        rec.outcome, rec.cause, rec.finished_utc = outcome, cause, utcnow()
        rec.study, rec.trial_number = self.opts.study_name, number
        return rec

    def _constraints(self, rec: TrialRecord) -> dict[str, float]:
        """Positive = violated (Optuna's convention). Failures and the user's memory limits; VRAM per GPU (the
        GPU furthest over its own budget), all GPUs together against --max-vram."""
        c = {"failed": 1.0 if rec.outcome in FAILED or rec.outcome == "skipped" else 0.0}
        ram_cap, vram_cap = caps(self.hw, self.opts.limits)
        c["ram"] = (rec.peak_rss_bytes - ram_cap) / ram_cap if rec.ok and rec.peak_rss_bytes else c["failed"]
        if vram_cap and rec.ok and rec.peak_vram_bytes is not None:
            over = [(p - cap) / cap for p, cap in zip(rec.peak_vram_by_gpu or [], self.rig.vram_caps) if cap > 0]
            c["vram"] = max(over + [(rec.peak_vram_bytes - vram_cap) / vram_cap])
        else:
            c["vram"] = c["failed"]
        return c

    def _tell(self, number: int, rec: TrialRecord, cons: dict[str, float] | None = None) -> None:
        """Tell Optuna: failures as COMPLETE with the worst value and a violated constraint, so TPE learns."""
        cons = cons or self._constraints(rec)
        rec.constraint = list(cons.values())
        trial_id = self.study._storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)
        trial = optuna.Trial(self.study, trial_id)
        for k, v in cons.items():
            trial.set_constraint(k, v)
        trial.set_user_attr("outcome", rec.outcome)
        if rec.cause:
            trial.set_user_attr("cause", rec.cause[:500])
        if rec.skipped_by is not None:
            trial.set_user_attr("skipped_by", rec.skipped_by)
        if rec.outcome == "interrupted":
            self.study.tell(number, state=optuna.trial.TrialState.FAIL)
            return
        if self.opts.pareto:
            values = [rec.objective("tg") or WORST["tg"], peak_memory(rec) if rec.ok else WORST["mem"]]
        else:
            # the trial's value as tuner.stats ranks it (the median of its repetitions), so that the sampler's
            # best and the confirmation's candidates are ranked by the same statistic
            v = stats.trial_value(confirmlib.objective_samples(rec, self.opts.objective)) if rec.ok else None
            values = [v if v is not None and math.isfinite(v) else WORST[self.opts.objective]]
        try:
            self.study.tell(number, values)
        except RuntimeError as e:
            # GridSampler calls study.stop() on its last grid point, which only works inside optimize();
            # the trial is stored before that (optuna's _tell: finally), and budget_left() sees the grid done.
            if "Study.stop" not in str(e):
                raise

    def _duplicate(self, trial: optuna.Trial, first: int, key: tuple) -> None:
        """A config measured before: tell the sampler its pooled figure instead of measuring it again, and
        steer the next ask to a config not measured yet (TPE repeats itself on small discrete spaces)."""
        same = [r for r in self.records if r.searched and confirmlib.config_key(r.config) == key]
        prev = next((r for r in same if r.trial_number == first), same[0])
        if prev.ok:
            oks = [r for r in same if r.ok]
            prev = dataclasses.replace(prev, tg_samples=[x for r in oks for x in r.tg_samples],
                                       pp_samples=[x for r in oks for x in r.pp_samples],
                                       ttft_samples_ms=[x for r in oks for x in r.ttft_samples_ms])
        trial.set_user_attr("duplicate_of", first)
        self._tell(trial.number, prev)
        self._dupes += 1
        self._steer(trial)

    def _steer(self, trial: optuna.Trial) -> None:
        """Queue a config not measured yet: one that the loaded model can run without a reload, if any."""
        if self.unmeasured:
            rng = random.Random(self.opts.seed * 100003 + trial.number)
            loaded = self.runner.loaded_key if self.runner is not None else None
            same = [k for k in self.unmeasured if loaded is not None and self._unmeasured_load.get(k) == loaded]
            params = self.unmeasured[rng.choice(sorted(same or self.unmeasured, key=repr))]
            self.study.enqueue_trial(params, user_attrs={"enqueued": "not measured yet"})

    def after_load(self, trial: optuna.Trial, rec: TrialRecord) -> None:
        """This trial loaded the model: queue up to per_load - 1 more configs with the same load parameters (model
        file, GPU layers, experts in RAM, split, mmap), their other dimensions left to the sampler, so that a
        reload (minutes for a model of hundreds of GB) is paid once for several measurements, as llama-bench
        sweeps every test of one load before the next."""
        if (self.opts.per_load <= 1 or not rec.model_loaded or not rec.ok or self.opts.sampler == "grid"
                or self.runner is None or not self.runner.reuse):
            return  # fresh workers (--fresh-workers, --mem-limit) load for every trial: nothing to amortize
        varying = self.space.varying()
        if not [k for k in varying if k not in LOAD_DIMS]:
            return  # nothing to vary within one load
        fixed = {k: v for k, v in trial.params.items() if k in LOAD_DIMS or k == "model"}
        n = self.opts.per_load - 1
        if self.opts.n_trials is not None:  # a block never outlives the budget (it would wait in the queue)
            n = min(n, self.opts.n_trials - self.done_trials())
        if self.unmeasured is not None:
            key = rec.config.load_key()
            n = min(n, sum(1 for k in self.unmeasured if self._unmeasured_load.get(k) == key))
        for _ in range(n):
            self.study.enqueue_trial(fixed, user_attrs={"enqueued": "same load"})
        self._block_left = max(n, 0)

    def run_one(self, trial: optuna.Trial) -> TrialRecord | None:
        cfg = self._suggest(trial)
        number = trial.number
        baseline = trial.user_attrs.get("baseline", "")
        key = confirmlib.config_key(cfg)
        first = self._claim(key, number)
        if first is not None:
            self._duplicate(trial, first, key)
            return None
        self._dupes = 0
        if self.unmeasured is not None:
            self.unmeasured.pop(key, None)
            self._unmeasured_load.pop(key, None)
        skip = invalid_reason(cfg)
        dom = None if skip else dominated_by(cfg, self.failed)
        pred, plan_skip = self._plan(cfg)
        if skip or dom:
            plan_skip = None
        if skip or dom or plan_skip:
            rec = self._blank(cfg, number, "skipped", skip or plan_skip or
                              f"dominated by trial #{dom[0]} (oom: {dom[1][:120]})")
            rec.skipped_by = dom[0] if dom else None
        else:
            try:
                rec = self.runner.run(cfg)
            except TrialInterrupted as e:
                rec = e.record
                rec.study, rec.trial_number, rec.state, rec.baseline = self.opts.study_name, number, "FAIL", baseline
                self._write(rec)
                self.study.tell(number, state=optuna.trial.TrialState.FAIL)
                self.seen.pop(key, None)  # measured nothing: a resume runs this config again
                raise
            rec.study, rec.trial_number = self.opts.study_name, number
            if rec.outcome == "oom":
                self.failed.append((number, cfg, rec.cause))
        if pred is not None:
            rec.predicted_ram_bytes = pred.ram_bytes
            rec.predicted_vram_bytes = pred.vram_bytes if self.build.get("gpu_offload") else None
        if rec.ok and rec.config.n_gen:
            if self.bandwidth is None:
                self.bandwidth = roofline.bandwidth()
            rec.tg_roofline_ts = roofline.tg_bound(cfg, self.infos[cfg.model], self.bandwidth,
                                                   bool(self.build.get("gpu_offload")))
        rec.baseline = baseline
        rec.drift = self.drifting
        rec.state = "COMPLETE"
        self.warn_unknown_vram(rec)
        self._tell_and_write(number, rec)
        return rec

    def warn_unknown_vram(self, rec: TrialRecord) -> bool:
        """--max-vram cannot be kept when NVML reports neither the worker's VRAM nor the device's: say so once
        (the trial's VRAM is null, never 0, and the limit is then judged on the planner's prediction alone)."""
        if (self._vram_warned or not rec.ok or rec.peak_vram_bytes is not None or not self.opts.limits.max_vram
                or not self.rig.gpu_offload):
            return False
        self._vram_warned = True
        print(f"warning: --max-vram cannot be checked against measurements: NVML reports no VRAM for this worker "
              f"(vram_by {rec.vram_by or 'none'}); only the planner's prediction keeps configs within it",
              file=sys.stderr)
        return True

    def _claim(self, key: tuple, number: int) -> int | None:
        """Claim a config for this trial; the trial that measured it already, if any (then nothing is run)."""
        if key in self.seen:
            return self.seen[key]
        self.seen[key] = number
        return None

    def _plan(self, cfg: TrialConfig):
        """The planner's prediction (calibrated on this study's trials) and why it cannot fit, if it cannot."""
        measured = [r for r in self.records if r.searched]
        n_ok = sum(1 for r in measured if r.ok and r.peak_rss_bytes)
        if self.calib is None or n_ok != self.calib.n_ram:  # refit only when a trial was added
            self.calib = planner.Calibration.from_records(measured, self.infos)
        pred = fit.predict(cfg, self.infos[cfg.model], self.rig, self.calib)
        if not self.opts.plan:
            return pred, None
        ok, why = fit.judge(pred, self.rig)
        return pred, (None if ok else f"planner: {why}")

    def _write(self, rec: TrialRecord) -> None:
        if rec.outcome not in ("ok", "skipped") and self.runner is not None and self.runner.last_log:
            self.logs.mkdir(exist_ok=True)
            (self.logs / f"trial-{rec.trial_number:05d}.log").write_text(self.runner.last_log)
        self._store(rec)

    def _store(self, rec: TrialRecord) -> None:
        if self.quality is not None:
            self.quality.stamp(rec)
        store.append(self.parquet, [rec])
        self.records.append(rec)

    def _tell_and_write(self, number: int, rec: TrialRecord) -> None:
        cons = self._constraints(rec)
        rec.constraint = list(cons.values())  # failed, ram, vram
        self._write(rec)  # Parquet first: a resume finds the row and tells Optuna from it
        self._tell(number, rec, cons)

    def _anchor_config(self) -> TrialConfig | None:
        ok = [r for r in self.records if r.ok and r.searched]
        return next((r.config for r in ok if r.baseline == "llama.cpp defaults"), ok[0].config) if ok else None

    def _anchor_loaded(self) -> bool:
        """The anchor runs on the model the worker has loaded: no reload."""
        cfg = self._anchor_config()
        return cfg is not None and self.runner is not None and self.runner.loaded_key == cfg.load_key()

    def _anchor(self) -> None:
        """Re-measure the anchor config; mark drift when its tg moved beyond the tolerance."""
        cfg = self._anchor_config()
        if cfg is None:
            return
        rec = self.runner.run(cfg)
        rec.study, rec.state, rec.baseline = self.opts.study_name, "anchor", "anchor"
        tg = rec.metric("tg")[0]
        if self.anchor_tg is None:
            self.anchor_tg, self.anchor_samples = tg, list(rec.tg_samples)
        elif tg and self.anchor_tg:
            change = tg / self.anchor_tg - 1
            was = self.drifting
            # drift = a change beyond the tolerance that the repetitions' noise does not explain (Welch's t)
            self.drifting = abs(change) > self.opts.drift_tolerance and _significant(self.anchor_samples,
                                                                                     rec.tg_samples)
            if self.drifting:
                since = max((r.trial_number for r in self.records if r.state == "anchor" and
                             r.trial_number is not None), default=-1)
                store.mark(self.parquet, "drift", True, lambda row: row.get("trial_number") is not None
                           and row["trial_number"] > since and row.get("state") != "anchor")
                for r in self.records:
                    if r.trial_number is not None and r.trial_number > since:
                        r.drift = True
                print(f"warning: drift: the anchor config now runs at {tg:.2f} t/s, {change:+.1%} against "
                      f"{self.anchor_tg:.2f} at the start; trials since #{since + 1} are marked drift",
                      file=sys.stderr)
            elif was:
                print(f"drift over: the anchor is back within {self.opts.drift_tolerance:.0%}", file=sys.stderr)
        rec.trial_number = max((r.trial_number for r in self.records if r.trial_number is not None), default=0)
        rec.drift = self.drifting
        self._store(rec)

    def close(self) -> None:
        """Close the storage's connections: SQLite folds its write-ahead log back into study.db."""
        if self.study is not None:
            backend = getattr(self.study._storage, "_backend", self.study._storage)
            engine = getattr(backend, "engine", None)
            if engine is not None:
                engine.dispose()

    # -- the loop ------------------------------------------------------------------------------------------
    def done_trials(self) -> int:
        # finished trials, skipped ones included; interrupted ones (FAIL) are not: they are run again. A repeated
        # suggestion of a measured config is no trial: it was told its pooled figure, nothing ran.
        return sum(1 for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                   if "duplicate_of" not in t.user_attrs)

    def confirm_candidates(self) -> list[confirmlib.Candidate]:
        """Top K configs at the working context by pooled estimate and the llama.cpp-defaults baseline."""
        if not self.opts.confirm or self.opts.pareto:
            return []
        searched = [r for r in self.records if r.searched and r.ok and r.objective(self.opts.objective) is not None
                    and fits(r, self.hw, self.opts.limits)
                    and (self.quality is None or self.quality.judge(r)[0])]  # only quants within the budget
        groups = confirmlib.pool(searched)
        groups = confirmlib.prefer_clean(groups)
        if not groups:
            return []
        sign = -1 if self.opts.objective == "ttft" else 1
        groups.sort(key=lambda g: -sign * g.estimate(self.opts.objective))
        working = max(g.config.effective_ctx() for g in groups)
        cands: dict[tuple, confirmlib.Candidate] = {}
        for g in [g for g in groups if g.config.effective_ctx() == working][:self.opts.confirm]:
            cands[g.key] = confirmlib.Candidate(confirmlib.ROLE_TOP, g.config, g.trial_number,
                                                roles=[confirmlib.ROLE_TOP])
        base = next((g for g in groups if any(r.baseline == "llama.cpp defaults" for r in g.records)
                     and g.config.effective_ctx() == working), None)
        if base is not None:
            c = cands.setdefault(base.key, confirmlib.Candidate(confirmlib.ROLE_BASELINE, base.config,
                                                                base.trial_number, roles=[]))
            c.roles.append(confirmlib.ROLE_BASELINE)
        earlier = {confirmlib.config_key(c.config): c for c in confirmlib.candidates_from_records(self.records)
                   if not c.is_rung}
        for k, c in cands.items():  # a resumed confirmation goes on from the rounds it has
            if k in earlier:
                c.records = list(earlier[k].records)
        return list(cands.values())

    def typical_trial_s(self) -> float:
        """A run's typical wall time, without a depth fill: a fill is paid once per run and KV settings, and
        the confirmation's and the ladder's runs mostly restore it."""
        walls = sorted(r.wall_s - (r.depth_fill_ms or 0) / 1000 for r in self.records if r.ok and r.wall_s)
        return walls[len(walls) // 2] if walls else 0.0

    def _n_candidates(self) -> int:
        return self.opts.confirm + 1 if self.opts.confirm and not self.opts.pareto else 0

    def _n_ladder_runs(self) -> int:
        """Runs the ladder takes: every rung up to the working one × (recommended, defaults and at most one
        alternative and one control) × the race's minimum of rounds."""
        rungs = [c for c in self.space.ladder if c <= self.space.base.n_ctx]
        return len(rungs) * 4 * self.opts.confirm_rounds[0] if len(rungs) > 1 and not self.opts.pareto else 0

    def confirm_estimate_s(self, n_cands: int | None = None) -> float:
        """The ETA of the confirmation: the runs its race can still take (every candidate still racing, to the
        round limit) × a typical trial. Before it starts: the candidates × the round limit."""
        if self.laddering is not None:
            lo = self.opts.confirm_rounds[0]
            return sum(max(0, lo - len(c.records)) for c in self.laddering if not c.failed) * self.typical_trial_s()
        ladder = self._n_ladder_runs() * self.typical_trial_s()
        if self.confirming is not None:
            return (confirmlib.remaining_runs(self.confirming, self.opts.confirm_rounds[1]) * self.typical_trial_s()
                    + ladder)
        return (n_cands or self._n_candidates()) * self.opts.confirm_rounds[1] * self.typical_trial_s() + ladder

    def confirm_reserve_s(self) -> float:
        """What --timeout keeps for the confirmation: every candidate for the race's minimum of rounds (the rest
        of the race runs in what is left, and stops at the deadline)."""
        return (self._n_candidates() * self.opts.confirm_rounds[0] + self._n_ladder_runs()) * self.typical_trial_s()

    def time_left(self) -> float | None:
        if self.opts.timeout_s is None:
            return None
        return self.opts.timeout_s - (time.monotonic() - self.started)

    def budget_left(self) -> bool:
        if self.stop_requested:
            return False
        left = self.time_left()
        # the confirmation is part of the budget: the search stops early enough to leave time for its race
        if left is not None and left <= self.confirm_reserve_s():
            if not self.finished:
                self.finished = (f"--timeout: the {hms(left)} left are kept for the confirmation"
                                 + (" and the context ladder" if self._n_ladder_runs() else "")
                                 + f" (about {hms(self.confirm_reserve_s())} at {hms(self.typical_trial_s())} a run)")
            return False
        if self.opts.n_trials is not None and self.done_trials() >= self.opts.n_trials:
            return False
        if self.opts.sampler == "grid":
            sampler = self.study.sampler
            if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(self.study):
                return False
        return True

    MAX_DUPLICATES = 50  # suggestions in a row of measured configs: the sampler has nothing new to offer

    def run(self) -> dict | None:
        self.n_run = 0
        self.search_loop()
        if not self.stop_requested:  # after a Ctrl-C the recommendation says it is unconfirmed
            self.confirm()
        if not self.stop_requested:
            self.ladder()
        return self.write_recommendation()

    def search_loop(self) -> None:
        while self.budget_left():
            if self.exhausted():
                self.finished = f"every config of the space is measured ({self.space.size()} configs)"
                break
            if self._dupes >= self.MAX_DUPLICATES:
                self.finished = f"the sampler proposed {self._dupes} measured configs in a row"
                break
            self._next_baseline()
            trial = self.study.ask()
            if trial.user_attrs.get("enqueued") == "same load":
                self._block_left = max(0, self._block_left - 1)
            rec = self.run_one(trial)
            if rec is None:
                continue
            self.settle_rung()
            self.n_run += 1
            self.after_load(trial, rec)
            self.write_recommendation()
            if self.on_trial:
                self.on_trial(self, rec)
            if self.opts.drift_every and self.n_run % self.opts.drift_every == 0:
                self._anchor_due = True
            # an anchor that needs another load waits until the loaded model's queued configs are measured
            if self._anchor_due and self.budget_left() and (self._anchor_loaded() or not self._block_left):
                self._anchor_due = False
                self._anchor()

    def confirm(self) -> dict | None:
        """Re-measure the candidates interleaved, round by round (see tuner.search.confirm); records are state confirm."""
        cands = self.confirm_candidates()
        if not cands or self.runner is None:
            return None
        lo, hi = self.opts.confirm_rounds

        measure = self._confirm_run
        ladder_s = self._n_ladder_runs() * self.typical_trial_s()

        def keep_going() -> bool:  # the race leaves the ladder its time
            left = self.time_left()
            return not self.stop_requested and (left is None or left > ladder_s)

        self.confirming = cands
        try:
            self.confirmation = confirmlib.run_rounds(cands, measure, self.opts.objective, lo, hi,
                                                      keep_going=keep_going)
        finally:
            self.confirming = None
        return self.confirmation

    def _confirm_run(self, c: confirmlib.Candidate, rnd: int) -> TrialRecord:
        """One run of the confirmation or the ladder: stored as state confirm, its roles in `baseline`."""
        try:
            rec = self.runner.run(c.config)
        except TrialInterrupted as e:
            e.record.study, e.record.state, e.record.trial_number = self.opts.study_name, "confirm", c.trial_number
            e.record.baseline = "+".join(c.roles)
            self._write(e.record)
            raise
        rec.study, rec.state, rec.trial_number = self.opts.study_name, confirmlib.CONFIRM_STATE, c.trial_number
        rec.baseline, rec.confirm_round, rec.drift = "+".join(c.roles), rnd, self.drifting
        self._write(rec)
        if self.on_confirm:
            self.on_confirm(self, c, rec, rnd)
        return rec

    # -- the context ladder ----------------------------------------------------------------------------
    def ladder_candidates(self) -> list[confirmlib.Candidate]:
        """The ladder's runs for the current recommendation (tuner.search.ladder.candidates)."""
        if len(self.space.ladder) < 2 or self.opts.pareto:
            return []
        rec = recommendlib.recommend(self.records, self.hw, self.opts.limits, self.opts.objective,
                                     quality=self.quality)
        if rec is None:
            return []
        return ladderlib.candidates(self.space, self.records, rec["trial_number"], self.opts.objective,
                                    fits=lambda r: fits(r, self.hw, self.opts.limits),
                                    allowed=lambda r: self.quality is None or self.quality.judge(r)[0])

    def ladder(self) -> bool:
        """Measure the ladder (tuner.search.confirm.run_ladder) for the race's minimum of rounds; False when stopped."""
        cands = self.ladder_candidates()
        if not cands or self.runner is None:
            return True

        def keep_going() -> bool:
            left = self.time_left()
            return not self.stop_requested and (left is None or left > 0)

        self.laddering = cands
        try:
            return confirmlib.run_ladder(cands, self._confirm_run, self.opts.confirm_rounds[0], keep_going)
        finally:
            self.laddering = None

    def settle_rung(self) -> None:
        """Step the working rung down the ladder while the trials say it does not fit (tuner.search.ladder.step_down);
        the baselines run again at the new rung."""
        while (lower := ladderlib.step_down(self.space, self.records)) is not None:
            print(f"note: nothing fits at n_ctx {self.space.base.n_ctx} (the search's configs ran out of memory "
                  f"there, none completed): the working context steps down the ladder to {lower}", file=sys.stderr)
            self.space.set_working(lower)
            self._list_space()
            if self.opts.baselines and self.opts.sampler != "grid" and not any(
                    r.baseline and r.config.effective_ctx() == lower for r in self.records):
                # the baselines again, at this rung: the race and the ladder compare with the defaults here
                self._baselines.clear()
                self._enqueue_baselines(again=True)

    def write_recommendation(self) -> dict | None:
        rec = recommendlib.recommend(self.records, self.hw, self.opts.limits, self.opts.objective,
                                     study=self.opts.study_name, pareto=self.opts.pareto, quality=self.quality)
        if rec is not None:
            recommendlib.write(self.dir / recommendlib.RECOMMENDED_FILE, rec)
        return rec

    def best_so_far(self) -> tuple[int, float] | None:
        best = None
        for r in self.records:
            if r.ok and r.searched:
                v = r.objective("tg" if self.opts.pareto else self.opts.objective)
                if v is None:
                    continue
                better = best is None or (v < best[1] if self.opts.objective == "ttft" and not self.opts.pareto
                                          else v > best[1])
                if better:
                    best = (r.trial_number, v)
        return best


def _significant(a: list[float], b: list[float], alpha: float = 0.01) -> bool:
    """Does the anchor's new trial differ from its first beyond noise? tuner.stats' unpaired test; the unit here is
    the repetition, as an anchor is a single trial each time (the tolerance is the practical threshold)."""
    if stats.min_p(len(a), len(b), paired=False) >= alpha:
        return True  # too few repetitions for the test to ever say so: the tolerance alone decides
    if statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0:  # no noise: they differ exactly when they differ
        return statistics.fmean(a) != statistics.fmean(b)
    return stats.compare(a, b, paired=False, alpha=alpha, min_effect=0.0).significant


class StopOnSignal:
    """First Ctrl-C: finish the current trial, then stop. Second: abort it (the worker is killed)."""

    def __init__(self, search: Search):
        self.search = search
        self.count = 0

    def __enter__(self):
        self.old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        self.count += 1
        self.search.stop_requested = True
        if self.count == 1:
            print("\nstopping after this trial (Ctrl-C again to abort it now)...", file=sys.stderr)
        else:
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.old)

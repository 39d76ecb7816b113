"""`tuner search` as a library: one loop over a ledger, an Optuna study whose every trial is a crash-isolated
measurement.

The loop (`Search`) asks Optuna, measures, records, tells; where the trials are kept is its ledger's concern
(tuner.search.ledger: the study folder's Parquet and SQLite, or a fleet's shared storage), as Optuna's one `Study`
runs over any storage. Failures teach the sampler (tuner.search.trials); a config that a known OOM dominates is
not run again. The record is stored before Optuna is told, and a resume reconciles the two.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import signal
import sys
import time
from typing import Callable

import optuna

from tuner.measure.runner import Runner, TrialInterrupted, new_record, resolve
from tuner.model.meta import ModelInfo
from tuner.plan import planner, roofline
from tuner.record import TrialConfig, TrialRecord, invalid_reason, utcnow
from tuner.search import baselines as baselinelib
from tuner.search import budget, fleet, trials
from tuner.search import confirm as confirmlib
from tuner.search import feasible as fit
from tuner.search import ladder as ladderlib
from tuner.search import recommend as recommendlib
from tuner.search.ledger import Ledger
from tuner.search.options import SearchOptions
from tuner.search.recommend import fits
from tuner.search.space import Space
from tuner.units import hms

LOAD_DIMS = frozenset(TrialConfig.LOAD_KEYS)  # dimensions whose change reloads the model
TS = optuna.trial.TrialState


class Search:
    """Runs one study over a ledger: ask Optuna, measure, record, tell. `on_trial` is called after every trial.

    The ledger defaults to the one the options' storage names (tuner.search.fleet.ledger_for); `clock` is the
    time the budget and the ETA read (a replay passes its own)."""

    SPACE_LIST_LIMIT = 20000  # configs; above it the space is never "finished" by enumeration
    MAX_DUPLICATES = 50  # suggestions in a row of measured configs: the sampler has nothing new to offer

    def __init__(
        self,
        space: Space,
        opts: SearchOptions,
        infos: dict[str, ModelInfo],
        hw,
        build,
        on_trial: Callable[["Search", TrialRecord], None] | None = None,
        runner: Runner | None = None,
        on_confirm: Callable | None = None,
        ledger: Ledger | None = None,
        clock: Callable[[], float] = time.monotonic,
        rig: fit.Rig | None = None,
    ):
        self.space, self.opts, self.infos, self.hw, self.build = space, opts, infos, hw, build
        self.ledger = ledger if ledger is not None else fleet.ledger_for(opts)
        self.on_trial = on_trial
        self.on_confirm = on_confirm  # (search, candidate, record, round) after every confirmation run
        self.dir = opts.study_dir
        self.logs = self.dir / "logs"
        self.runner = runner
        # the rig run_search planned the space for (its RPC devices included), else this machine's
        self.rig = rig or fit.rig_from_hardware(hw, opts.limits, bool(build.get("gpu_offload")))
        self.calib = None  # the planner's calibration, refitted from this study's completed trials
        self.bandwidth = None
        self.stop_requested = False
        self.clock = clock
        self.started = clock()
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
        self.confirm_round: int | None = None  # the round of the confirmation or ladder run measuring now
        self.quality = None  # tuner.quality.StudyQuality: the budget the recommendation keeps to
        self.n_run = 0
        self._dupes = 0
        self._baselines: list[tuple[baselinelib.Baseline, bool]] = []  # enqueued one at a time, after the last's block
        self._unmeasured_load: dict[tuple, tuple] = {}  # unmeasured config → its load key
        self._running_keys: set[tuple] = set()  # configs running on other hosts (a shared ledger)
        self._anchor_due = False
        self._block_left = 0  # queued configs of the loaded model not yet run (after_load)
        self._moved = False  # the last run was of another load than the run before it (a reload, or a waiting worker)
        self._vram_warned = False
        self.prior = None  # tuner.search.prior.Prior: the predictions measured first and corrected (None: off)

    @property
    def study_name(self) -> str:
        """The Optuna study this search asks and tells: --study, or a fleet group's NAME@HW.BUILD once open."""
        return self.ledger.name or self.opts.study

    # -- set-up and resume ---------------------------------------------------------------------------
    def prepare(self) -> optuna.Study:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = self.ledger.open(self.opts, self.space, self.hw, self.build)
        self.records = self.ledger.load()
        self._reconcile()
        for r in self.records:
            if r.outcome == "oom" and r.trial_number is not None and r.searched:
                self.failed.append((r.trial_number, r.config, r.cause))
            if r.state == "anchor" and r.ok and self.anchor_tg is None:
                self.anchor_tg, self.anchor_samples = r.metric("tg")[0], list(r.tg_samples)
        for r in self.records:
            if r.measured_config and r.trial_number is not None:
                self.seen.setdefault(r.config.key(), r.trial_number)
        self._list_space()
        self.settle_rung()  # a resumed ladder search goes on at the rung it had stepped down to
        if self.opts.baselines and self.opts.sampler != "grid" and not self.study.trials:
            self._enqueue_baselines()
        return self.study

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
                key = cfg.key()
                if key not in self.seen:
                    self.unmeasured.setdefault(key, params)
                    self._unmeasured_load[key] = cfg.load_key()

    def exhausted(self) -> bool:
        """Every config of a listed space is measured, or running on another host, and none waits in the queue
        of a shared study (another host may take it)."""
        if self.unmeasured is None or self.ledger.others.waiting:
            return False
        return not (set(self.unmeasured) - self._running_keys)

    def _reconcile(self) -> None:
        """After a crash of the parent: every trial the ledger says was abandoned gets its record, and is told."""
        by_number = {r.trial_number: r for r in self.records if r.trial_number is not None and r.searched}
        for t in self.ledger.abandoned():
            rec = by_number.get(t.number)
            if rec is None:
                cfg = self._trial_config(t)
                rec = self._blank(
                    cfg,
                    t.number,
                    "interrupted",
                    "the search stopped during this trial (parent killed); recorded on resume",
                )
                rec.baseline = t.user_attrs.get("baseline", "")
                self.ledger.add(rec)
                self.records.append(rec)
                self.study.tell(t.number, state=TS.FAIL)
            else:
                self._tell(t.number, rec)

    def sync(self) -> None:
        """Take in what the ledger learnt since the last sync: other hosts' records (pooling, OOM dominance, the
        configs measured) and the configs running elsewhere. A study of one process learns nothing."""
        for rec in self.ledger.sync():
            self.records.append(rec)
            if rec.measured_config and rec.trial_number is not None:
                key = rec.config.key()
                self.seen.setdefault(key, rec.trial_number)
                if self.unmeasured is not None:
                    self.unmeasured.pop(key, None)
                if rec.outcome == "oom":
                    self.failed.append((rec.trial_number, rec.config, rec.cause))
        names = set(self.space.varying()) | ({"model"} if len(self.space.models) > 1 else set())
        self._running_keys = {self._config_from_params(p).key() for p in self.ledger.others.running if names <= set(p)}

    def _enqueue_baselines(self, again: bool = False) -> None:
        def fits(cfg: TrialConfig) -> bool:
            return fit.judge(fit.predict(cfg, self.infos[cfg.model], self.rig, self.calib), self.rig)[0]

        for b in baselinelib.starting(
            self.space, self.infos, self.rig, self.hw, self.opts.min_ctx, fits, self.opts.fit_target
        ):
            self._baselines.append((b, again))
        self._next_baseline()

    def _next_baseline(self) -> None:
        """Baselines are queued one at a time, so a baseline's block (after_load) runs before the next one's load."""
        if self._baselines and not self.study.get_trials(deepcopy=False, states=(TS.WAITING,)):
            b, again = self._baselines.pop(0)
            attrs = {"baseline": b.label}
            if b.config is not None:  # measured as it is; the sampler learns it at its nearest point (b.params)
                attrs["config"] = b.config.to_dict()
            # again (another rung): the same params ran at the rung above, so Optuna must not skip them; a
            # baseline of its own config may share its nearest point with an earlier trial
            self.study.enqueue_trial(b.params, user_attrs=attrs, skip_if_exists=not again and b.config is None)

    # -- trials ----------------------------------------------------------------------------------------
    def _suggest(self, trial: optuna.Trial) -> TrialConfig:
        params = {}
        for name, d in self.space.varying().items():
            if d.is_range:
                params[name] = trial.suggest_int(name, d.values[0], d.values[-1], step=d.step)
            else:
                params[name] = trial.suggest_categorical(name, d.values)
        model = (
            trial.suggest_categorical("model", self.space.models)
            if len(self.space.models) > 1
            else self.space.models[0]
        )
        return resolve(self.space.config(model, params), self.infos[model])

    def _trial_config(self, trial) -> TrialConfig:
        """A trial's config: a baseline's own where it has one (fit's placement), else its params' in the space."""
        own = trial.user_attrs.get("config")
        if own:
            cfg = TrialConfig.from_dict(own)
            return resolve(cfg, self.infos[cfg.model])
        return self._config_from_params(trial.params)

    def _config_from_params(self, params: dict) -> TrialConfig:
        params = dict(params)
        model = params.pop("model", self.space.models[0])
        return resolve(
            self.space.config(model, {k: v for k, v in params.items() if k in self.space.dims}), self.infos[model]
        )

    def _blank(self, cfg: TrialConfig, number: int, outcome: str, cause: str) -> TrialRecord:
        """A trial that never ran (skipped, interrupted): the same facts as a measured one."""
        rec = new_record(cfg, self.hw, self.build, self.infos.get(cfg.model))
        rec.outcome, rec.cause, rec.finished_utc = outcome, cause, utcnow()
        rec.study, rec.trial_number = self.study_name, number
        return rec

    def _tell(self, number: int, rec: TrialRecord, cons: dict[str, float] | None = None) -> None:
        """Tell Optuna: failures as COMPLETE with the worst value and a violated constraint, so TPE learns."""
        with self.ledger.telling(number):
            cons = cons or trials.constraints(rec, self.hw, self.opts.limits, self.rig)
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
                self.study.tell(number, state=TS.FAIL)
                return
            try:
                self.study.tell(number, trials.values(rec, self.opts.objective, self.opts.pareto))
            except RuntimeError as e:
                # GridSampler calls study.stop() on its last grid point, which only works inside optimize();
                # the trial is stored before that (optuna's _tell: finally), and budget_left() sees the grid done.
                if "Study.stop" not in str(e):
                    raise

    def _measured(self, key: tuple) -> bool:
        return any(r.measured_config and r.config.key() == key for r in self.records)

    def _duplicate(self, trial: optuna.Trial, first: int, key: tuple) -> None:
        """A config measured before: tell the sampler its pooled figure instead of measuring it again, and
        steer the next ask to a config not measured yet (TPE repeats itself on small discrete spaces). A config
        another host measures right now (no record yet, even after a sync) tells the sampler nothing: FAIL."""
        if not self._measured(key):
            self.sync()
        if self._measured(key):
            same = [r for r in self.records if r.searched and r.config.key() == key]
            prev = next((r for r in same if r.trial_number == first), same[0])
            if prev.ok:
                oks = [r for r in same if r.ok]
                prev = dataclasses.replace(
                    prev,
                    tg_samples=[x for r in oks for x in r.tg_samples],
                    pp_samples=[x for r in oks for x in r.pp_samples],
                    ttft_samples_ms=[x for r in oks for x in r.ttft_samples_ms],
                )
            trial.set_user_attr("duplicate_of", first)
            self._tell(trial.number, prev)
        else:
            trial.set_user_attr("duplicate_of", first)
            trial.set_user_attr("in_progress_elsewhere", True)
            self.study.tell(trial.number, state=TS.FAIL)
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
        """This trial moved to another load (loaded it, or took the worker that waits with it): queue up to
        per_load - 1 more configs with the same load parameters (model file, GPU layers, experts in RAM, split,
        mmap), their other dimensions left to the sampler, so that a reload (minutes for a model of hundreds of
        GB) is paid once for several measurements, as llama-bench sweeps every test of one load before the next.
        Not in a shared study: its queue is every host's, so a queued config would go to whichever host asks next
        and cost that host a load instead of saving one here."""
        if (
            self.opts.per_load <= 1
            or not (rec.model_loaded or self._moved)
            or not rec.ok
            or self.opts.sampler == "grid"
            or self.runner is None
            or not self.runner.reuse
            or self.ledger.shared
        ):
            return  # fresh workers (--fresh-workers, --mem-limit) load for every trial: nothing to amortize
        varying = self.space.varying()
        if not [k for k in varying if k not in LOAD_DIMS]:
            return  # nothing to vary within one load
        fixed = {k: v for k, v in trial.params.items() if k in LOAD_DIMS or k == "model"}
        n = self.opts.per_load - 1
        if self.opts.n_trials is not None:  # a block never outlives the budget (it would wait in the queue),
            # nor do the configs already queued ahead of it (a duplicate's steer)
            queued = len(self.study.get_trials(deepcopy=False, states=(TS.WAITING,)))
            n = min(n, self.opts.n_trials - self.done_trials() - queued)
        if self.unmeasured is not None:
            key = rec.config.load_key()
            n = min(n, sum(1 for k in self.unmeasured if self._unmeasured_load.get(k) == key))
        if self.prior is not None and self.prior.active:  # the block: the corrected predictions of this load
            self._block_left = self.prior.fill_block(self, rec.config.load_key(), n)
            return
        for _ in range(n):
            self.study.enqueue_trial(fixed, user_attrs={"enqueued": "same load"})
        self._block_left = max(n, 0)

    def run_one(self, trial: optuna.Trial) -> TrialRecord | None:
        """One asked trial, under the ledger's heartbeat: claimed, then skipped or measured, stored and told; None
        for a config measured before (a duplicate: nothing ran)."""
        # the heartbeat starts at once: a host that dies before measuring leaves a stale trial, not a lost one
        with self.ledger.heartbeat(trial):
            return self._measure(trial)

    def _measure(self, trial: optuna.Trial) -> TrialRecord | None:
        cfg = self._suggest(trial)
        if trial.user_attrs.get("config"):
            cfg = self._trial_config(trial)
        number = trial.number
        baseline = trial.user_attrs.get("baseline", "")
        key = cfg.key()
        first = self.ledger.claim(key, number, self.seen)
        if first is not None:
            self._duplicate(trial, first, key)
            return None
        self.seen.setdefault(key, number)
        self._dupes = 0
        if self.unmeasured is not None:
            self.unmeasured.pop(key, None)
            self._unmeasured_load.pop(key, None)
        skip = invalid_reason(cfg)
        dom = None if skip else trials.dominated_by(cfg, self.failed)
        pred, plan_skip = self._plan(cfg)
        if skip or dom or baseline:
            plan_skip = None  # a baseline is what the user would run: measured, whatever the planner says
        if skip or dom or plan_skip:
            rec = self._blank(
                cfg, number, "skipped", skip or plan_skip or f"dominated by trial #{dom[0]} (oom: {dom[1][:120]})"
            )
            rec.skipped_by = dom[0] if dom else None
        else:
            try:
                rec = self._run(cfg, pred)
            except TrialInterrupted as e:
                rec = e.record
                rec.study, rec.trial_number, rec.state, rec.baseline = self.study_name, number, "FAIL", baseline
                self._write(rec)
                self.study.tell(number, state=TS.FAIL)
                self.seen.pop(key, None)  # measured nothing: a resume runs this config again
                raise
            rec.study, rec.trial_number = self.study_name, number
            if rec.outcome == "oom":
                self.failed.append((number, cfg, rec.cause))
        if pred is not None:
            rec.predicted_ram_bytes = pred.ram_bytes
            rec.predicted_vram_bytes = pred.vram_bytes if self.build.get("gpu_offload") else None
        if rec.ok and rec.config.n_gen:
            if self.bandwidth is None:
                self.bandwidth = roofline.bandwidth()
            rec.tg_roofline_ts = roofline.tg_bound(
                cfg, self.infos[cfg.model], self.bandwidth, bool(self.build.get("gpu_offload"))
            )
        rec.baseline = baseline
        rec.drift = self.drifting
        rec.state = "COMPLETE"
        self.warn_unknown_vram(rec)
        self._tell_and_write(number, rec)
        return rec

    def warn_unknown_vram(self, rec: TrialRecord) -> bool:
        """--max-vram cannot be kept when NVML reports neither the worker's VRAM nor the device's: say so once
        (the trial's VRAM is null, never 0, and the limit is then judged on the planner's prediction alone)."""
        if (
            self._vram_warned
            or not rec.ok
            or rec.peak_vram_bytes is not None
            or not self.opts.max_vram
            or not self.rig.gpu_offload
        ):
            return False
        self._vram_warned = True
        print(
            f"warning: --max-vram cannot be checked against measurements: NVML reports no VRAM for this worker "
            f"(vram_by {rec.vram_by or 'none'}); only the planner's prediction keeps configs within it",
            file=sys.stderr,
        )
        return True

    def _run(self, cfg: TrialConfig, pred=None) -> TrialRecord:
        """Measure `cfg`, telling the runner the RAM its load needs (the planner's peak), so that it keeps other
        loads' workers waiting beside it only where they fit."""
        pred = pred or self._plan(cfg)[0]
        self._moved = cfg.load_key() != self.runner.loaded_key
        return self.runner.run(cfg, need_bytes=pred.ram_bytes if pred is not None else None)

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
        self.ledger.add(rec)
        self.records.append(rec)

    def _tell_and_write(self, number: int, rec: TrialRecord) -> None:
        cons = trials.constraints(rec, self.hw, self.opts.limits, self.rig)
        rec.constraint = list(cons.values())  # failed, ram, vram
        self._write(rec)  # the record first: a resume finds it and tells Optuna from it
        self._tell(number, rec, cons)

    def _anchor_config(self) -> TrialConfig | None:
        ok = [r for r in self.records if r.ok and r.searched]
        return next((r.config for r in ok if r.baseline == "llama.cpp defaults"), ok[0].config) if ok else None

    def _anchor_loaded(self) -> bool:
        """The anchor runs on the model the worker has loaded: no reload."""
        cfg = self._anchor_config()
        return cfg is not None and self.runner is not None and cfg.load_key() in self.runner.loaded_keys

    def _anchor(self) -> None:
        """Re-measure the anchor config; mark drift when its tg moved beyond the tolerance."""
        cfg = self._anchor_config()
        if cfg is None:
            return
        rec = self._run(cfg)
        rec.study, rec.state, rec.baseline = self.study_name, "anchor", "anchor"
        tg = rec.metric("tg")[0]
        if self.anchor_tg is None:
            self.anchor_tg, self.anchor_samples = tg, list(rec.tg_samples)
        elif tg and self.anchor_tg:
            change = tg / self.anchor_tg - 1
            was = self.drifting
            # drift = a change beyond the tolerance that the repetitions' noise does not explain (Welch's t)
            self.drifting = abs(change) > self.opts.drift_tolerance and trials.drifted(
                self.anchor_samples, rec.tg_samples
            )
            if self.drifting:
                since = max(
                    (r.trial_number for r in self.records if r.state == "anchor" and r.trial_number is not None),
                    default=-1,
                )
                self.ledger.mark_drift(since)
                for r in self.records:
                    if r.trial_number is not None and r.trial_number > since:
                        r.drift = True
                print(
                    f"warning: drift: the anchor config now runs at {tg:.2f} t/s, {change:+.1%} against "
                    f"{self.anchor_tg:.2f} at the start; trials since #{since + 1} are marked drift",
                    file=sys.stderr,
                )
            elif was:
                print(f"drift over: the anchor is back within {self.opts.drift_tolerance:.0%}", file=sys.stderr)
        rec.trial_number = max((r.trial_number for r in self.records if r.trial_number is not None), default=0)
        rec.drift = self.drifting
        self._store(rec)

    def close(self) -> None:
        self.ledger.close()

    # -- the budget ------------------------------------------------------------------------------------------
    def done_trials(self) -> int:
        # finished trials, skipped ones included; interrupted ones (FAIL) are not: they are run again. A repeated
        # suggestion of a measured config is no trial: it was told its pooled figure, nothing ran.
        return sum(
            1
            for t in self.study.get_trials(deepcopy=False, states=(TS.COMPLETE,))
            if "duplicate_of" not in t.user_attrs
        )

    def typical_trial_s(self) -> float:
        return budget.typical_trial_s(self.records)

    def confirm_estimate_s(self, n_cands: int | None = None) -> float:
        """The ETA of the confirmation and the ladder (tuner.search.budget.confirm_estimate_s)."""
        return budget.confirm_estimate_s(
            self.opts, self.space, self.typical_trial_s(), self.confirming, self.laddering, n_cands
        )

    def confirm_reserve_s(self) -> float:
        """What --timeout keeps for the confirmation and the ladder (tuner.search.budget.confirm_reserve_s)."""
        return budget.confirm_reserve_s(self.opts, self.space, self.typical_trial_s())

    def time_left(self) -> float | None:
        if self.opts.timeout is None:
            return None
        return self.opts.timeout - (self.clock() - self.started)

    def _trials_spent(self) -> bool:
        """--n-trials is the study's total: with a shared ledger, the trials running on other hosts count too, so
        the fleet stops at the budget (hosts that ask at the very same moment may overshoot by one each)."""
        return (
            self.opts.n_trials is not None
            and self.done_trials() + len(self.ledger.others.running) >= self.opts.n_trials
        )

    def budget_left(self) -> bool:
        self.sync()
        if self.ledger.shared and self._trials_spent():  # the fleet's total first: this host has nothing to add
            return False
        if self.stop_requested:
            return False
        left = self.time_left()
        # the confirmation is part of the budget: the search stops early enough to leave time for its race
        if left is not None and left <= self.confirm_reserve_s():
            if not self.finished:
                self.finished = (
                    f"--timeout: the {hms(left)} left are kept for the confirmation"
                    + (" and the context ladder" if budget.n_ladder_runs(self.space, self.opts) else "")
                    + f" (about {hms(self.confirm_reserve_s())} at {hms(self.typical_trial_s())} a run)"
                )
            return False
        if self._trials_spent():
            return False
        if self.opts.sampler == "grid":
            sampler = self.study.sampler
            if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(self.study):
                return False
        return True

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self) -> dict | None:
        """The search, then (unless stopped) the confirmation and the context ladder, by the host the ledger lets
        confirm; the recommendation."""
        self.n_run = 0
        self.search_loop()
        # after a Ctrl-C the recommendation says it is unconfirmed
        if (
            not self.stop_requested
            and self.runner is not None
            and (self.confirm_candidates() or self.ladder_candidates())
        ):
            with self.ledger.confirming(self.done_trials()) as done:
                if done is not None:
                    self.confirm()
                    if not self.stop_requested:
                        self.ladder()
                    if not self.stop_requested:
                        done()
        return self.write_recommendation()

    def search_loop(self) -> None:
        """Trials while the budget lasts; then, while trials still run on other hosts (one may die and need
        running again), wait for them, unless that would eat the time the confirmation needs."""
        waited = False
        while True:
            self._trials()
            left = self.time_left()
            if (
                self.stop_requested
                or not self.ledger.others.running
                or (left is not None and left <= self.confirm_reserve_s())
            ):
                break
            self.ledger.wait_for_others(first=not waited)
            waited = True
            self.finished = ""
        if self.ledger.shared:  # a host that joins a finished study says so
            done = self.done_trials()
            if self.n_run == 0 and ((self.opts.n_trials is not None and done >= self.opts.n_trials) or self.finished):
                print(
                    f"study {self.study_name} is finished: {done} trials done; nothing to run"
                    + (f" ({self.finished})" if self.finished else ""),
                    file=sys.stderr,
                )

    def _trials(self) -> None:
        while self.budget_left():
            if self.exhausted():
                self.finished = f"every config of the space is measured ({self.space.size()} configs)"
                break
            if self._dupes >= self.MAX_DUPLICATES:
                self.finished = f"the sampler proposed {self._dupes} measured configs in a row"
                break
            self._next_baseline()
            if self.prior is not None:  # its next pick, when nothing waits
                self.prior.before_ask(self)
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

    # -- the confirmation and the context ladder ---------------------------------------------------------
    def confirm_candidates(self) -> list[confirmlib.Candidate]:
        """Top K configs at the working context by pooled estimate and the llama.cpp-defaults baseline
        (tuner.search.confirm.search_candidates), of the quants within the quality budget."""
        if not self.opts.confirm or self.opts.pareto:
            return []
        limits = self.opts.limits
        return confirmlib.search_candidates(
            self.records,
            self.opts.objective,
            self.opts.confirm,
            admit=lambda r: fits(r, self.hw, limits) and (self.quality is None or self.quality.judge(r)[0]),
            rank=self.prior.rank(self.records) if self.prior is not None and self.prior.active else None,
        )

    def confirm(self) -> dict | None:
        """Re-measure the candidates interleaved, round by round (see tuner.search.confirm); records are state
        confirm."""
        cands = self.confirm_candidates()
        if not cands or self.runner is None:
            return None
        lo, hi = self.opts.confirm_range
        ladder_s = budget.n_ladder_runs(self.space, self.opts) * self.typical_trial_s()

        def keep_going() -> bool:  # the race leaves the ladder its time
            left = self.time_left()
            return not self.stop_requested and (left is None or left > ladder_s)

        self.confirming = cands
        try:
            self.confirmation = confirmlib.run_rounds(
                cands, self._confirm_run, self.opts.objective, lo, hi, keep_going=keep_going
            )
        finally:
            self.confirming = None
        return self.confirmation

    def _confirm_run(self, c: confirmlib.Candidate, rnd: int) -> TrialRecord:
        """One run of the confirmation or the ladder: stored as state confirm, its roles in `baseline`."""
        self.confirm_round = rnd
        try:
            rec = self._run(c.config)
        except TrialInterrupted as e:
            e.record.study, e.record.state, e.record.trial_number = self.study_name, "confirm", c.trial_number
            e.record.baseline = "+".join(c.roles)
            self._write(e.record)
            raise
        finally:
            self.confirm_round = None
        rec.study, rec.state, rec.trial_number = self.study_name, confirmlib.CONFIRM_STATE, c.trial_number
        rec.baseline, rec.confirm_round, rec.drift = "+".join(c.roles), rnd, self.drifting
        self._write(rec)
        if self.on_confirm:
            self.on_confirm(self, c, rec, rnd)
        return rec

    def ladder_candidates(self) -> list[confirmlib.Candidate]:
        """The ladder's runs for the current recommendation (tuner.search.ladder.candidates)."""
        if len(self.space.ladder) < 2 or self.opts.pareto:
            return []
        limits = self.opts.limits
        rec = recommendlib.recommend(self.records, self.hw, limits, self.opts.objective, quality=self.quality)
        if rec is None:
            return []
        return ladderlib.candidates(
            self.space,
            self.records,
            rec["trial_number"],
            self.opts.objective,
            fits=lambda r: fits(r, self.hw, limits),
            allowed=lambda r: self.quality is None or self.quality.judge(r)[0],
        )

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
            return confirmlib.run_ladder(cands, self._confirm_run, self.opts.confirm_range[0], keep_going)
        finally:
            self.laddering = None

    def settle_rung(self) -> None:
        """Step the working rung down the ladder while the trials say it does not fit (tuner.search.ladder.step_down);
        the baselines run again at the new rung."""
        while (lower := ladderlib.step_down(self.space, self.records, self.exhausted())) is not None:
            print(
                f"note: nothing fits at n_ctx {self.space.base.n_ctx} (the search's configs ran out of memory "
                f"there, none completed): the working context steps down the ladder to {lower}",
                file=sys.stderr,
            )
            self.space.set_working(lower)
            self._list_space()
            if (
                self.opts.baselines
                and self.opts.sampler != "grid"
                and not any(r.baseline and r.config.effective_ctx() == lower for r in self.records)
            ):
                # the baselines again, at this rung: the race and the ladder compare with the defaults here
                self._baselines.clear()
                self._enqueue_baselines(again=True)

    def write_recommendation(self) -> dict | None:
        rec = recommendlib.recommend(
            self.records,
            self.hw,
            self.opts.limits,
            self.opts.objective,
            study=self.study_name,
            pareto=self.opts.pareto,
            quality=self.quality,
        )
        if rec is not None:
            if self.prior is not None and self.prior.active:  # the winner: predicted vs measured
                rec["prior"] = self.prior.explain(rec["config"], self.records)
            recommendlib.write(self.dir / recommendlib.RECOMMENDED_FILE, rec)
        return rec

    def best_so_far(self) -> tuple[int, float] | None:
        best = None
        for r in self.records:
            if r.ok and r.searched:
                v = r.objective("tg" if self.opts.pareto else self.opts.objective)
                if v is None:
                    continue
                better = best is None or (
                    v < best[1] if self.opts.objective == "ttft" and not self.opts.pareto else v > best[1]
                )
                if better:
                    best = (r.trial_number, v)
        return best


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

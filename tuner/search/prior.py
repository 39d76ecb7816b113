"""The search's prior: what the planner and the speed model predict for every config, measured first, corrected as
measurements come in.

Before the first trial, every config of the space (a seeded sample of `LIST_LIMIT` of a larger one) gets a predicted
objective from tuner.plan.speed (the rig probe's per-type kernel figures: tg and pp from the model file's tensor
types, the thread count, the GPU layers and the experts kept in RAM) and a verdict from the memory planner (a config
predicted not to fit is never proposed). The speed model covers `MODELLED`; every other dimension (KV-cache types,
micro-batch, flash attention, mmap, ...) is unknown to it: it predicts the same for all its values (neutral), and
only measurements tell them apart.

The method, and why:
  * Enqueued trials, not a new sampler. The search keeps its sampler (TPE), its baselines, its per-load blocks and
    its confirmation race; the prior only decides what the queue holds when nothing waits. A trial of the prior is
    an ordinary trial that TPE learns from (enqueued trials count as its start-up trials, so it models at once
    instead of sampling blind), and a wrong prior costs a few trials, never the search.
  * The start: the `start` best-predicted configs whose load differs (another model file or GPU split): a load is
    what a night on a big model pays for, and the quant file is the term the model gets most wrong (a type the
    probe did not measure borrows a neighbour's figure), so a wrong term costs one of them, not the start.
  * The correction: a ridge regression of log(measured / predicted) on one-hot values of every varying dimension
    (intercept unpenalized): the prediction is the offset, each value's effect is shrunk towards 0 ("the model is
    right", and an unmodelled value is neutral) until measurements pull it away. It is per-dimension and
    multiplicative, as the model's errors are (a type's kernel figure, a thread count's scaling), and it learns the
    unmodelled dimensions' effects from the same measurements; with a few trials it cannot overfit.
  * The lead (`lead`): after the start, when nothing waits, the prior proposes its best corrected config not
    measured yet (ties: the loaded model, then unmodelled values measured least) while one is within `keep` of
    the best corrected estimate; TPE proposes only once none is. On a noisy machine the top configs of the best
    load differ by less than one trial scatters, so a small budget is better spent measuring all of them (the
    fit pools them for the race) than on exploring loads the prediction ranks far below.
  * The blocks: a trial that loaded a model is followed (Search.after_load) by configs of the same load. With the
    prior, they are the best corrected predictions of that load, ties (unmodelled values not yet measured) broken
    towards values not measured yet, and only those within `keep` of the best corrected prediction: a load the
    prior ranks far below the best (the llama.cpp defaults on an F16 file) gets no block.

Example:
    prior = Prior.build(space, infos, probe.load(), "mixed", gpu_offload=False, fits=lambda cfg: True)
    prior.best()  # the predicted-best config and its tg/pp
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import optuna

from tuner.measure.runner import resolve
from tuner.model.meta import ModelInfo
from tuner.plan import probe as probelib
from tuner.plan import speed
from tuner.record import TrialConfig, TrialRecord

# the dimensions tuner.plan.speed predicts from; "model" is the quant file
MODELLED = ("model", "n_threads", "n_threads_batch", "n_gpu_layers", "n_cpu_moe", "cpu_moe")
LIST_LIMIT = 5000  # configs predicted; a larger space is sampled (seeded)
START = 3  # configs of distinct loads measured first
KEEP = 0.85  # a load's block holds only configs within this share of the best corrected prediction
TS = optuna.trial.TrialState
BLOCK = 3  # configs of the same load after one that loaded it (at most the search's --per-load - 1)
RIDGE = 1.0  # the correction's shrinkage (in units of one measurement)
OWN = 3.0  # the race's order: a config's own trials weigh n / (n + OWN) against the fit (Prior.rank)
LEAD = True  # after the start, the prior proposes its best corrected config while one is within KEEP of the best


def load_probe(path: str | None) -> dict | None:
    """This rig's probe (None when there is none: the prior is off); a file of another machine or build raises
    tuner.plan.probe.ProbeError, as `tuner estimate --speed` does."""
    return probelib.load(path)


@dataclass
class Guess:
    """One config's prediction: tg and pp t/s, the objective, and its log-goodness (higher is better)."""

    tg: float
    pp: float
    value: float
    score: float


def objective_of(tg: float, pp: float, cfg: TrialConfig, objective: str) -> float:
    """The search's objective from predicted tg and pp, as TrialRecord.objective computes it from measured ones."""
    if objective == "tg":
        return tg
    if objective == "pp":
        return pp
    if objective == "ttft":
        return 1000.0 * cfg.n_prompt / pp
    return (cfg.n_prompt + cfg.n_gen) / (cfg.n_prompt / pp + cfg.n_gen / tg)


def goodness(value: float, objective: str) -> float:
    """log of the objective, signed so that higher is better (ttft is minimized)."""
    return -math.log(value) if objective == "ttft" else math.log(value)


def speed_at(cache: dict, info: ModelInfo, probe: dict, cfg: TrialConfig, threads: int, gpu_offload: bool):
    """tuner.plan.speed.predict for cfg's model file and split at `threads` (cached: configs share it)."""
    sig = (cfg.model, threads, cfg.n_gpu_layers, cfg.n_cpu_moe, cfg.cpu_moe, cfg.n_prompt, cfg.n_gen)
    if sig not in cache:
        cache[sig] = speed.predict(
            info,
            probe,
            threads,
            n_gpu_layers=cfg.n_gpu_layers,
            n_cpu_moe=cfg.n_cpu_moe,
            cpu_moe=cfg.cpu_moe,
            n_prompt=cfg.n_prompt,
            n_gen=cfg.n_gen,
            gpu_offload=gpu_offload,
        )
    return cache[sig]


@dataclass
class Prior:
    """The predictions over a space and their correction from measurements (see the module docstring)."""

    objective: str
    params: dict[tuple, dict]  # config key → the sampler's params
    configs: dict[tuple, TrialConfig]
    guesses: dict[tuple, Guess]
    fits: dict[tuple, bool]
    dims: list[str]  # every varying dimension (with "model" when there are several files)
    unmodelled: list[str]
    start: int = START
    keep: float = KEEP
    block: int = BLOCK
    ridge: float = RIDGE
    own: float = OWN
    lead: bool = LEAD
    seed: int = 0
    picks: list[tuple] = field(default_factory=list)  # the start, in order
    picked: int = 0
    proposed: set = field(default_factory=set)  # configs the prior queued
    note: str = ""

    # -- building ----------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        space,
        infos: dict[str, ModelInfo],
        probe: dict,
        objective: str,
        gpu_offload: bool,
        fits: Callable[[TrialConfig], bool],
        seed: int = 0,
        **knobs,
    ) -> Prior:
        """Predict every config of `space`. For an architecture or a GPU split the speed model does not cover it
        predicts nothing (`active` is False, `note` says why) and the search runs as without a prior."""
        varying = space.varying()
        names = list(varying)
        dims = names + (["model"] if len(space.models) > 1 else [])
        values = [varying[n].values for n in names]
        combos = [(m, dict(zip(names, c))) for m in space.models for c in itertools.product(*values)]
        if len(combos) > LIST_LIMIT:
            combos = random.Random(seed).sample(combos, LIST_LIMIT)
        out = cls(objective, {}, {}, {}, {}, dims, [d for d in dims if d not in MODELLED], seed=seed, **knobs)
        cache: dict[tuple, speed.SpeedPrediction] = {}
        for model, p in combos:
            cfg = resolve(space.config(model, p), infos[model])
            # tg runs on n_threads, a prompt batch on n_threads_batch (0: the same)
            tg_p, pp_p = (
                speed_at(cache, infos[model], probe, cfg, t, gpu_offload)
                for t in (cfg.n_threads, cfg.n_threads_batch or cfg.n_threads)
            )
            if not (tg_p.pred_tg_tps and pp_p.pred_pp_tps):  # nothing to rank by: the search runs without a prior
                return dataclasses.replace(out, note=tg_p.note or pp_p.note or "no speed prediction", guesses={})
            sp = speed.SpeedPrediction(tg_p.pred_tg_tps, pp_p.pred_pp_tps, cfg.n_threads, cfg.n_gpu_layers, [])
            key = cfg.key()
            if key in out.configs:
                continue
            value = objective_of(sp.pred_tg_tps, sp.pred_pp_tps, cfg, objective)
            out.params[key] = dict(p, **({"model": model} if len(space.models) > 1 else {}))
            out.configs[key] = cfg
            out.guesses[key] = Guess(sp.pred_tg_tps, sp.pred_pp_tps, value, goodness(value, objective))
            out.fits[key] = fits(cfg)
        out.picks = out.start_picks()
        return out

    @property
    def active(self) -> bool:
        return bool(self.guesses)

    def ranked(self) -> list[tuple]:
        """The configs that fit, best predicted first (ties in a seeded order: the prediction cannot tell them)."""
        rng = random.Random(self.seed)
        keys = [k for k in self.guesses if self.fits[k]]
        rng.shuffle(keys)
        return sorted(keys, key=lambda k: -self.guesses[k].score)

    def start_picks(self) -> list[tuple]:
        """The `start` best-predicted configs, each of another load (model file, GPU split, mmap) while there are."""
        out, loads = [], set()
        ranked = self.ranked()
        for k in ranked:
            lk = self.configs[k].load_key()
            if lk not in loads:
                out.append(k)
                loads.add(lk)
            if len(out) >= self.start:
                return out
        return out + [k for k in ranked if k not in out][: self.start - len(out)]

    # -- the correction ------------------------------------------------------------------------------------------
    def measured(self, records: list[TrialRecord]) -> dict[tuple, float]:
        """Each measured config's goodness: the median objective of its completed trials (search and confirmation)."""
        vals: dict[tuple, list[float]] = {}
        for r in records:
            if r.ok and r.config.key() in self.guesses and (v := r.objective(self.objective)):
                vals.setdefault(r.config.key(), []).append(v)
        return {k: goodness(float(np.median(v)), self.objective) for k, v in vals.items() if v}

    def features(self, key: tuple) -> list[tuple]:
        p = self.params[key]
        return [(d, p[d] if d in p else self.configs[key].model) for d in self.dims]

    def corrected(self, records: list[TrialRecord]) -> dict[tuple, float]:
        """Every config's corrected goodness: its prediction plus the ridge fit of log(measured / predicted) on its
        dimensions' values."""
        meas = self.measured(records)
        base = {k: g.score for k, g in self.guesses.items()}
        if not meas:
            return base
        cols = sorted({f for k in self.guesses for f in self.features(k)}, key=repr)
        idx = {f: i + 1 for i, f in enumerate(cols)}
        keys = list(meas)
        x = np.zeros((len(keys), len(cols) + 1))
        x[:, 0] = 1.0
        for row, k in enumerate(keys):
            for f in self.features(k):
                x[row, idx[f]] = 1.0
        y = np.array([meas[k] - base[k] for k in keys])
        pen = np.eye(len(cols) + 1) * self.ridge
        pen[0, 0] = 0.0  # the common error (this machine slower than its probe today) is not shrunk
        beta = np.linalg.solve(x.T @ x + pen, x.T @ y)
        return {k: base[k] + beta[0] + sum(beta[idx[f]] for f in self.features(k)) for k in self.guesses}

    def rank(self, records: list[TrialRecord]) -> Callable[[TrialConfig], float | None]:
        """The race's order (tuner.search.confirm.search_candidates): a measured config's corrected estimate,
        its own measurements weighted n / (n + `own`) against what the fit says of its dimensions' values. On a
        noisy machine one trial scatters more than the top configs differ; the fit pools every trial that shares
        a value, so it tells the top configs apart better than their own single trials do."""
        corr = self.corrected(records)
        meas = self.measured(records)
        counts: dict[tuple, int] = {}
        for r in records:
            if r.ok and r.searched:
                counts[r.config.key()] = counts.get(r.config.key(), 0) + 1

        def score(cfg: TrialConfig) -> float | None:
            k = cfg.key()
            if k not in corr or k not in meas:
                return None
            w = counts.get(k, 1) / (counts.get(k, 1) + self.own)
            return corr[k] + w * (meas[k] - corr[k])

        return score

    # -- proposing ---------------------------------------------------------------------------------------------
    def next_start(self, measured: set) -> dict | None:
        """The params of the next start pick not measured yet (None when the start is done)."""
        while self.picked < len(self.picks):
            k = self.picks[self.picked]
            self.picked += 1
            if k not in measured:
                self.proposed.add(k)
                return self.params[k]
        return None

    def block_params(
        self, records: list[TrialRecord], load_key: tuple | None, n: int, prefer: tuple | None = None
    ) -> list[dict]:
        """Up to n configs of this load (None: of any load), not measured yet, best corrected first, within
        `keep` of the best corrected prediction; ties broken towards unmodelled values measured least."""
        n = min(n, self.block)
        if n <= 0:
            return []
        corr = self.corrected(records)
        meas = self.measured(records)
        seen = {r.config.key() for r in records if r.measured_config}
        fit_keys = [k for k in corr if self.fits[k]]
        if not fit_keys:
            return []
        top = max(corr[k] for k in fit_keys)
        counts: dict[tuple, int] = {}
        for k in meas:
            for f in self.features(k):
                counts[f] = counts.get(f, 0) + 1
        rng = random.Random(self.seed * 7919 + len(records))
        cands = [
            k
            for k in fit_keys
            if k not in seen
            and (load_key is None or self.configs[k].load_key() == load_key)
            and corr[k] >= top + math.log(self.keep)
        ]
        rng.shuffle(cands)
        out = []
        for _ in range(n):
            if not cands:
                break
            # round corrected scores to 1 %: within it the prediction cannot choose, and exploring can
            best = max(
                cands,
                key=lambda k: (
                    round(corr[k] * 100),
                    self.configs[k].load_key() == prefer,  # the loaded model: no reload
                    -sum(counts.get(f, 0) for f in self.features(k) if f[0] in self.unmodelled),
                ),
            )
            cands.remove(best)
            for f in self.features(best):
                counts[f] = counts.get(f, 0) + 1
            self.proposed.add(best)
            out.append(self.params[best])
        return out

    # -- the search's hooks (tuner.search.loop.Search) --------------------------------------------------------------
    def before_ask(self, search) -> None:
        """Queue the next start pick when nothing waits (the baselines and a load's block go first); after the
        start (`lead`), the best corrected config not measured yet while one is within `keep` of the best
        corrected estimate, and the sampler's own pick when none is."""
        if not self.active or search.study.get_trials(deepcopy=False, states=(TS.WAITING,)):
            return
        params = self.next_start(set(search.seen))
        if params is None and self.lead:
            records = [r for r in search.records if r.searched]
            last = next((r.config.load_key() for r in reversed(records) if r.ok), None)
            nxt = self.block_params(records, None, 1, prefer=last)
            params = nxt[0] if nxt else None
        if params is not None:
            search.study.enqueue_trial(params, user_attrs={"enqueued": "prior"})

    def fill_block(self, search, load_key: tuple, n: int) -> int:
        """Queue the block after a trial that loaded a model (Search.after_load): how many were queued."""
        if not self.active:
            return 0
        block = self.block_params([r for r in search.records if r.searched], load_key, n)
        for params in block:
            search.study.enqueue_trial(params, user_attrs={"enqueued": "same load"})
        return len(block)

    # -- what it says -----------------------------------------------------------------------------------------
    def best(self) -> dict | None:
        """The predicted-best config that fits: its params, predicted tg/pp and objective (the dry run's answer)."""
        ranked = self.ranked()
        if not ranked:
            return None
        k = ranked[0]
        return self.describe(k) | {"config": self.configs[k].to_dict()}

    def describe(self, key: tuple) -> dict:
        g = self.guesses[key]
        return {
            "params": self.params[key],
            "pred_tg_tps": g.tg,
            "pred_pp_tps": g.pp,
            "pred_objective": g.value,
            "objective": self.objective,
        }

    def summary(self) -> dict:
        """For `tuner search --dry-run`: the predicted best, the start, and what the model does not cover."""
        return {
            "best": self.best(),
            "start": [self.describe(k) for k in self.picks],
            "configs_predicted": len(self.guesses),
            "modelled": [d for d in self.dims if d in MODELLED],
            "unmodelled": self.unmodelled,
            "note": self.note,
        }

    def explain(self, cfg: dict, records: list[TrialRecord]) -> dict | None:
        """Predicted vs measured for a recommended config (recommended.json's "prior")."""
        c = TrialConfig.from_dict({**cfg, "overrides": tuple(cfg.get("overrides", ()))})
        k = c.key()
        if k not in self.guesses:
            return None
        meas = self.measured(records).get(k)
        sign = -1 if self.objective == "ttft" else 1
        corr = self.corrected(records).get(k)
        return self.describe(k) | {
            "measured_objective": None if meas is None else math.exp(sign * meas),
            "corrected_objective": None if corr is None else math.exp(sign * corr),
            "proposed_by_prior": k in self.proposed,
            "unmodelled": self.unmodelled,
        }

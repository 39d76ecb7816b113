"""Confirmation: the winner is decided on fresh, interleaved samples, not on the best of N noisy trials.

The best trial of a search is the maximum over many noisy measurements, so its figure is inflated (the winner's
curse) and the choice between close configs is a coin toss. Before a recommendation is written, the top K
configs (by their pooled estimate), the llama.cpp-defaults baseline and the best config of every other rung of
the context ladder are re-measured round by round, in a rotating order, as the CI gate measures both sides
(tuner compare). A round ends when every candidate ran once; after `min_rounds` the loop stops as soon as the
best two are told apart, else at `max_rounds`.

Judgement, as `tuner compare` judges: the objective's repetition samples of all rounds pooled per config; two
configs differ when a two-sided Mann-Whitney U test gives p < alpha AND the medians differ by more than
`min_effect`. Each candidate gets a bootstrap 95 % interval of its median; the ratio to the baseline gets a
bootstrap interval too. When the best cannot be told apart from others, the one of them with the most memory
headroom (least peak RAM + VRAM) wins, and the verdict says so.

Everything here is derived from TrialRecords (state "confirm"), so `tuner recommend` re-derives the same verdict
from trials.parquet without running anything.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tuner.record import TrialConfig, TrialRecord

DEFAULT_K = 3
MIN_ROUNDS = 3
MAX_ROUNDS = 6
ALPHA = 0.05
MIN_EFFECT = 0.01  # medians closer than 1 % are a tie for every practical purpose
BOOT = 2000
CONFIRM_STATE = "confirm"
ROLE_TOP, ROLE_BASELINE, ROLE_LADDER = "candidate", "llama.cpp defaults", "ladder"
# How a config is measured, not what: left out of the pooling key (as in tuner compare).
NOT_KEY = ("repetitions", "warmup")


def config_key(cfg: TrialConfig) -> tuple:
    """Trials of one config pool into one estimate, whichever trial (or confirmation round) measured them."""
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(cfg.to_dict().items())
                 if k not in NOT_KEY)


def objective_samples(rec: TrialRecord, objective: str) -> list[float]:
    """One value per repetition. mixed: the end-to-end t/s of one request, from the same repetition's pp and tg."""
    if objective == "mixed":
        c = rec.config
        if rec.pp_samples and rec.tg_samples:
            return [(c.n_prompt + c.n_gen) / (c.n_prompt / pp + c.n_gen / tg)
                    for pp, tg in zip(rec.pp_samples, rec.tg_samples) if pp > 0 and tg > 0]
        return list(rec.tg_samples or rec.pp_samples)
    return list({"tg": rec.tg_samples, "pp": rec.pp_samples, "ttft": rec.ttft_samples_ms}[objective])


def higher_is_better(objective: str) -> bool:
    return objective != "ttft"


@dataclass
class Pooled:
    """Every ok trial of one config: one estimate, the worst memory peak."""

    key: tuple
    records: list[TrialRecord] = field(default_factory=list)

    @property
    def config(self) -> TrialConfig:
        return self.records[0].config

    @property
    def trial_number(self) -> int | None:
        return min((r.trial_number for r in self.records if r.trial_number is not None), default=None)

    def samples(self, objective: str) -> list[float]:
        return [x for r in self.records for x in objective_samples(r, objective)]

    def estimate(self, objective: str) -> float | None:
        s = self.samples(objective)
        return statistics.fmean(s) if s else None

    def metric_samples(self, name: str) -> list[float]:
        return [x for r in self.records for x in {"tg": r.tg_samples, "pp": r.pp_samples,
                                                   "ttft": r.ttft_samples_ms}[name]]

    @property
    def peak_rss(self) -> int | None:
        return max((r.peak_rss_bytes for r in self.records if r.peak_rss_bytes), default=None)

    @property
    def peak_vram(self) -> int | None:
        return max((r.peak_vram_bytes for r in self.records if r.peak_vram_bytes is not None), default=None)

    @property
    def memory(self) -> int:
        return (self.peak_rss or 0) + (self.peak_vram or 0)

    @property
    def drift(self) -> bool:
        return any(r.drift for r in self.records)


def pool(records: list[TrialRecord]) -> list[Pooled]:
    """Group ok records by config (first-seen order)."""
    groups: dict[tuple, Pooled] = {}
    for r in records:
        if r.ok:
            groups.setdefault(config_key(r.config), Pooled(config_key(r.config))).records.append(r)
    return list(groups.values())


def bootstrap_median(x: list[float], seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the median."""
    a = np.asarray(x, dtype=float)
    if len(a) < 2:
        return (float(a[0]), float(a[0])) if len(a) else (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    meds = np.median(a[rng.integers(0, len(a), size=(BOOT, len(a)))], axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_ratio(num: list[float], den: list[float], seed: int = 0) -> tuple[float, float, float]:
    """median(num) / median(den) with a percentile bootstrap 95 % interval (each side resampled on its own)."""
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    ratio = float(np.median(a) / np.median(b))
    if len(a) < 2 or len(b) < 2:
        return ratio, ratio, ratio
    rng = np.random.default_rng(seed)
    ra = np.median(a[rng.integers(0, len(a), size=(BOOT, len(a)))], axis=1)
    rb = np.median(b[rng.integers(0, len(b), size=(BOOT, len(b)))], axis=1)
    lo, hi = np.percentile(ra / rb, [2.5, 97.5])
    return ratio, float(lo), float(hi)


def differ(a: list[float], b: list[float], alpha: float = ALPHA, min_effect: float = MIN_EFFECT) -> tuple[bool, float]:
    """Two configs differ when the medians are > min_effect apart AND Mann-Whitney U says p < alpha."""
    from tuner.compare import p_value

    if len(a) < 2 or len(b) < 2:
        return False, 1.0
    ma, mb = statistics.median(a), statistics.median(b)
    p = p_value(a, b, "mannwhitney")
    effect = abs(ma - mb) / abs(mb) if mb else 0.0
    return (p < alpha and effect > min_effect), p


@dataclass
class Candidate:
    role: str  # ROLE_TOP, ROLE_BASELINE or ROLE_LADDER
    config: TrialConfig
    trial_number: int | None  # the search trial it stands for
    records: list[TrialRecord] = field(default_factory=list)  # its confirmation runs
    roles: list[str] = field(default_factory=list)  # a config can be a top candidate and the baseline at once

    @property
    def failed(self) -> bool:
        return any(not r.ok for r in self.records)

    def samples(self, objective: str) -> list[float]:
        return [x for r in self.records if r.ok for x in objective_samples(r, objective)]

    def memory(self) -> int:
        return max(((r.peak_rss_bytes or 0) + (r.peak_vram_bytes or 0) for r in self.records if r.ok), default=0)


def candidates_from_records(records: list[TrialRecord]) -> list[Candidate]:
    """The confirmation as it was run, from its records (state "confirm"; `baseline` holds the roles)."""
    out: dict[tuple, Candidate] = {}
    for r in records:
        if r.state != CONFIRM_STATE:
            continue
        k = config_key(r.config)
        if k not in out:
            roles = [x for x in r.baseline.split("+") if x] or [ROLE_TOP]
            out[k] = Candidate(roles[0], r.config, r.trial_number, roles=roles)
        out[k].records.append(r)
    return list(out.values())


def rounds_of(cands: list[Candidate]) -> int:
    return max((len(c.records) for c in cands), default=0)


def assess(cands: list[Candidate], objective: str, alpha: float = ALPHA, min_effect: float = MIN_EFFECT,
           fits: Callable[[Candidate], bool] | None = None) -> dict:
    """The verdict of a confirmation: winner, why, each candidate's median and interval, ratio to the baseline."""
    sign = 1 if higher_is_better(objective) else -1
    rows = []
    for c in cands:
        s = c.samples(objective)
        lo, hi = bootstrap_median(s) if s else (None, None)
        rows.append({"trial_number": c.trial_number, "roles": c.roles or [c.role], "n_ctx": c.config.effective_ctx(),
                     "config": _short(c.config), "runs": len(c.records), "failed_runs": sum(not r.ok for r in c.records),
                     "samples": s, "median": statistics.median(s) if s else None, "ci95": [lo, hi],
                     "peak_memory_bytes": c.memory() or None})
    competing = [(c, row) for c, row in zip(cands, rows)
                 if ROLE_LADDER not in (c.roles or [c.role]) and row["median"] is not None and not c.failed
                 and (fits is None or fits(c))]
    out = {"objective": objective, "rounds": rounds_of(cands), "alpha": alpha, "min_effect": min_effect,
           "test": "Mann-Whitney U on the pooled repetition samples + a practical threshold; bootstrap 95 % "
                   "intervals of the median",
           "candidates": rows}
    if not competing:
        out.update(verdict="none", reason="no candidate completed its confirmation runs", winner=None)
        return out
    competing.sort(key=lambda cr: -sign * cr[1]["median"])
    best_c, best_row = competing[0]
    ties = []
    for c, row in competing[1:]:
        d, p = differ(best_c.samples(objective), c.samples(objective), alpha, min_effect)
        row["p_vs_best"] = p
        if not d:
            ties.append((c, row))
    if len(competing) == 1:
        winner, verdict = best_c, "single"
        reason = "only one candidate completed its confirmation runs"
    elif not ties:
        winner, verdict = best_c, "separated"
        second = competing[1][1]
        reason = (f"trial #{best_row['trial_number']} is ahead of every other candidate "
                  f"(next: #{second['trial_number']}, {_pct(best_row['median'], second['median'])}, "
                  f"p {second['p_vs_best']:.3g} < {alpha:g})")
    else:
        pool_ = [(best_c, best_row)] + ties
        winner, wrow = min(pool_, key=lambda cr: (cr[0].memory() or float("inf"), -sign * cr[1]["median"]))
        verdict = "tie"
        names = ", ".join(f"#{r['trial_number']}" for _, r in pool_)
        if winner is best_c:
            reason = (f"{names} cannot be told apart (differences within {min_effect:.0%} or not significant at "
                      f"alpha {alpha:g}); #{wrow['trial_number']} is the fastest of them and also leaves the most "
                      "memory headroom")
        else:
            reason = (f"{names} cannot be told apart (differences within {min_effect:.0%} or not significant at "
                      f"alpha {alpha:g}); #{wrow['trial_number']} leaves the most memory headroom, so it is "
                      f"preferred over the nominally fastest #{best_row['trial_number']}")
    out.update(verdict=verdict, reason=reason, winner=winner.trial_number, winner_key=list(config_key(winner.config)))
    base = next((c for c in cands if ROLE_BASELINE in (c.roles or [c.role]) and c.samples(objective)), None)
    if base is not None:
        ws, bs = winner.samples(objective), base.samples(objective)
        num, den = (ws, bs) if sign > 0 else (bs, ws)
        r, lo, hi = bootstrap_ratio(num, den)
        d, p = differ(ws, bs, alpha, min_effect)
        # told apart only when the test says so AND the interval of the ratio excludes 1
        d = d and (lo > 1 or hi < 1)
        out["vs_baseline"] = {"trial_number": base.trial_number, "ratio": r, "ci95": [lo, hi], "p": p,
                              "verdict": ("same config" if base is winner else
                                          ("faster" if r > 1 else "slower") if d else "tie")}
    return out


def _pct(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.1f} %" if b else "n/a"


def _short(cfg: TrialConfig) -> dict:
    d = cfg.to_dict()
    return {k: d[k] for k in ("model", "n_gpu_layers", "n_ctx", "n_threads", "n_threads_batch", "n_batch",
                              "n_ubatch", "flash_attn", "type_k", "type_v", "use_mmap", "n_cpu_moe")}


def run_rounds(cands: list[Candidate], measure: Callable[[Candidate, int], TrialRecord], objective: str,
               min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS, alpha: float = ALPHA,
               min_effect: float = MIN_EFFECT, keep_going: Callable[[], bool] = lambda: True) -> dict:
    """Measure every candidate once per round, in a rotating order; stop once the best is told apart.

    `measure(candidate, round)` runs one confirmation trial and returns its record (already stored by the
    caller). A candidate whose run fails is dropped from later rounds. `keep_going()` is asked between runs:
    the time budget or a Ctrl-C ends the confirmation early, and the verdict says how many rounds ran.
    """
    for rnd in range(max_rounds):
        live = [c for c in cands if not c.failed]
        if not live:
            break
        shift = rnd % len(live)
        for c in live[shift:] + live[:shift]:  # rotate: no candidate is always measured first (or last)
            if not keep_going():
                return assess(cands, objective, alpha, min_effect) | {"stopped_early": True}
            c.records.append(measure(c, rnd))
        if rnd + 1 >= min_rounds and assess(cands, objective, alpha, min_effect)["verdict"] in ("separated", "single"):
            break
    return assess(cands, objective, alpha, min_effect)

"""Confirmation: the winner is decided on fresh, interleaved samples, not on the best of N noisy trials.

The best trial of a search is the maximum over many noisy measurements, so its figure is inflated (the winner's
curse) and the choice between close configs is a coin toss. Before a recommendation is written, the top K
configs (by their figure: the median of their trial values) and the llama.cpp-defaults baseline are re-measured
round by round, interleaved, in an order that reloads least (`run_order`).

A race: after each round from the race's minimum on (the fewest rounds at which the paired test can reach
p < alpha), a candidate that the paired test puts behind the current best leaves; the loop ends when one
candidate remains or at the round limit. The baseline stays only while the "x defaults" verdict still needs it
(until every remaining candidate is ahead of it).

The context ladder (`run_ladder`) comes after the race: the winner, the defaults and the winner's alternatives
(tuner.search.space.CONTEXT_DIMS) at every rung, each filled to the rung's depth, for the race's minimum of rounds,
interleaved across rungs; its runs carry RUNG roles and never enter the race.

Judgement (tuner.stats, the one rule): a round's value is the median of its repetitions; candidates are ranked by
the median of their round values; the best is "told apart" from a candidate when the one-sided exact Wilcoxon
signed-rank test on their per-round log ratios (the rounds both ran) gives p < alpha AND the median per-round
ratio is beyond `min_effect`. When the best cannot be told apart from others, the one of them that uses memory
that matters less (tuner.stats.memory_matters: at least 64 MiB and 2 % less) wins, and the verdict says so.
Each candidate gets a bootstrap 95 % interval of its median; the ratio to the baseline gets a paired one.

Everything here is derived from TrialRecords (state "confirm", with their round), so `tuner recommend`
re-derives the same verdict from trials.parquet without running anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from tuner import stats
from tuner.record import TrialConfig, TrialRecord

DEFAULT_K = 3
ALPHA = 0.05
MIN_EFFECT = 0.01  # medians closer than 1 % are a tie for every practical purpose
# "behind the best" is one-sided: the exact Wilcoxon test reaches p < 0.05 from 5 rounds on (1/32)
MIN_ROUNDS = stats.min_rounds(ALPHA, "greater")
MAX_ROUNDS = 8
CONFIRM_STATE = "confirm"
ROLE_TOP, ROLE_BASELINE = "candidate", "llama.cpp defaults"
# llama-server's own placement (common/fit.cpp, on by default): on a rig with devices, the baseline the headline
# "x the llama.cpp defaults" is against, raced beside the all-layers defaults
ROLE_FIT = "llama-server default (--fit)"
BASELINE_ROLES = (ROLE_FIT, ROLE_BASELINE)
ROLE_RECIPE = "community recipe (-ngl 99, the fewest --n-cpu-moe that fits)"  # measured in the search, not raced
# the ladder's runs: the recommended config at a rung, the defaults there, and alternatives to the recommended
# config in a context-dependent dimension (ALT) or, as a control, in a context-independent one (CONTROL)
RUNG, RUNG_DEFAULTS, RUNG_ALT, RUNG_CONTROL = "rung", "rung defaults", "rung alternative", "rung control"
RUNG_ROLES = (RUNG, RUNG_DEFAULTS, RUNG_ALT, RUNG_CONTROL)
LADDER_OF = "ladder@"  # + the recommended trial's number: which ladder a run belongs to (a resumed study may
# measure a second one for another winner; the two never pool)
# Trials of one config pool into one estimate, whichever trial (or confirmation round) measured them: the key
# is TrialConfig.key.


def objective_samples(rec: TrialRecord, objective: str) -> list[float]:
    """One value per repetition. mixed: the end-to-end t/s of one request (with --parallel: of the N together;
    mixed_stream: of one of them), from the same repetition's pp and tg."""
    if objective in ("mixed", "mixed_stream"):
        c, sfx = rec.config, objective[5:]
        pps, tgs = rec.samples("pp" + sfx), rec.samples("tg" + sfx)
        if pps and tgs:
            return [
                (c.n_prompt + c.n_gen) / (c.n_prompt / pp + c.n_gen / tg)
                for pp, tg in zip(pps, tgs)
                if pp > 0 and tg > 0
            ]
        return list(tgs or pps)
    return list(rec.samples(objective))


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

    def trial_values(self, objective: str) -> list[float]:
        return [v for r in self.records if (v := stats.trial_value(objective_samples(r, objective))) is not None]

    def estimate(self, objective: str) -> float | None:
        """The config's figure (tuner.stats.center): what the search ranks the top K by, as the confirmation does."""
        return stats.center(self.trial_values(objective))

    def metric_samples(self, name: str) -> list[float]:
        return [x for r in self.records for x in r.samples(name)]

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


def prefer_clean(groups: list[Pooled]) -> list[Pooled]:
    """Configs measured under drift are the last choice at their context, not dropped: a context (a rung of the
    ladder) measured only under drift keeps its configs; the confirmation re-measures them interleaved anyway."""
    clean = {g.config.effective_ctx() for g in groups if not g.drift}
    return [g for g in groups if not g.drift or g.config.effective_ctx() not in clean]


def pool(records: list[TrialRecord]) -> list[Pooled]:
    """Group ok records by config (first-seen order)."""
    groups: dict[tuple, Pooled] = {}
    for r in records:
        if r.ok:
            groups.setdefault(r.config.key(), Pooled(r.config.key())).records.append(r)
    return list(groups.values())


def run_order(items: list, rnd: int, config=lambda x: x) -> list:
    """One round's run order: items sharing a load key (model, GPU layers, mmap...) back to back, so a reused
    worker reloads once per group; every odd round reversed (A B | B A), so no group and no item is always
    first (benchmarks/fidelity.py measured an 8 % position effect) and the boundary between rounds reloads
    nothing. `config(item)` gives the item's TrialConfig."""
    groups: dict[tuple, list] = {}
    for x in items:
        groups.setdefault(config(x).load_key(), []).append(x)
    order = [x for g in groups.values() for x in g]
    return order[::-1] if rnd % 2 else order


@dataclass
class Candidate:
    role: str  # ROLE_TOP, ROLE_BASELINE or one of RUNG_ROLES
    config: TrialConfig
    trial_number: int | None  # the search trial it stands for
    records: list[TrialRecord] = field(default_factory=list)  # its confirmation runs
    roles: list[str] = field(default_factory=list)  # a config can be a top candidate and the baseline at once
    left: str = ""  # why it left the race (empty while it races)

    @property
    def failed(self) -> bool:
        return any(not r.ok for r in self.records)

    @property
    def racing(self) -> bool:
        return not self.left and not self.failed

    def has(self, role: str) -> bool:
        return role in (self.roles or [self.role])

    @property
    def is_rung(self) -> bool:
        """A run of the context ladder (never a rival in the race)."""
        return any(self.has(r) for r in RUNG_ROLES)

    @property
    def ladder(self) -> int | None:
        """The trial number of the recommendation whose ladder this run belongs to."""
        return next((int(r[len(LADDER_OF) :]) for r in self.roles if r.startswith(LADDER_OF)), None)

    @property
    def n_ctx(self) -> int:
        return self.config.effective_ctx()

    def samples(self, objective: str) -> list[float]:
        return [x for r in self.records if r.ok for x in objective_samples(r, objective)]

    def rounds(self, objective: str) -> dict[int, float]:
        """Round → the round's value (tuner.stats.trial_value), oriented so that larger is better."""
        out = {}
        for i, r in enumerate(self.records):
            v = stats.trial_value(objective_samples(r, objective)) if r.ok else None
            if v:
                out[r.confirm_round if r.confirm_round is not None else i] = (
                    v if higher_is_better(objective) else 1.0 / v
                )
        return out

    def figure(self, objective: str) -> float | None:
        """The median of its round values, in the objective's own unit."""
        return stats.center(
            [x for r in self.records if r.ok and (x := stats.trial_value(objective_samples(r, objective))) is not None]
        )

    def memory(self) -> int:
        return max(((r.peak_rss_bytes or 0) + (r.peak_vram_bytes or 0) for r in self.records if r.ok), default=0)


def candidates_from_records(records: list[TrialRecord]) -> list[Candidate]:
    """The confirmation as it was run, from its records (state "confirm"; `baseline` holds the roles). The race's
    runs and the ladder's are separate candidates, even of one config (the ladder pairs its own rounds)."""
    out: dict[tuple, Candidate] = {}
    for r in records:
        if r.state != CONFIRM_STATE or r.outcome == "interrupted":  # stopped by the user: run again on resume
            continue
        roles = [x for x in r.baseline.split("+") if x] or [ROLE_TOP]
        k = (r.config.key(), tuple(x for x in roles if x.startswith(LADDER_OF)), any(x in RUNG_ROLES for x in roles))
        if k not in out:
            out[k] = Candidate(roles[0], r.config, r.trial_number, roles=roles)
        out[k].records.append(r)
    return list(out.values())


def search_candidates(
    records: list[TrialRecord],
    objective: str,
    k: int,
    admit: Callable[[TrialRecord], bool],
    rank: Callable[[TrialConfig], float | None] | None = None,
) -> list[Candidate]:
    """The race's candidates after a search: the top `k` configs at the working context by pooled estimate and the
    llama.cpp-defaults baseline, each with the confirmation rounds it already has (a resumed race goes on).
    `admit(record)`: the record may be recommended (within the limits and the quality budget); `rank(config)`:
    another order, higher first (the prior's corrected estimate, tuner.search.prior), the pooled estimate where
    it says None."""
    searched = [r for r in records if r.searched and r.ok and r.objective(objective) is not None and admit(r)]
    groups = prefer_clean(pool(searched))
    if not groups:
        return []
    sign = -1 if objective == "ttft" else 1
    groups.sort(key=lambda g: -sign * g.estimate(objective))
    if rank is not None:
        ranks = [rank(g.config) for g in groups]
        if None not in ranks:
            groups = [g for _, g in sorted(zip(ranks, groups), key=lambda x: -x[0])]
    working = max(g.config.effective_ctx() for g in groups)
    cands: dict[tuple, Candidate] = {}
    for g in [g for g in groups if g.config.effective_ctx() == working][:k]:
        cands[g.key] = Candidate(ROLE_TOP, g.config, g.trial_number, roles=[ROLE_TOP])
    for role in BASELINE_ROLES:
        base = next(
            (g for g in groups if any(r.baseline == role for r in g.records) and g.config.effective_ctx() == working),
            None,
        )
        if base is not None:
            c = cands.setdefault(base.key, Candidate(role, base.config, base.trial_number, roles=[]))
            c.roles.append(role)
    earlier = {c.config.key(): c for c in candidates_from_records(records) if not c.is_rung}
    for key, c in cands.items():  # a resumed confirmation goes on from the rounds it has
        if key in earlier:
            c.records = list(earlier[key].records)
    return list(cands.values())


def rounds_of(cands: list[Candidate]) -> int:
    return max((len(c.records) for c in cands), default=0)


def versus(
    a: Candidate, b: Candidate, objective: str, alpha: float, min_effect: float, alternative: str = "greater"
) -> stats.Comparison:
    """A against B on the rounds both ran, paired by round (tuner.stats.compare); "greater": is A ahead?"""
    ra, rb = a.rounds(objective), b.rounds(objective)
    common = sorted(set(ra) & set(rb))
    return stats.compare(
        [ra[i] for i in common],
        [rb[i] for i in common],
        paired=True,
        alpha=alpha,
        min_effect=min_effect,
        alternative=alternative,
    )


def competing(cands: list[Candidate], objective: str, fits: Callable[[Candidate], bool] | None = None) -> list:
    """Candidates that can win (not a ladder run, no failed run, within the limits), best first."""
    out = [c for c in cands if not c.is_rung and not c.failed and c.rounds(objective) and (fits is None or fits(c))]
    return sorted(out, key=lambda c: -stats.center(list(c.rounds(objective).values())))


def assess(
    cands: list[Candidate],
    objective: str,
    alpha: float = ALPHA,
    min_effect: float = MIN_EFFECT,
    fits: Callable[[Candidate], bool] | None = None,
) -> dict:
    """The verdict of a confirmation: winner, why, each candidate's median and interval, ratio to the baseline."""
    rows = []
    for c in cands:
        # back in the objective's own unit (rounds() inverts a lower-is-better objective)
        vals = [v if higher_is_better(objective) else 1.0 / v for v in c.rounds(objective).values()]
        lo, hi = stats.median_ci(vals) if vals else (None, None)
        rows.append(
            {
                "trial_number": c.trial_number,
                "roles": c.roles or [c.role],
                "n_ctx": c.config.effective_ctx(),
                "config": short_config(c.config),
                "runs": len(c.records),
                "failed_runs": sum(not r.ok for r in c.records),
                "samples": c.samples(objective),
                "round_values": vals,
                "median": c.figure(objective),
                "ci95": [lo, hi],
                "peak_memory_bytes": c.memory() or None,
            }
        )
    row_of = {id(c): row for c, row in zip(cands, rows)}
    comp = competing(cands, objective, fits)
    out = {
        "objective": objective,
        "rounds": rounds_of(cands),
        "alpha": alpha,
        "min_effect": min_effect,
        "test": "one-sided exact Wilcoxon signed-rank on the per-round log ratios (rounds paired; a round's value "
        "is the median of its repetitions) + the median per-round ratio beyond the threshold; bootstrap "
        "95 % intervals (tuner.stats)",
        "candidates": rows,
    }
    if not comp:
        out.update(verdict="none", reason="no candidate completed its confirmation runs", winner=None)
        return out
    best = comp[0]
    best_row = row_of[id(best)]
    ties = []
    for c in comp[1:]:
        v = versus(best, c, objective, alpha, min_effect)
        row_of[id(c)]["p_vs_best"] = v.p
        if not v.differ:
            ties.append(c)
    if len(comp) == 1:
        winner, verdict = best, "single"
        reason = "only one candidate completed its confirmation runs"
    elif not ties:
        winner, verdict = best, "separated"
        second = row_of[id(comp[1])]
        reason = (
            f"trial #{best_row['trial_number']} is ahead of every other candidate "
            f"(next: #{second['trial_number']}, {_pct(best_row['median'], second['median'])}, "
            f"p {second['p_vs_best']:.3g} < {alpha:g})"
        )
    else:
        pool_ = [best] + ties
        # memory breaks the tie only when the saving matters (tuner.stats.memory_matters); else the fastest
        leaner = [c for c in ties if stats.memory_matters(c.memory(), best.memory())]
        winner = min(leaner, key=lambda c: c.memory()) if leaner else best
        wrow = row_of[id(winner)]
        verdict = "tie"
        names = ", ".join(f"#{row_of[id(c)]['trial_number']}" for c in pool_)
        why = f"{names} cannot be told apart (within {min_effect:.0%} or not significant at alpha {alpha:g})"
        if winner is best:
            reason = (
                f"{why}; #{wrow['trial_number']} is the fastest of them, and no other saves memory that "
                f"matters (>= {stats.MEMORY_MIN_BYTES >> 20} MiB and {stats.MEMORY_MIN_SHARE:.0%})"
            )
        else:
            saved = best.memory() - winner.memory()
            reason = (
                f"{why}; #{wrow['trial_number']} leaves {saved / 2**20:.0f} MiB more memory headroom, so it is "
                f"preferred over the nominally fastest #{best_row['trial_number']}"
            )
    out.update(verdict=verdict, reason=reason, winner=winner.trial_number, winner_key=list(winner.config.key()))
    for role, key in ((ROLE_BASELINE, "vs_baseline"), (ROLE_FIT, "vs_fit")):
        base = next((c for c in cands if c.has(role) and c.rounds(objective)), None)
        if base is not None:
            vs = _vs(winner, base, objective, alpha, min_effect)
            if base is winner:
                vs["verdict"] = "same config"
            out[key] = {"trial_number": base.trial_number, **vs}
    return out


def _pct(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.1f} %" if b else "n/a"


def short_config(cfg: TrialConfig) -> dict:
    d = cfg.to_dict()
    return {
        k: d[k]
        for k in (
            "model",
            "n_gpu_layers",
            "n_ctx",
            "n_threads",
            "n_threads_batch",
            "n_batch",
            "n_ubatch",
            "flash_attn",
            "type_k",
            "type_v",
            "use_mmap",
            "n_cpu_moe",
            "moe_part",
        )
    }


def race(
    cands: list[Candidate],
    objective: str,
    done: int,
    min_rounds: int = MIN_ROUNDS,
    alpha: float = ALPHA,
    min_effect: float = MIN_EFFECT,
) -> None:
    """After round `done` (1-based count): candidates the paired test puts behind the current best leave."""
    if done < min_rounds:
        return
    comp = [c for c in competing([c for c in cands if c.racing], objective)]
    if not comp:
        return
    best = comp[0]
    for c in comp[1:]:
        v = versus(best, c, objective, alpha, min_effect)
        if not v.differ:
            continue
        if any(c.has(r) for r in BASELINE_ROLES) and not c.has(ROLE_TOP):
            # the "x defaults" figure needs the baseline until whoever wins is ahead of it
            if not all(versus(o, c, objective, alpha, min_effect).differ for o in comp if o is not c):
                continue
        c.left = f"behind #{best.trial_number} after {done} rounds (p {v.p:.3g})"


def remaining_runs(cands: list[Candidate], max_rounds: int) -> int:
    """Runs the race can still take at most: every candidate still racing, to the round limit."""
    done = rounds_of(cands)
    return sum(max_rounds - len(c.records) for c in cands if c.racing) if done < max_rounds else 0


def run_rounds(
    cands: list[Candidate],
    measure: Callable[[Candidate, int], TrialRecord],
    objective: str,
    min_rounds: int = MIN_ROUNDS,
    max_rounds: int = MAX_ROUNDS,
    alpha: float = ALPHA,
    min_effect: float = MIN_EFFECT,
    keep_going: Callable[[], bool] = lambda: True,
) -> dict:
    """Race the candidates round by round (see the module's docstring) from the rounds they already have.

    `measure(candidate, round)` runs one confirmation trial and returns its record (already stored by the
    caller). A candidate whose run fails is dropped from later rounds. `keep_going()` is asked between runs:
    the time budget or a Ctrl-C ends the confirmation early, and the verdict says how many rounds ran.
    """
    done = rounds_of(cands)
    for c in cands:  # resumed: a candidate with fewer rounds than the others had left the race
        if len(c.records) < done and not c.left:
            c.left = "left the race before the resume"
    for rnd in range(done, max_rounds):
        race(cands, objective, rnd, min_rounds, alpha, min_effect)
        live = [c for c in cands if c.racing]
        if not live or (len(live) == 1 and rnd >= min_rounds):
            break
        for c in run_order(live, rnd, config=lambda c: c.config):
            if not keep_going():
                return _with_race(assess(cands, objective, alpha, min_effect), cands) | {"stopped_early": True}
            c.records.append(measure(c, rnd))
    return _with_race(assess(cands, objective, alpha, min_effect), cands)


def _with_race(verdict: dict, cands: list[Candidate]) -> dict:
    verdict["race"] = [{"trial_number": c.trial_number, "rounds": len(c.records), "left": c.left} for c in cands]
    return verdict


def run_ladder(
    cands: list[Candidate],
    measure: Callable[[Candidate, int], TrialRecord],
    rounds: int = MIN_ROUNDS,
    keep_going: Callable[[], bool] = lambda: True,
) -> bool:
    """Measure every rung candidate for `rounds` interleaved rounds (run_order: one load key's runs back to back,
    every other round reversed), from the rounds they already have. No race: every rung needs the recommended
    config and the defaults for its figures, and a fixed count keeps the rungs' intervals alike. False when
    `keep_going()` ended it early."""
    for rnd in range(min((len(c.records) for c in cands), default=rounds), rounds):
        for c in run_order(
            [c for c in cands if not c.failed and len(c.records) <= rnd], rnd, config=lambda c: c.config
        ):
            if not keep_going():
                return False
            c.records.append(measure(c, rnd))
    return True


def rung_figures(
    cands: list[Candidate], objective: str, alpha: float = ALPHA, min_effect: float = MIN_EFFECT
) -> list[dict]:
    """Per rung of a measured ladder: the recommended config's figure, the defaults' figure and the paired ratio
    between them (tuner.stats, as the race judges), and each alternative against the recommended config."""
    out = []
    for n_ctx in sorted({c.n_ctx for c in cands if c.is_rung}):
        here = [c for c in cands if c.is_rung and c.n_ctx == n_ctx]
        rec = next((c for c in here if c.has(RUNG)), None)
        if rec is None:
            continue
        # the defaults: their own runs, or the recommendation's when it is the defaults
        base = next((c for c in here if c.has(RUNG_DEFAULTS) and c is not rec), None) or (
            rec if rec.has(RUNG_DEFAULTS) else None
        )
        row = {
            "n_ctx": n_ctx,
            "n_depth": rec.config.n_depth,
            "recommended": rec,
            "rounds": len(rec.records),
            "defaults": base,
            "alternatives": [],
        }
        if base is rec:
            row["vs_defaults"] = {"ratio": 1.0, "ci95": [1.0, 1.0], "p": None, "verdict": "same config"}
        elif base is not None and rec.rounds(objective) and base.rounds(objective):
            row["vs_defaults"] = _vs(rec, base, objective, alpha, min_effect)
        for c in here:
            if (c.has(RUNG_ALT) or c.has(RUNG_CONTROL)) and c is not rec and c.rounds(objective):
                row["alternatives"].append((c, _vs(c, rec, objective, alpha, min_effect)))
        out.append(row)
    return out


def _vs(a: Candidate, b: Candidate, objective: str, alpha: float, min_effect: float) -> dict:
    """A against B, paired by round: the median ratio (in "larger is better" terms), its interval, the one-sided
    test in the ratio's direction, and a verdict that says "faster"/"slower" only when both agree."""
    ra, rb = a.rounds(objective), b.rounds(objective)
    common = sorted(set(ra) & set(rb))
    if not common:  # no round in common (a side's runs failed or were stopped): nothing told apart
        return {"ratio": 1.0, "ci95": [1.0, 1.0], "p": 1.0, "rounds": 0, "verdict": "tie"}
    x, y = [ra[i] for i in common], [rb[i] for i in common]
    r, lo, hi = stats.ratio_ci(x, y, paired=True)
    cmp = stats.compare(
        x, y, paired=True, alpha=alpha, min_effect=min_effect, alternative="greater" if r >= 1 else "less"
    )
    d = cmp.differ and (lo > 1 or hi < 1)
    return {
        "ratio": r,
        "ci95": [lo, hi],
        "p": cmp.p,
        "rounds": len(common),
        "verdict": ("faster" if r > 1 else "slower") if d else "tie",
    }

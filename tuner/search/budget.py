"""The search's time arithmetic: a run's typical wall time, what the confirmation and the context ladder still take
(the ETA), and what --timeout keeps for them. Pure functions of the options, the space and the records; the loop
(tuner.search.loop.Search) asks them through its methods of the same names."""

from __future__ import annotations

from tuner.record import TrialRecord
from tuner.search import confirm as confirmlib
from tuner.search.options import SearchOptions
from tuner.search.space import Space


def typical_trial_s(records: list[TrialRecord]) -> float:
    """A run's typical wall time, without a depth fill: a fill is paid once per run and KV settings, and the
    confirmation's and the ladder's runs mostly restore it."""
    walls = sorted(r.wall_s - (r.depth_fill_ms or 0) / 1000 for r in records if r.ok and r.wall_s)
    return walls[len(walls) // 2] if walls else 0.0


def n_candidates(opts: SearchOptions) -> int:
    """The confirmation race's candidates: the top K and the llama.cpp defaults."""
    return opts.confirm + 1 if opts.confirm and not opts.pareto else 0


def n_ladder_runs(space: Space, opts: SearchOptions) -> int:
    """Runs the ladder takes: every rung up to the working one × (recommended, defaults and at most one alternative
    and one control) × the race's minimum of rounds."""
    rungs = [c for c in space.ladder if c <= space.base.n_ctx]
    return len(rungs) * 4 * opts.confirm_range[0] if len(rungs) > 1 and not opts.pareto else 0


def confirm_estimate_s(
    opts: SearchOptions,
    space: Space,
    typical_s: float,
    confirming: list[confirmlib.Candidate] | None,
    laddering: list[confirmlib.Candidate] | None,
    n_cands: int | None = None,
) -> float:
    """The ETA of the confirmation: the runs its race can still take (every candidate still racing, to the round
    limit) × a typical run, then the ladder's. Before it starts: the candidates × the round limit."""
    lo, hi = opts.confirm_range
    if laddering is not None:
        return sum(max(0, lo - len(c.records)) for c in laddering if not c.failed) * typical_s
    ladder = n_ladder_runs(space, opts) * typical_s
    if confirming is not None:
        return confirmlib.remaining_runs(confirming, hi) * typical_s + ladder
    return (n_cands or n_candidates(opts)) * hi * typical_s + ladder


def confirm_reserve_s(opts: SearchOptions, space: Space, typical_s: float) -> float:
    """What --timeout keeps for the confirmation: every candidate for the race's minimum of rounds, and the ladder
    (the rest of the race runs in what is left, and stops at the deadline)."""
    return (n_candidates(opts) * opts.confirm_range[0] + n_ladder_runs(space, opts)) * typical_s

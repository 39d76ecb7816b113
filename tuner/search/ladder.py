"""The context ladder's choices: which configs it measures at every rung, and when the working rung steps down.

The ladder itself runs in tuner.search.loop (Search.ladder, through tuner.search.confirm.run_ladder); what it shows
is built by
tuner.search.recommend.context_ladder. See README "A context ladder".
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from tuner.record import TrialRecord, invalid_reason
from tuner.search import confirm as confirmlib
from tuner.search.space import CONTEXT_DIMS, Space

DEFAULTS = confirmlib.ROLE_BASELINE  # the baseline label its search trial carries
OOMS_TO_STEP = 2  # OOMs of the search's own configs (not the baselines) at a rung with nothing completed


def candidates(
    space: Space,
    records: list[TrialRecord],
    winner: int,
    objective: str,
    fits: Callable[[TrialRecord], bool],
    allowed: Callable[[TrialRecord], bool],
) -> list[confirmlib.Candidate]:
    """The recommended config (trial `winner`), the llama.cpp defaults and the recommended config's alternatives at
    every rung up to the working context, each at the rung's depth (tuner.search.space.Space.rung_config).

    The alternatives are measured configs of the search: the best one that differs from the recommendation in a
    context-dependent dimension (tuner.search.space.CONTEXT_DIMS: its best value may change with the context), and as a
    control the best one that differs only in others (threads...: if the control beats the recommendation at some
    rung, the split of the dimensions does not hold on this rig, and the ladder says so). `fits(record)`: within
    the limits; `allowed(record)`: within the quality budget."""
    working = space.base.n_ctx
    rungs = [c for c in space.ladder if c <= working]
    if len(rungs) < 2:
        return []
    groups = confirmlib.pool(
        [
            r
            for r in records
            if r.searched
            and r.ok
            and r.objective(objective) is not None
            and fits(r)
            and r.config.effective_ctx() == working
        ]
    )
    groups = confirmlib.prefer_clean(groups)
    win = next((g for g in groups if g.trial_number == winner), None)
    if win is None:
        return []
    sign = -1 if objective == "ttft" else 1
    groups.sort(key=lambda g: -sign * g.estimate(objective))

    def ctx_dims(cfg):
        return tuple(getattr(cfg, k) for k in CONTEXT_DIMS)

    picks = [(win, [confirmlib.RUNG])]
    base = next((g for g in groups if any(r.baseline == DEFAULTS for r in g.records)), None)
    if base is win:
        picks[0][1].append(confirmlib.RUNG_DEFAULTS)
    elif base is not None:
        picks.append((base, [confirmlib.RUNG_DEFAULTS]))
    picks = [(g.config, g.trial_number, roles) for g, roles in picks]
    if base is None:  # the defaults failed here (or do not fit the limits): still measured at every rung
        r0 = next(
            (r for r in records if r.baseline == DEFAULTS and r.searched and r.config.effective_ctx() == working), None
        )
        if r0 is not None:
            picks.append((r0.config, r0.trial_number, [confirmlib.RUNG_DEFAULTS]))
    taken = {c.key() for c, _, _ in picks}
    # the alternative: the recommendation with the context-dependent values of the best config that has other
    # ones (only those differ, so the ladder shows their effect alone); kept as measured if llama.cpp would
    # refuse the mix (quantized V without flash attention)
    other = next((g for g in groups if ctx_dims(g.config) != ctx_dims(win.config) and allowed(g.records[0])), None)
    if other is not None:
        alt = dataclasses.replace(win.config, **{k: getattr(other.config, k) for k in CONTEXT_DIMS})
        alt = other.config if invalid_reason(alt) else alt
        same = next((p for p in picks if p[0].key() == alt.key()), None)
        if same is not None:  # the defaults are that alternative: compared as one too
            same[2].append(confirmlib.RUNG_ALT)
        else:
            picks.append((alt, other.trial_number, [confirmlib.RUNG_ALT]))
            taken.add(alt.key())
    # the control: the best config with the recommendation's context-dependent values and other others
    control = next(
        (
            g
            for g in groups
            if ctx_dims(g.config) == ctx_dims(win.config) and g.config.key() not in taken and allowed(g.records[0])
        ),
        None,
    )
    if control is not None:
        picks.append((control.config, control.trial_number, [confirmlib.RUNG_CONTROL]))
    earlier = {c.config.key(): c for c in confirmlib.candidates_from_records(records) if c.is_rung}
    out = []
    for n_ctx in rungs:
        for config, number, roles in picks:
            cfg = space.rung_config(config, n_ctx)
            c = confirmlib.Candidate(
                roles[0], cfg, number, roles=list(roles) + [f"{confirmlib.LADDER_OF}{win.trial_number}"]
            )
            old = earlier.get(cfg.key())
            if old is not None and old.roles == c.roles:  # a resumed ladder goes on from the rounds it has
                c.records = list(old.records)
            out.append(c)
    return out


def step_down(space: Space, records: list[TrialRecord], exhausted: bool = False) -> int | None:
    """The next rung down when the working one does not fit although the planner let it through (it does not
    know --mem-limit or a driver's reserve): OOMS_TO_STEP of the search's own configs ran out of memory there
    and none completed. The baselines (all layers on the GPU, an f16 cache) are the likeliest to run out, so
    they do not count. `exhausted`: nothing is left to try at the rung (the smallest config ran out first and
    dominates the rest), so one OOM of its own suffices. None: stay."""
    if not space.ladder or space.base.n_ctx == space.ladder[0]:
        return None
    here = [r for r in records if r.searched and r.config.effective_ctx() == space.base.n_ctx]
    need = 1 if exhausted else OOMS_TO_STEP
    if any(r.ok for r in here) or sum(r.outcome == "oom" and not r.baseline for r in here) < need:
        return None
    return max(c for c in space.ladder if c < space.base.n_ctx)

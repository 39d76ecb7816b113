"""The confirmation (tuner.search.confirm): pooling, the race, ties broken by memory that matters, the baseline ratio,
and the run order that reloads least.

These test the judgement on given samples; tests/test_search.py runs real confirmations end to end.
"""

from __future__ import annotations

import random

import pytest

from tuner.record import TrialConfig, TrialRecord
from tuner.search import confirm


def rec(n, samples, threads=1, rss=100 << 20, state="confirm", roles="candidate", ctx=4096, pp=None, rnd=None):
    cfg = TrialConfig(model="m.gguf", n_threads=threads, n_ctx=ctx, n_prompt=64, n_gen=16)
    return TrialRecord(
        config=cfg,
        outcome="ok",
        tg_samples=list(samples),
        pp_samples=list(pp or []),
        peak_rss_bytes=rss,
        trial_number=n,
        state=state,
        baseline=roles,
        confirm_round=rnd,
    )


def rounds(n, center, k=6, sd=0.01, seed=0, **kw):
    """k confirmation rounds of one candidate, 3 repetitions each."""
    return [rec(n, noisy(center, n=3, sd=sd, seed=seed * 100 + i), rnd=i, **kw) for i in range(k)]


def noisy(center, n=15, sd=0.01, seed=0):
    rng = random.Random(seed)
    return [center * (1 + rng.gauss(0, sd)) for _ in range(n)]


def test_pooling_is_one_estimate_per_config():
    a1, a2 = rec(0, [10, 12], state="COMPLETE"), rec(3, [11], state="COMPLETE")
    b = rec(1, [30], threads=2, state="COMPLETE")
    groups = confirm.pool([a1, b, a2])
    assert len(groups) == 2
    ga = next(g for g in groups if g.config.n_threads == 1)
    assert ga.samples("tg") == [10, 12, 11] and ga.trial_number == 0 and ga.estimate("tg") == 11
    # how a config is measured (repetitions) is not what: same key
    assert TrialConfig("m", repetitions=3).key() == TrialConfig("m", repetitions=9).key()
    assert TrialConfig("m", n_ubatch=3).key() != TrialConfig("m").key()


def test_separated_winner_and_paired_baseline_ratio_with_interval():
    cands = confirm.candidates_from_records(
        rounds(1, 110, seed=1)
        + rounds(2, 100, seed=2, threads=2)
        + rounds(0, 80, seed=3, threads=3, roles="llama.cpp defaults")
    )
    v = confirm.assess(cands, "tg")
    assert v["verdict"] == "separated" and v["winner"] == 1
    vs = v["vs_baseline"]
    assert vs["verdict"] == "faster" and 1.3 < vs["ratio"] < 1.45 and vs["rounds"] == 6
    assert vs["ci95"][0] <= vs["ratio"] <= vs["ci95"][1] and vs["ci95"][0] > 1.25
    row = next(r for r in v["candidates"] if r["trial_number"] == 1)
    assert row["ci95"][0] <= row["median"] <= row["ci95"][1] and len(row["round_values"]) == 6
    # 6 rounds all ahead: the one-sided exact Wilcoxon p is 1/64
    assert next(r for r in v["candidates"] if r["trial_number"] == 2)["p_vs_best"] == pytest.approx(1 / 64)


def test_the_unit_is_the_round_not_the_repetition():
    # 3 rounds, each with 10 repetitions perfectly separated: pooled repetitions would give a tiny p; three
    # rounds cannot (1/8 one-sided), so the two are not told apart yet
    cands = confirm.candidates_from_records(rounds(1, 110, k=3, seed=4) + rounds(2, 100, k=3, seed=5, threads=2))
    v = confirm.assess(cands, "tg")
    assert v["verdict"] == "tie"
    assert next(r for r in v["candidates"] if r["trial_number"] == 2)["p_vs_best"] == pytest.approx(1 / 8)


def test_memory_breaks_a_tie_only_when_it_matters():
    lean = confirm.candidates_from_records(
        rounds(1, 100.3, sd=0.03, seed=4, rss=900 << 20) + rounds(2, 100.0, sd=0.03, seed=5, threads=2, rss=300 << 20)
    )
    v = confirm.assess(lean, "tg")
    assert v["verdict"] == "tie" and v["winner"] == 2
    assert "headroom" in v["reason"] and "#1" in v["reason"] and "#2" in v["reason"]
    # 7 MiB (the `make demo` case) or 72 KiB less is no reason to take the slower config
    for saved in (7 << 20, 72 << 10):
        close = confirm.candidates_from_records(
            rounds(1, 100.3, sd=0.03, seed=4, rss=900 << 20)
            + rounds(2, 100.0, sd=0.03, seed=5, threads=2, rss=(900 << 20) - saved)
        )
        v = confirm.assess(close, "tg")
        assert v["verdict"] == "tie" and v["winner"] == 1 and "no other saves memory that matters" in v["reason"]


def test_ladder_rungs_never_win_and_failed_candidates_drop_out():
    fast_small_ctx = rounds(5, 200, seed=6, ctx=512, roles=confirm.RUNG)
    ok = rounds(1, 100, seed=7)
    bad = rounds(2, 150, seed=8, threads=2)
    crashed = TrialRecord(config=bad[0].config, outcome="crash", trial_number=2, state="confirm", baseline="candidate")
    v = confirm.assess(confirm.candidates_from_records(fast_small_ctx + ok + bad + [crashed]), "tg")
    assert v["winner"] == 1 and v["verdict"] == "single"


def test_ttft_lower_is_better_and_mixed_pairs_repetitions():
    a, b = rounds(1, 0), rounds(2, 0, threads=2)
    for i, r in enumerate(a):
        r.tg_samples, r.ttft_samples_ms = [], noisy(50, n=3, seed=9 + i)
    for i, r in enumerate(b):
        r.tg_samples, r.ttft_samples_ms = [], noisy(80, n=3, seed=19 + i)
    v = confirm.assess(confirm.candidates_from_records(a + b), "ttft")
    assert v["winner"] == 1 and v["verdict"] == "separated"
    assert next(r for r in v["candidates"] if r["trial_number"] == 1)["median"] == pytest.approx(50, rel=0.05)
    m = rec(3, [10.0, 20.0], pp=[100.0, 100.0])
    # one request of 64 prompt + 16 generated tokens, per repetition
    assert confirm.objective_samples(m, "mixed") == [80 / (64 / 100 + 16 / 10), 80 / (64 / 100 + 16 / 20)]


def cand(t, role=confirm.ROLE_TOP, model="m", **kw):
    return confirm.Candidate(role, TrialConfig(model, n_threads=t, **kw), t, roles=[role])


def test_the_race_drops_a_candidate_behind_after_its_minimum_and_stops():
    runs = []
    cands = [cand(1), cand(2), cand(3)]
    speed = {1: 100.0, 2: 50.0, 3: 100.0}

    def measure(c, rnd):
        runs.append((rnd, c.trial_number))
        return rec(
            c.trial_number, noisy(speed[c.trial_number], n=3, sd=0.02, seed=len(runs)), threads=c.trial_number, rnd=rnd
        )

    v = confirm.run_rounds(cands, measure, "tg", max_rounds=8)
    per = {t: sum(1 for _, x in runs if x == t) for t in speed}
    # #2 is 50 % behind: it leaves at the race's minimum; #1 and #3 (level) race to the limit
    assert confirm.MIN_ROUNDS == 5 and per == {1: 8, 2: 5, 3: 8}
    assert next(c for c in cands if c.trial_number == 2).left.startswith(("behind #1 after 5", "behind #3 after 5"))
    assert v["winner"] in (1, 3) and v["rounds"] == 8
    assert [r["rounds"] for r in v["race"]] == [8, 5, 8]
    # recommend re-derives the same verdict from the records alone
    again = confirm.assess(confirm.candidates_from_records([r for c in cands for r in c.records]), "tg")
    assert (again["winner"], again["verdict"]) == (v["winner"], v["verdict"])


def test_the_race_ends_when_one_remains_and_the_baseline_stays_while_needed():
    runs = []
    cands = [cand(1), cand(2), cand(3, confirm.ROLE_BASELINE)]
    speed = {1: 100.0, 2: 60.0, 3: 100.0}  # the baseline is level with the best: "x defaults" needs it

    def measure(c, rnd):
        runs.append(c.trial_number)
        return rec(
            c.trial_number,
            noisy(speed[c.trial_number], n=3, sd=0.03, seed=len(runs)),
            threads=c.trial_number,
            rnd=rnd,
            roles="+".join(c.roles),
        )

    v = confirm.run_rounds(cands, measure, "tg", max_rounds=7)
    assert runs.count(2) == 5 and runs.count(3) == 7 and v["vs_baseline"]["rounds"] == 7
    # a baseline far behind leaves with the others, and the race stops when the winner is alone
    runs.clear()
    cands = [cand(1), cand(2), cand(3, confirm.ROLE_BASELINE)]
    speed.update({3: 50.0})
    v = confirm.run_rounds(cands, measure, "tg", max_rounds=7)
    assert len(runs) == 15 and v["verdict"] == "separated" and v["winner"] == 1
    assert v["vs_baseline"]["verdict"] == "faster" and v["vs_baseline"]["rounds"] == 5


def test_eta_covers_the_rounds_the_race_can_still_take():
    cands = [cand(1), cand(2), cand(3)]
    assert confirm.remaining_runs(cands, 8) == 24
    for c in cands:
        c.records = rounds(c.trial_number, 100, k=5)
    cands[1].left = "behind"
    assert confirm.remaining_runs(cands, 8) == 6


def test_run_order_groups_load_keys_and_alternates_between_rounds():
    # two models (a reload each change) and two thread counts each (no reload): 4 candidates
    cands = [cand(1, model="a"), cand(2, model="b"), cand(3, model="a"), cand(4, model="b")]
    order = [c for rnd in range(6) for c in confirm.run_order(cands, rnd, config=lambda c: c.config)]
    changes = sum(1 for x, y in zip(order, order[1:]) if x.config.load_key() != y.config.load_key())
    rotation = [c for rnd in range(6) for c in cands[rnd % 4 :] + cands[: rnd % 4]]
    rot_changes = sum(1 for x, y in zip(rotation, rotation[1:]) if x.config.load_key() != y.config.load_key())
    assert changes == 6 and rot_changes >= 3 * changes  # one reload per round (A B | B A), not one per run
    firsts = [confirm.run_order(cands, rnd, config=lambda c: c.config)[0].trial_number for rnd in range(2)]
    assert firsts == [1, 4]  # no group and no candidate always first


def test_stopped_when_told():
    cands = [cand(1), cand(2)]

    def measure(c, rnd):
        return rec(c.trial_number, noisy(100, n=3, seed=rnd), threads=c.trial_number, rnd=rnd)

    v = confirm.run_rounds(cands, measure, "tg", keep_going=lambda: len(cands[0].records) < 1)
    assert v.get("stopped_early") and v["rounds"] == 1


def test_a_ladder_run_is_its_own_candidate_and_each_rung_is_judged_on_its_own_rounds():
    # the recommended config's race runs and its ladder runs at the working context are two candidates: the
    # ladder pairs its own rounds (measured later, interleaved with the other rungs)
    race = rounds(1, 100, seed=1) + rounds(0, 80, seed=2, threads=2, roles="candidate+llama.cpp defaults")
    ladder = []
    for ctx, speed in ((1024, 300), (4096, 100)):
        ladder += rounds(1, speed, k=5, seed=ctx, ctx=ctx, roles=confirm.RUNG)
        ladder += rounds(
            0, speed * 0.8, k=5, seed=ctx + 1, threads=2, ctx=ctx, roles=f"{confirm.RUNG_DEFAULTS}+{confirm.RUNG_ALT}"
        )
        ladder += rounds(3, speed * 1.0, k=5, seed=ctx + 2, threads=4, ctx=ctx, roles=confirm.RUNG_CONTROL)
    cands = confirm.candidates_from_records(race + ladder)
    assert len(cands) == 2 + 6 and sum(c.is_rung for c in cands) == 6
    assert confirm.assess([c for c in cands if not c.is_rung], "tg")["winner"] == 1
    rows = confirm.rung_figures(cands, "tg")
    assert [(r["n_ctx"], r["rounds"]) for r in rows] == [(1024, 5), (4096, 5)]
    for r in rows:
        assert r["recommended"].trial_number == 1 and r["defaults"].trial_number == 0
        vs = r["vs_defaults"]
        assert vs["verdict"] == "faster" and vs["ratio"] == pytest.approx(1.25, rel=0.03) and vs["rounds"] == 5
        kinds = {c.trial_number: (c.has(confirm.RUNG_ALT), v["verdict"]) for c, v in r["alternatives"]}
        # the defaults double as the context-dependent alternative; the control ties
        assert kinds == {0: (True, "slower"), 3: (False, "tie")}


def test_the_ladder_measures_every_rung_for_its_rounds_interleaved_and_resumes():
    cands = [
        confirm.Candidate(role, TrialConfig(model="m.gguf", n_ctx=ctx, n_threads=t), n, roles=[role])
        for ctx in (1024, 4096)
        for role, t, n in ((confirm.RUNG, 1, 1), (confirm.RUNG_DEFAULTS, 2, 0))
    ]
    order = []

    def measure(c, rnd):
        order.append((rnd, c.config.n_ctx, c.trial_number))
        return TrialRecord(
            config=c.config,
            outcome="ok",
            tg_samples=[1.0],
            trial_number=c.trial_number,
            state="confirm",
            baseline=c.role,
            confirm_round=rnd,
        )

    stop_after = iter(range(6))
    assert not confirm.run_ladder(cands, measure, rounds=3, keep_going=lambda: next(stop_after, None) is not None)
    assert len(order) == 6 and order[:4] == [(0, 1024, 1), (0, 1024, 0), (0, 4096, 1), (0, 4096, 0)]
    assert order[4:] == [(1, 4096, 0), (1, 4096, 1)]  # odd rounds run in reverse (A B | B A)
    assert confirm.run_ladder(cands, measure, rounds=3)  # resumed: the rounds left, the half-done one first
    assert [len(c.records) for c in cands] == [3, 3, 3, 3]
    assert order[6:8] == [(1, 1024, 0), (1, 1024, 1)] and len(order) == 12


def test_two_ladders_never_pool_and_a_stopped_run_is_run_again():
    # a resumed study whose winner changed measures a second ladder: the defaults' runs of each stay apart
    first = rounds(0, 100, k=5, seed=1, ctx=1024, roles=f"{confirm.RUNG_DEFAULTS}+{confirm.LADDER_OF}3")
    second = rounds(0, 200, k=5, seed=2, ctx=1024, roles=f"{confirm.RUNG_DEFAULTS}+{confirm.LADDER_OF}7")
    stopped = TrialRecord(
        config=second[0].config, outcome="interrupted", trial_number=0, state="confirm", baseline=second[0].baseline
    )
    cands = confirm.candidates_from_records(first + second + [stopped])
    assert sorted((c.ladder, len(c.records)) for c in cands) == [(3, 5), (7, 5)]
    assert not any(c.failed for c in cands)  # the Ctrl-C'd run is not a failure of the config


def test_a_baseline_without_a_round_in_common_is_a_tie_at_1x_not_a_crash():
    # the winner's rounds 0-5, the baseline's only later ones (its earlier runs failed): nothing to pair
    win = rounds(1, 120, seed=3)
    base = [rec(0, noisy(100, n=3, seed=50 + i), rnd=10 + i, threads=2, roles="llama.cpp defaults") for i in range(3)]
    vs = confirm.assess(confirm.candidates_from_records(win + base), "tg")["vs_baseline"]
    assert vs["ratio"] == 1.0 and vs["ci95"] == [1.0, 1.0] and vs["rounds"] == 0 and vs["verdict"] == "tie"

"""The confirmation's statistics (tuner.confirm): pooling, separation, ties broken by memory, the baseline ratio.

These test the judgement on given samples; tests/test_search.py runs real confirmations end to end.
"""

from __future__ import annotations

import random

from tuner import confirm
from tuner.record import TrialConfig, TrialRecord


def rec(n, samples, threads=1, rss=100 << 20, state="confirm", roles="candidate", ctx=4096, pp=None):
    cfg = TrialConfig(model="m.gguf", n_threads=threads, n_ctx=ctx, n_prompt=64, n_gen=16)
    return TrialRecord(config=cfg, outcome="ok", tg_samples=list(samples), pp_samples=list(pp or []),
                       peak_rss_bytes=rss, trial_number=n, state=state, baseline=roles)


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
    assert confirm.config_key(TrialConfig("m", repetitions=3)) == confirm.config_key(TrialConfig("m", repetitions=9))
    assert confirm.config_key(TrialConfig("m", n_ubatch=3)) != confirm.config_key(TrialConfig("m"))


def test_separated_winner_and_baseline_ratio_with_interval():
    cands = confirm.candidates_from_records(
        [rec(1, noisy(110, seed=1)), rec(2, noisy(100, seed=2), threads=2),
         rec(0, noisy(80, seed=3), threads=3, roles="llama.cpp defaults")])
    v = confirm.assess(cands, "tg")
    assert v["verdict"] == "separated" and v["winner"] == 1
    vs = v["vs_baseline"]
    assert vs["verdict"] == "faster" and 1.3 < vs["ratio"] < 1.45
    assert vs["ci95"][0] < vs["ratio"] < vs["ci95"][1] and vs["ci95"][0] > 1.25
    row = next(r for r in v["candidates"] if r["trial_number"] == 1)
    assert row["ci95"][0] <= row["median"] <= row["ci95"][1]


def test_tie_prefers_more_memory_headroom_and_says_so():
    cands = confirm.candidates_from_records(
        [rec(1, noisy(100.3, sd=0.03, seed=4), rss=900 << 20),
         rec(2, noisy(100.0, sd=0.03, seed=5), threads=2, rss=300 << 20)])
    v = confirm.assess(cands, "tg")
    assert v["verdict"] == "tie" and v["winner"] == 2
    assert "headroom" in v["reason"] and "#1" in v["reason"] and "#2" in v["reason"]


def test_ladder_rungs_never_win_and_failed_candidates_drop_out():
    fast_small_ctx = rec(5, noisy(200, seed=6), ctx=512, roles="ladder")
    ok = rec(1, noisy(100, seed=7))
    bad = rec(2, noisy(150, seed=8), threads=2)
    crashed = TrialRecord(config=bad.config, outcome="crash", trial_number=2, state="confirm", baseline="candidate")
    v = confirm.assess(confirm.candidates_from_records([fast_small_ctx, ok, bad, crashed]), "tg")
    assert v["winner"] == 1 and v["verdict"] == "single"


def test_ttft_lower_is_better_and_mixed_pairs_repetitions():
    a = rec(1, [], pp=[])
    a.ttft_samples_ms = noisy(50, seed=9)
    b = rec(2, [], threads=2)
    b.ttft_samples_ms = noisy(80, seed=10)
    assert confirm.assess(confirm.candidates_from_records([a, b]), "ttft")["winner"] == 1
    m = rec(3, [10.0, 20.0], pp=[100.0, 100.0])
    # one request of 64 prompt + 16 generated tokens, per repetition
    assert confirm.objective_samples(m, "mixed") == [80 / (64 / 100 + 16 / 10), 80 / (64 / 100 + 16 / 20)]


def test_run_rounds_stops_once_separated_and_rotates_order():
    order = []
    cands = [confirm.Candidate(confirm.ROLE_TOP, TrialConfig("m", n_threads=t), t, roles=[confirm.ROLE_TOP])
             for t in (1, 2, 3)]
    speed = {1: 100.0, 2: 50.0, 3: 25.0}

    def measure(c, rnd):
        order.append((rnd, c.trial_number))
        return rec(c.trial_number, noisy(speed[c.trial_number], n=5, seed=len(order)), threads=c.trial_number)

    v = confirm.run_rounds(cands, measure, "tg", min_rounds=3, max_rounds=6)
    assert v["verdict"] == "separated" and v["winner"] == 1 and v["rounds"] == 3
    firsts = [t for rnd, t in order if (rnd, t) == next(x for x in order if x[0] == rnd)]
    assert len(set(firsts)) == 3  # each round starts with another candidate


def test_run_rounds_goes_to_the_limit_on_a_tie_and_stops_when_told():
    cands = [confirm.Candidate(confirm.ROLE_TOP, TrialConfig("m", n_threads=t), t, roles=[confirm.ROLE_TOP])
             for t in (1, 2)]
    runs = []

    def measure(c, rnd):
        runs.append(rnd)
        return rec(c.trial_number, noisy(100, n=5, sd=0.05, seed=len(runs)), threads=c.trial_number)

    v = confirm.run_rounds(cands, measure, "tg", min_rounds=2, max_rounds=4)
    assert v["rounds"] == 4 and v["verdict"] == "tie"
    for c in cands:
        c.records.clear()
    v = confirm.run_rounds(cands, measure, "tg", keep_going=lambda: len(c.records) < 1)
    assert v.get("stopped_early")

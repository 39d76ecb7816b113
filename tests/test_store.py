"""The Parquet store: round trips, bad files, and durability when the writer is SIGKILLed mid-write."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tuner.measure import store
from tuner.record import TrialConfig, TrialRecord

ROOT = Path(__file__).resolve().parents[1]


def rec(i: int, outcome: str = "ok", **kw) -> TrialRecord:
    cfg = TrialConfig(model=f"/models/m{i % 3}.gguf", n_threads=1 + i % 4, n_batch=512, overrides=("exps=CPU",))
    base = dict(
        outcome=outcome,
        pp_samples=[100.0 + i, 102.0 + i],
        tg_samples=[10.0, 11.0, 12.0],
        ttft_samples_ms=[5.0],
        peak_rss_bytes=1000 + i,
        hw={"cpu": "x", "gpus": []},
        build={"llama_cpp_python": "0.3"},
        trial_number=i,
        tg_roofline_ts=22.0,
    )
    base.update(kw)
    return TrialRecord(config=cfg, **base)


def test_append_and_read_round_trip(tmp_path):
    p = tmp_path / "sub" / "trials.parquet"
    store.append(p, [rec(0), rec(1, "oom", cause="CUDA error: out of memory", pp_samples=[], tg_samples=[])])
    store.append(p, [rec(2)])
    df = store.read(p)
    assert len(df) == 3 and list(df["trial_number"]) == [0, 1, 2]
    assert df.loc[0, "tg_ts_mean"] == pytest.approx(11.0) and df.loc[0, "tg_ts_sd"] == pytest.approx(1.0)
    assert df.loc[0, "tg_roofline_pct"] == pytest.approx(50.0)
    back = store.records(p)
    assert back[1].outcome == "oom" and back[1].cause == "CUDA error: out of memory"
    assert back[0].config == rec(0).config and back[0].config.overrides == ("exps=CPU",)
    assert back[2].pp_samples == [102.0, 104.0] and back[2].hw == {"cpu": "x", "gpus": []}
    # a study folder resolves to its trials.parquet
    assert len(store.read(p.parent)) == 3
    assert not list(p.parent.glob(".*.tmp")), "no temp file is left behind by a clean write"


def test_read_errors_are_one_line_store_errors(tmp_path):
    with pytest.raises(store.StoreError, match="no results at"):
        store.read(tmp_path / "none.parquet")
    assert store.read(tmp_path / "none.parquet", missing_ok=True).empty
    bad = tmp_path / "bad.parquet"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(store.StoreError, match="not a readable Parquet file") as e:
        store.read(bad)
    assert "\n" not in str(e.value)


def test_append_to_a_non_parquet_file_leaves_it_unchanged(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet\n")
    with pytest.raises(store.StoreError):
        store.append(bad, [rec(0)])
    assert bad.read_text() == "not parquet\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_check_writable(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(store.StoreError, match="cannot create results folder"):
        store.check_writable(tmp_path / "afile" / "sub" / "trials.parquet")
    bad = tmp_path / "bad.parquet"
    bad.write_text("x")
    with pytest.raises(store.StoreError, match="not a readable Parquet file"):
        store.check_writable(bad)
    ok = store.check_writable(tmp_path / "new" / "trials.parquet")
    assert ok.parent.is_dir() and not ok.exists()


# A writer that appends forever; each append rewrites the whole file (with big rows, so writes take time).
WRITER = textwrap.dedent("""
    import sys
    from tuner.measure import store
    from tuner.record import TrialConfig, TrialRecord
    path, start = sys.argv[1], int(sys.argv[2])
    n = len(store.read(path, missing_ok=True))
    print("ready", flush=True)
    while True:
        recs = [TrialRecord(config=TrialConfig(model="m.gguf"), outcome="ok", trial_number=n + k,
                            stderr_tail="x" * 200_000, pp_samples=[float(n + k)]) for k in range(3)]
        store.append(path, recs)
        n += 3
""")


def test_append_survives_sigkill_at_random_moments(tmp_path):
    """Kill the writer at random points; every time, the file is the old one or the new one, never torn."""
    p = tmp_path / "trials.parquet"
    rng = random.Random(7)
    rows, torn_writes = 0, 0
    for i in range(40):  # at least 12 kills, and more until one has landed inside a write (~1 in 3 do)
        if i >= 12 and torn_writes:
            break
        w = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(p), str(rows)], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        assert w.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(w.pid, signal.SIGKILL)
        w.wait()
        w.stdout.close()
        # a temp file left now means this kill landed inside write_frame (the next writer removes it)
        torn_writes += bool(list(tmp_path.glob(".trials.parquet.*.tmp")))
        if not p.exists():
            assert rows == 0
            continue
        t = pq.read_table(p)  # must always parse: footer, row groups, everything
        n = t.num_rows
        assert n >= rows and n % 3 == 0, (rows, n)  # appends are all-or-nothing: 3 rows at a time
        assert t.column("trial_number").to_pylist() == list(range(n))
        assert t.column("pp_samples").to_pylist() == [[float(k)] for k in range(n)]
        rows = n
    assert rows > 0, "the writers must have completed some appends"
    # A leftover temp file is the evidence that some kills landed inside a write.
    assert torn_writes > 0, "no kill landed inside a write; the test did not test anything"
    # the next clean write sweeps up what killed writers left behind
    store.append(p, [rec(rows)])
    assert not list(tmp_path.glob(".trials.parquet.*.tmp"))
    assert len(store.read(p)) == rows + 1


def test_concurrent_appends_lose_nothing(tmp_path):
    p = tmp_path / "trials.parquet"
    code = textwrap.dedent("""
        import sys
        from tuner.measure import store
        from tuner.record import TrialConfig, TrialRecord
        for k in range(8):
            store.append(sys.argv[1], [TrialRecord(config=TrialConfig(model="m.gguf"), study=sys.argv[2],
                                                   trial_number=k)])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(p), name], cwd=ROOT) for name in ("a", "b")]
    assert [pr.wait(timeout=300) for pr in procs] == [0, 0]
    df = store.read(p)
    assert sorted(map(tuple, df[["study", "trial_number"]].values.tolist())) == sorted(
        (s, k) for s in "ab" for k in range(8)
    )


def test_record_json_round_trip():
    r = rec(5, "crash", cause="killed by SIGSEGV", signal=11, exit_code=-11)
    back = TrialRecord.from_json(r.to_json())
    assert back == r
    assert json.loads(r.to_json())["config"]["overrides"] == ["exps=CPU"]

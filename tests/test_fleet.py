"""Fleet: several `tuner search` processes (hosts, each with its own lock file and results folder) on one study in
a real PostgreSQL started by the tests (tests/pg.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from tuner.cli import cli
from tuner.measure import store
from tuner.record import TrialRecord
from tuner.search import confirm as confirmlib
from tuner.search import fleet

TUNER = str(Path(sys.executable).parent / "tuner")
TS = optuna.trial.TrialState
SPACE = [
    "--threads",
    "1,2",
    "-ub",
    "64,128,256,512",
    "-b",
    "512,1024",
    "-p",
    "16",
    "-n",
    "4",
    "-r",
    "2",
    "--drift-every",
    "0",
    "--heartbeat",
    "1",
]


def host_args(models, url, study, folder: Path, n_trials: int, extra=()) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        TUNER,
        "search",
        "-m",
        str(models / "tiny-q8_0.gguf"),
        *SPACE,
        "--n-trials",
        str(n_trials),
        "--storage",
        url,
        "--study",
        study,
        "--results",
        str(folder),
        "--lock-file",
        str(folder / "host.lock"),
        *extra,
    ]


def ledger_rows(url: str, base: str) -> list[tuple[int, str, TrialRecord]]:
    engine = sa.create_engine(url)
    try:
        return fleet.Tables(engine, create=False).rows(base)
    finally:
        engine.dispose()


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


@pytest.fixture(scope="module")
def three_hosts(pg_server, models, tmp_path_factory):
    """Three hosts started together on one study of 9 trials; confirmation on (one host confirms)."""
    url = pg.create_db(pg_server, "three")
    root = tmp_path_factory.mktemp("three")
    procs = [
        subprocess.Popen(
            host_args(models, url, "fleet", root / f"host{i}", 9),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    outs = [p.communicate(timeout=400) for p in procs]
    return url, root, procs, outs


@pytest.mark.slow
def test_three_hosts_measure_each_trial_once(three_hosts):
    url, root, procs, outs = three_hosts
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "recommended (trial #" in out
        assert pg_server_password(url) not in out + err
    study = load(url, "fleet")
    counted = [t for t in study.trials if t.state == TS.COMPLETE and "duplicate_of" not in t.user_attrs]
    # the budget is the fleet's total; hosts asking at the very same moment may overshoot by one each
    assert 9 <= len(counted) <= 11
    assert not [t for t in study.trials if t.state == TS.RUNNING]
    rows = ledger_rows(url, "fleet")
    searched = [(host, r) for _, host, r in rows if r.searched]
    numbers = [r.trial_number for _, r in searched]
    # every counted trial has exactly one record in the storage, and nothing else has one
    assert sorted(numbers) == sorted(t.number for t in counted)
    # no config was measured twice: the claims let one host have each
    keys = [r.config.key() for _, r in searched]
    assert len(keys) == len(set(keys))
    assert len({host for host, _ in searched}) >= 2  # the work was shared
    # the confirmation ran once, on one host, after the search
    confirms = [(host, r) for _, host, r in rows if r.state == confirmlib.CONFIRM_STATE]
    assert confirms and len({host for host, _ in confirms}) == 1
    # each host's Parquet is its durable copy of what it measured; together they are the storage's records
    local = []
    for i in range(3):
        path = root / f"host{i}" / "fleet" / store.TRIALS_FILE
        local += [(r.trial_number, r.state) for r in store.records(path)] if path.exists() else []
    assert sorted(local) == sorted((r.trial_number, r.state) for _, _, r in rows)


def pg_server_password(url: str) -> str:
    return url.split(":")[2].split("@")[0]


@pytest.mark.slow
def test_a_host_joining_a_finished_study_says_so(three_hosts, models, tmp_path):
    url, root, _, _ = three_hosts
    before = len(load(url, "fleet").trials)
    res = subprocess.run(
        host_args(models, url, "fleet", tmp_path / "late", 9), capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "study fleet is finished:" in res.stderr and "nothing to run" in res.stderr
    assert "recommended (trial #" in res.stdout and "no config" not in res.stdout
    assert (tmp_path / "late" / "fleet" / "recommended.json").exists()
    assert len(load(url, "fleet").trials) == before  # nothing was asked


@pytest.mark.slow
def test_recommend_and_report_from_the_storage_without_parquet(three_hosts, tmp_path, monkeypatch):
    url, root, _, _ = three_hosts
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["recommend", "--storage", url, "--study", "fleet", "--json", "--no-write"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output)
    # the same recommendation the confirming host wrote (the one that ran the confirmation)
    confirmer = {h for _, h, r in ledger_rows(url, "fleet") if r.state == confirmlib.CONFIRM_STATE}.pop()
    assert rec["confirmation"]["verdict"] != "unconfirmed"
    mine = [
        json.loads((d / "fleet" / "recommended.json").read_text())
        for d in root.iterdir()
        if (d / "fleet" / "recommended.json").exists()
    ]
    assert rec["trial_number"] in {m["trial_number"] for m in mine}
    assert confirmer
    assert not list(tmp_path.rglob(store.TRIALS_FILE))  # nothing left behind in the working folder
    # a snapshot folder: an ordinary study folder that every command reads
    res = CliRunner().invoke(cli, ["recommend", "snap", "--storage", url, "--study", "fleet"])
    assert res.exit_code == 0, res.output
    assert len(store.records(tmp_path / "snap")) == len(ledger_rows(url, "fleet"))
    assert (tmp_path / "snap" / "study.db").exists() and (tmp_path / "snap" / "recommended.json").exists()
    res = CliRunner().invoke(cli, ["report", "--storage", url, "--study", "fleet", "-o", "rep", "--format", "svg"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "report.html").exists()
    assert "fleet: " in res.output and "recommended trial #" in res.output
    assert pg_server_password(url) not in res.output


@pytest.mark.slow
def test_a_host_killed_mid_trial_has_its_trial_run_again(pg_server, models, tmp_path):
    url = pg.create_db(pg_server, "kill")
    engine = sa.create_engine(url)
    # a fresh worker per trial: each trial loads the model, long enough to still be running when the host is killed
    a = host_args(models, url, "k", tmp_path / "a", 3, ["--no-confirm", "--fresh-workers"])
    a[a.index("-n") + 1] = "128"
    p = subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # a trial that is measuring: RUNNING, with a heartbeat, its config claimed (not a repeat), no record yet
    q = sa.text(
        "SELECT t.number FROM trials t JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
        "WHERE t.state = 'RUNNING' AND t.number NOT IN (SELECT trial_number FROM tuner_records) "
        "AND t.number IN (SELECT trial_number FROM tuner_claims WHERE key LIKE 'config:%') "
        "AND t.number > 0"
    )
    deadline, victim = time.monotonic() + 120, None
    while victim is None and time.monotonic() < deadline:
        try:
            with engine.connect() as c:
                victim = next((n for (n,) in c.execute(q)), None)
        except sa.exc.ProgrammingError:  # tables not made yet
            pass
        time.sleep(0.05)
    assert victim is not None, "host A never got into a second trial"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    engine.dispose()
    assert load(url, "k").trials[victim].state == TS.RUNNING  # killed mid-trial
    params = load(url, "k").trials[victim].params
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    b = a[:]
    b[b.index("--results") + 1] = str(tmp_path / "b")
    b[b.index("--lock-file") + 1] = str(tmp_path / "b.lock")
    res = subprocess.run(b + ["--no-wait"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    study = load(url, "k")
    dead = study.trials[victim]
    assert dead.state == TS.FAIL  # failed by host B's heartbeat check
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim]
    assert len(retries) == 1 and retries[0].state == TS.COMPLETE and retries[0].params == params
    counted = [t for t in study.trials if t.state == TS.COMPLETE and "duplicate_of" not in t.user_attrs]
    assert len(counted) == 3  # the dead trial does not count; its retry does
    rows = [r for _, _, r in ledger_rows(url, "k") if r.searched]
    assert sorted(r.trial_number for r in rows) == sorted(t.number for t in counted)
    assert [r.trial_number for r in rows].count(retries[0].number) == 1
    assert victim not in [r.trial_number for r in rows]


@pytest.mark.slow
def test_a_host_of_another_build_is_refused_or_kept_apart(pg_server, models, tmp_path):
    url = pg.create_db(pg_server, "mixed")
    first = host_args(models, url, "m", tmp_path / "a", 2, ["--no-confirm"])
    res = subprocess.run(first, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    env = {**os.environ, "TUNER_FINGERPRINT_SALT": "another build"}
    other = host_args(models, url, "m", tmp_path / "b", 2, ["--no-confirm"])
    res = subprocess.run(other, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "fingerprint" in err and "--allow-mixed" in err
    assert not (tmp_path / "b" / "m" / store.TRIALS_FILE).exists()
    res = subprocess.run(other + ["--allow-mixed"], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = ledger_rows(url, "m")
    by_group = {}
    for _, _, r in rows:
        by_group.setdefault(r.study, set()).add(r.build_fingerprint)
    assert len(by_group) == 2 and all(len(v) == 1 for v in by_group.values())  # kept apart
    other_group = next(g for g in by_group if g != "m")
    assert other_group.startswith("m@")
    # each group has its own budget: 2 trials each
    for g in by_group:
        assert sum(1 for t in load(url, g).trials if t.state == TS.COMPLETE and "duplicate_of" not in t.user_attrs) == 2
    res = CliRunner().invoke(cli, ["recommend", "--storage", url, "--study", "m"])
    assert res.exit_code == 0, res.output
    assert res.output.count("recommended (trial #") == 2  # one recommendation per fingerprint


@pytest.mark.parametrize("case", ["unreachable", "credentials", "space", "mixed-local"])
def test_bad_fleet_input_is_one_line_exit_2(pg_server, models, tmp_path, case):
    url = pg_server.url()
    args = [
        "search",
        "-m",
        str(models / "tiny-q8_0.gguf"),
        *SPACE,
        "--n-trials",
        "1",
        "--results",
        str(tmp_path),
        "--study",
        "bad",
    ]
    if case == "unreachable":
        args += ["--storage", f"postgresql://tuner:{pg_server.password}@127.0.0.1:1/tuner"]
    elif case == "credentials":
        args += ["--storage", pg_server.url(password="wrong-secret")]
    elif case == "space":
        res = CliRunner().invoke(cli, args + ["--storage", url, "--lock-file", str(tmp_path / "x.lock")])
        assert res.exit_code == 0, res.output
        (tmp_path / "bad" / store.TRIALS_FILE).unlink()
        args = [a if a != "1,2" else "1,2,3" for a in args] + ["--storage", url]
    else:
        args += ["--allow-mixed"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert pg_server.password not in line and "wrong-secret" not in line
    assert {
        "unreachable": "cannot open storage",
        "credentials": "password authentication failed",
        "space": "another search space",
        "mixed-local": "--allow-mixed needs a shared --storage",
    }[case] in line
    assert not list(tmp_path.rglob(store.TRIALS_FILE))


def test_a_config_claim_has_one_winner_among_racing_hosts(pg_server):
    """Claims are what keeps two hosts from measuring one config: an atomic insert, then compare-and-set."""
    import threading

    url = pg.create_db(pg_server, "claims")
    engines = [sa.create_engine(url) for _ in range(6)]
    fleet.Tables(engines[0])
    ledgers = [fleet.Tables(e, create=False) for e in engines]
    results, start = {}, threading.Barrier(len(ledgers))

    def race(i):
        start.wait()
        results[i] = ledgers[i].claim("s", "config:x", f"host{i}", trial_number=i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(ledgers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, held in results.items() if held is None]
    assert len(winners) == 1
    held = [h for h in results.values() if h is not None]
    assert {h["trial_number"] for h in held} == set(winners) and all(h["age_s"] >= 0 for h in held)
    # passing the claim on (the owner's trial died): only one of two hosts that read the same row gets it
    assert ledgers[1].replace(held[0], owner="retry-a", trial_number=100)
    assert not ledgers[2].replace(held[0], owner="retry-b", trial_number=101)
    assert ledgers[3].get("s", "config:x")["trial_number"] == 100
    for e in engines:
        e.dispose()


@pytest.mark.parametrize("command", ["recommend", "report"])
def test_reading_a_fleet_with_bad_input_is_one_line_exit_2(pg_server, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    cases = [
        ([f"postgresql://tuner:{pg_server.password}@127.0.0.1:1/tuner", "s"], "Connection refused"),
        ([pg_server.url(password="wrong-secret"), "s"], "password authentication failed"),
        ([pg_server.url(), "no-such-study"], "no study named 'no-such-study'"),
        ([f"sqlite:///{tmp_path / 'none.db'}", "s"], "no database at"),
    ]
    for (url, study), message in cases:
        res = CliRunner().invoke(cli, [command, "--storage", url, "--study", study])
        assert res.exit_code == 2, res.output
        line = res.output.strip()
        assert len(line.splitlines()) == 1 and message in line, line
        assert pg_server.password not in line and "wrong-secret" not in line
    assert not list(tmp_path.iterdir())  # nothing written, not even an empty SQLite file


def test_a_lost_table_race_is_retried_and_anything_else_raised_at_once():
    from tuner.search.fleet import retry_race

    calls = []

    def create(fail: list):
        calls.append(1)
        if fail:
            raise fail.pop(0)
        return "created"

    lost = lambda e: "already exists" in str(e)  # noqa: E731
    errors = [RuntimeError("table already exists")] * 2
    assert retry_race(lambda: create(errors), 3, 0.0, lost) == "created"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(RuntimeError, match="permission denied"):  # not a race: no second try
        errors = [RuntimeError("permission denied")]
        retry_race(lambda: create(errors), 3, 0.0, lost)
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(RuntimeError, match="already exists"):  # a race lost every time: gives up
        errors = [RuntimeError("already exists")] * 5
        retry_race(lambda: create(errors), 3, 0.0, lost)
    assert len(calls) == 3

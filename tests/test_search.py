"""`tuner search`: real studies on synthetic models (real llama.cpp trials, real faults, real signals)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from slowdown import Hogs, pinned

from tuner.cli import cli
from tuner.measure import store
from tuner.measure.selftest import wait_mid_trial
from tuner.record import TrialConfig
from tuner.search.trials import dominated_by

SHAPE = ["-p", "32", "-n", "8", "-r", "2"]
TUNER = str(Path(sys.executable).with_name("tuner"))


def run(args, **kw):
    res = CliRunner().invoke(cli, args, catch_exceptions=False, **kw)
    return res


@pytest.fixture(scope="module")
def study10(models, tmp_path_factory):
    """A 10-trial TPE search over two quants of the tiny model, without the prior: with a probe of this machine in
    its cache the prior would order the race by its corrected estimates, so what these tests check would depend on
    whether `tuner probe` ever ran here (tests/test_prior.py runs the prior with a probe of its own)."""
    results = tmp_path_factory.mktemp("results")
    res = run(
        [
            "search",
            "-m",
            str(models / "tiny-q8_0.gguf"),
            "-m",
            str(models / "tiny-q4_k_m.gguf"),
            "--threads",
            "1:2",
            "-ub",
            "64,128,256",
            "-fa",
            "on,off",
            *SHAPE,
            "--n-trials",
            "10",
            "--drift-every",
            "4",
            "--no-auto-space",
            "--confirm",
            "2",
            "--confirm-rounds",
            "5",
            "--results",
            str(results),
            "--study",
            "s10",
            "--no-prior",
        ]
    )
    assert res.exit_code == 0, res.output
    return results / "s10", res.output


def test_ten_trials_ten_rows_and_a_recommendation(study10):
    d, out = study10
    df = store.read(d)
    trials = df[~df["state"].isin(["anchor", "confirm"])]
    assert len(trials) == 10 and trials["trial_number"].is_unique
    # a repeated suggestion is told its pooled figure and gets no row; every other Optuna trial has one
    study = optuna.load_study(study_name="s10", storage=f"sqlite:///{d / 'study.db'}")
    measured = [t.number for t in study.trials if "duplicate_of" not in t.user_attrs]
    assert sorted(trials["trial_number"]) == measured
    assert set(trials["model"].map(lambda p: Path(p).name)) == {"tiny-q8_0.gguf", "tiny-q4_k_m.gguf"}
    assert (trials["outcome"] == "ok").all()
    # the enqueued baselines ran first and are labelled
    assert trials.sort_values("trial_number")["baseline"].iloc[0] == "llama.cpp defaults"
    # drift anchors were re-measured every 4 trials (once the loaded model's queued configs are measured: the
    # anchor is another load) and kept apart from the trials
    anchors = df[df["state"] == "anchor"]
    assert 1 <= len(anchors) <= 2 and (anchors["trial_number"] >= 3).all()
    rec = json.loads((d / "recommended.json").read_text())
    # the winner was decided on the confirmation: the top 2 by pooled estimate and the defaults, re-measured
    conf = rec["confirmation"]
    assert conf["verdict"] in ("separated", "tie") and rec["trial_number"] == conf["winner"]
    # the race: every candidate runs its minimum (5 rounds, the --confirm-rounds limit here)
    assert conf["rounds"] == 5 and len(conf["candidates"]) in (2, 3)
    assert {"llama.cpp defaults"} <= {r for c in conf["candidates"] for r in c["roles"]}
    confirm_rows = df[df["state"] == "confirm"]
    assert len(confirm_rows) == 5 * len(conf["candidates"])
    assert sorted(set(confirm_rows["confirm_round"])) == [0, 1, 2, 3, 4]
    assert set(confirm_rows["trial_number"]) == {c["trial_number"] for c in conf["candidates"]}
    # the figures a user reads come from the winner's confirmation runs, not from its search trial
    won = confirm_rows[confirm_rows["trial_number"] == rec["trial_number"]]
    assert rec["measured"]["runs"] == 5
    assert rec["measured"]["tg_ts_mean"] == pytest.approx(
        sum(sum(s) for s in won["tg_samples"]) / sum(len(s) for s in won["tg_samples"])
    )
    best = trials[trials["trial_number"] == rec["trial_number"]].iloc[0]
    assert rec["config"]["n_threads"] == int(best["n_threads"])
    base = rec["baselines"]["llama.cpp defaults"]
    assert base["source"] == "confirmation" and base["ci95"][0] <= base["recommended_vs_baseline"] <= base["ci95"][1]
    assert rec["working_ctx"] == 4096 and "-c 4096 " in rec["forms"]["llama_server"]
    forms = rec["forms"]
    assert forms["llama_server"].startswith("llama-server -m ")
    assert f"-t {int(best['n_threads'])} " in forms["llama_server"]
    assert "PARAMETER num_thread" in forms["ollama_modelfile"]
    assert forms["llama_cpp_python"]["n_ubatch"] == int(best["n_ubatch"])
    assert "recommended (trial #" in out and "[confirm round 3]" in out and "95 % interval" in out


def test_storage_is_a_standard_optuna_study(study10):
    d, _ = study10
    study = optuna.load_study(study_name="s10", storage=f"sqlite:///{d / 'study.db'}")
    done = [
        t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and "duplicate_of" not in t.user_attrs
    ]
    assert len(done) == 10
    assert all("failed" in t.constraints for t in done)
    # Optuna's best single trial is among the confirmation's candidates (which then decide), unless it was
    # measured under drift (then a clean config of the working context goes first)
    conf = json.loads((d / "recommended.json").read_text())["confirmation"]
    drifted = {r.trial_number for r in store.records(d / store.TRIALS_FILE) if r.drift}
    best = study.best_trial.number
    assert best in {c["trial_number"] for c in conf["candidates"]} or best in drifted


def test_recommended_config_reruns_with_tuner_bench(study10, tmp_path):
    d, _ = study10
    rec = json.loads((d / "recommended.json").read_text())
    out = tmp_path / "again.parquet"
    res = run(["bench", "--config", str(d / "recommended.json"), "-r", "3", "-o", str(out)])
    assert res.exit_code == 0, res.output
    again = store.records(out)[0]
    want = dict(rec["config"], repetitions=3)
    assert again.config.to_dict() == want
    # measured, and not compared with the search's figure: on this shared machine two measurements of one config
    # differ by whatever else runs (telling speeds apart is `tuner compare`'s job, its power the benchmarks')
    assert again.ok and len(again.tg_samples) == 3 and again.metric("tg")[0] > 0


def test_recommended_kwargs_run_in_llama_cpp_python(study10):
    d, _ = study10
    kwargs = json.loads((d / "recommended.json").read_text())["forms"]["llama_cpp_python"]
    code = (
        "import json, sys, llama_cpp; kw = json.loads(sys.argv[1]); "
        "llm = llama_cpp.Llama(**kw, verbose=False); out = llm('hello', max_tokens=4); "
        "print(out['usage']['completion_tokens'])"
    )
    p = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert int(p.stdout.strip().splitlines()[-1]) >= 1


def test_recommend_rederives_under_other_limits(study10):
    d, _ = study10
    res = run(["recommend", str(d), "--json", "--no-write", "--max-ram", "1MiB"])
    assert res.exit_code == 2
    assert "no completed trial" in res.output
    res = run(["recommend", str(d), "--json", "--no-write", "--objective", "pp"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output)
    # re-judged on the same confirmation runs, on pp now
    conf = rec["confirmation"]
    assert rec["objective"] == conf["objective"] == "pp" and rec["trial_number"] == conf["winner"]
    fastest = max(conf["candidates"], key=lambda c: c["median"])
    assert conf["winner"] == fastest["trial_number"] or conf["verdict"] == "tie"


def test_a_rung_that_runs_out_of_memory_steps_the_ladder_down_and_dominated_configs_never_run(
    models, tmp_path, host_only
):
    """A 150 MiB cap makes n_ctx >= 16384 fail for real (the planner, which knows nothing of --mem-limit, lets
    them through): after two OOMs and no success at a rung, the search steps down to the next one. `--depth 256`:
    every rung is filled to 256 tokens, not to its end (a 16k fill under this cap takes about a minute per run,
    and the OOMs here come at context creation, which the depth does not change)."""
    res = run(
        [
            "search",
            "-m",
            str(models / "tiny-q8_0.gguf"),
            "--ctx",
            "2048,8192,16384,32768,65536",
            "-ub",
            "64,128,256,512",
            "-t",
            "1",
            *SHAPE,
            "--depth",
            "256",
            "--n-trials",
            "18",
            "--mem-limit",
            "150MiB",
            "--no-auto-space",
            "--no-confirm",
            "--drift-every",
            "0",
            "--results",
            str(tmp_path),
            "--study",
            "oom",
            "--seed",
            "3",
        ]
    )
    assert res.exit_code == 0, res.output
    df = store.read(tmp_path / "oom")
    df = df[df["state"] != "confirm"].sort_values("trial_number")
    assert 11 <= len(df) <= 18 and (df["outcome"] == "ok").sum() >= 2
    assert set(store.read(tmp_path / "oom")["n_depth"]) == {256}  # the search's and the ladder's runs alike
    ok_rungs = sorted(set(df[df["outcome"] == "ok"]["n_ctx"]))
    assert len(ok_rungs) == 1, "the search runs at one context once it has found one that fits"
    working = ok_rungs[0]
    assert 2048 <= working <= 16384  # 16384 fits with the smallest ubatch under the cap
    above = df[df["n_ctx"] > working]
    # each rung above: the two OOMs of the search's own configs that stepped it down (the defaults, run again at
    # each rung, do not count: all layers and f16 KV are the likeliest to run out), nothing completed there; one
    # OOM when it was the smallest micro-batch (the prior may measure it first) and dominated every other config
    for ctx in [c for c in (65536, 32768, 16384, 8192) if c > working]:
        here = above[above["n_ctx"] == ctx]
        own = here[here["baseline"] == ""]
        ooms = (own["outcome"] == "oom").sum()
        assert ooms == 2 or (ooms == 1 and (own["outcome"] == "skipped").sum() == len(own) - 1), ctx
        assert (here["baseline"] == "llama.cpp defaults").sum() == 1, ctx
    assert list(df["n_ctx"]) == sorted(df["n_ctx"], reverse=True)
    assert f"the working context steps down the ladder to {working}" in res.output
    assert all(c for c in df[df["outcome"] == "oom"]["cause"])
    # no config that a known OOM dominates was run: such configs are skipped with the dominating trial
    failed = []
    for row in df.to_dict("records"):
        cfg = TrialConfig.from_dict(
            {k: row[k] for k in TrialConfig.__dataclass_fields__ if k in row} | {"overrides": tuple(row["overrides"])}
        )
        if row["outcome"] not in ("skipped",):
            assert dominated_by(cfg, failed) is None, row["trial_number"]
        else:
            assert row["skipped_by"] in {f[0] for f in failed} or "flash" in row["cause"]
        if row["outcome"] == "oom":
            failed.append((row["trial_number"], cfg, row["cause"]))
    # the study's Optuna side marks failures infeasible, not FAIL (invisible to TPE)
    study = optuna.load_study(study_name="oom", storage=f"sqlite:///{tmp_path / 'oom' / 'study.db'}")
    states = {t.number: t for t in study.trials}
    for n in df[df["outcome"] == "oom"]["trial_number"]:
        t = states[int(n)]
        assert t.state == optuna.trial.TrialState.COMPLETE and t.constraints["failed"] > 0
    rec = json.loads((tmp_path / "oom" / "recommended.json").read_text())
    assert rec["config"]["n_ctx"] == rec["working_ctx"] == working
    # the ladder: the rungs up to the working one, never the ones that ran out of memory
    assert [r["n_ctx"] for r in rec.get("context_ladder", [])] == [c for c in (2048, 8192, 16384) if c <= working]


def _rows(path: Path) -> int:
    try:
        return len(store.read(path))
    except store.StoreError:
        return 0


def test_sigkill_mid_trial_then_same_command_resumes(models, tmp_path):
    args = [
        TUNER,
        "search",
        "-m",
        str(models / "tiny-q8_0.gguf"),
        "--threads",
        "1",
        "-ub",
        "64,128,256,512",
        "-fa",
        "on,off",
        "-p",
        "256",
        "-n",
        "1024",
        "-r",
        "3",
        "--n-trials",
        "6",
        "--drift-every",
        "0",
        "--no-auto-space",
        "--no-confirm",
        "--results",
        str(tmp_path),
        "--study",
        "kill",
    ]
    env = dict(os.environ)
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    parquet = tmp_path / "kill" / "trials.parquet"
    # the kill must land mid-trial: Optuna holds the third trial RUNNING and its row is not written yet
    target = wait_mid_trial(tmp_path / "kill" / "study.db", parquet, p, 2, time.monotonic() + 120)
    assert target is not None, "the search was never caught in the middle of a trial"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    before = store.read(parquet)
    done_before = set(before["trial_number"])
    assert target not in done_before and len(done_before) >= 2
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming study kill" in res.stderr
    after = store.read(parquet)
    assert done_before <= set(after["trial_number"])  # nothing completed was lost
    for n in done_before:
        a = after[after["trial_number"] == n].iloc[0]
        b = before[before["trial_number"] == n].iloc[0]
        assert a["outcome"] == b["outcome"] and a["tg_ts_mean"] == b["tg_ts_mean"]
    study = optuna.load_study(study_name="kill", storage=f"sqlite:///{tmp_path / 'kill' / 'study.db'}")
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    # Optuna and Parquet agree: every Optuna trial that measured something has exactly one row
    assert sorted(t.number for t in study.trials if "duplicate_of" not in t.user_attrs) == sorted(after["trial_number"])
    # the trial the kill interrupted is recorded once, as interrupted, and is FAIL for Optuna
    interrupted = after[after["outcome"] == "interrupted"]
    assert list(interrupted["trial_number"]) == [target]
    assert "parent killed" in interrupted.iloc[0]["cause"]
    assert [t for t in study.trials if t.number == target][0].state == optuna.trial.TrialState.FAIL
    # interrupted trials do not count: the study still completes 6 measured trials
    assert (after["outcome"] == "ok").sum() == 6 and len(after) == 7


def test_ctrl_c_stops_after_the_current_trial(models, tmp_path):
    args = [
        TUNER,
        "search",
        "-m",
        str(models / "tiny-q8_0.gguf"),
        "--threads",
        "1",
        "-ub",
        "64,128,256,512",
        "-p",
        "256",
        "-n",
        "64",
        "-r",
        "3",
        "--n-trials",
        "50",
        "--drift-every",
        "0",
        "--no-auto-space",
        "--results",
        str(tmp_path),
        "--study",
        "int",
    ]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parquet = tmp_path / "int" / "trials.parquet"
    deadline = time.monotonic() + 120
    while _rows(parquet) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    assert "stopping after this trial" in err and "resume with" in err
    df = store.read(parquet)
    assert (df["outcome"] == "ok").all() and 1 <= len(df) < 50


def test_bound_above_layer_count_is_clamped_with_a_note(models, tmp_path):
    res = run(
        [
            "search",
            "-m",
            str(models / "tiny-q8_0.gguf"),
            "--ngl",
            "0:999",
            "-t",
            "1",
            *SHAPE,
            "--n-trials",
            "1",
            "--drift-every",
            "0",
            "--no-confirm",
            "--results",
            str(tmp_path),
        ]
    )
    assert res.exit_code == 0, res.output
    # CPU-only build: the dimension collapses with a note; a GPU build would bound it to n_layer + 1
    assert "n_gpu_layers collapsed to 0" in res.output or "bounded to the model's real count" in res.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ctx", "8192:4096"], "empty range"),
        (["--threads", "1:4:0"], "step is 0"),
        (["--threads", "0"], "at least 1"),
        (["-ub", "abc"], "integers expected"),
        (["-fa", "maybe"], "unknown value"),
        (["--storage", "nosuchdb://user:hunter2@host/x"], "cannot open storage"),
        (["--storage", "not-a-url"], "bad storage URL"),
        (["--confirm-rounds", "3"], "below the confirmation race's minimum of 5 rounds"),
    ],
)
def test_bad_search_input_is_one_line_exit_2(models, tmp_path, extra, message):
    res = CliRunner().invoke(cli, ["search", "-m", str(models / "tiny-q8_0.gguf"), *extra, "--results", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output and "hunter2" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("trials.parquet"))


def test_unknown_parameter_in_experiment_file(models, tmp_path):
    cfg = tmp_path / "x.toml"
    cfg.write_text('[space]\nn_threads = "1:2"\nwarp_drive = 9\n')
    res = CliRunner().invoke(cli, ["search", "--config", str(cfg), "-m", str(models / "tiny-q8_0.gguf")])
    assert res.exit_code == 2 and "unknown parameter(s) warp_drive" in res.output


def test_unwritable_results_folder(models, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = CliRunner().invoke(cli, ["search", "-m", str(models / "tiny-q8_0.gguf"), "--results", str(blocker / "r")])
    assert res.exit_code == 2 and "cannot create results folder" in res.output


def test_experiment_file_fills_defaults_and_command_line_wins(models, tmp_path):
    cfg = tmp_path / "x.toml"
    cfg.write_text(
        f'[study]\nmodel = ["{models / "tiny-q8_0.gguf"}"]\nn_trials = 2\nstudy = "exp"\n'
        f'drift_every = 0\n[space]\nthreads = "1:2"\nn_ubatch = [64, 128]\n'
        f"[shape]\nn_prompt = 16\nn_gen = 4\nrepetitions = 2\n"
    )
    res = run(
        ["search", "--config", str(cfg), "--results", str(tmp_path), "-ub", "256", "--no-auto-space", "--no-confirm"]
    )
    assert res.exit_code == 0, res.output
    df = store.read(tmp_path / "exp")
    assert len(df) == 2 and set(df["n_ubatch"]) == {256} and set(df["n_prompt"]) == {16}


def test_dominance_rule():
    oom = TrialConfig(
        model="m", n_gpu_layers=10, n_ctx=8192, n_batch=512, n_ubatch=256, type_k="q8_0", type_v="q8_0", flash_attn="on"
    )
    failed = [(7, oom, "cuda oom")]
    bigger = TrialConfig(
        model="m", n_gpu_layers=12, n_ctx=16384, n_batch=512, n_ubatch=512, type_k="f16", type_v="q8_0", flash_attn="on"
    )
    assert dominated_by(bigger, failed) == (7, "cuda oom")
    for smaller in (
        dict(n_gpu_layers=9),
        dict(n_ctx=4096),
        dict(n_ubatch=128),
        dict(type_k="q4_0"),
        dict(use_mmap=False),
        dict(model="other"),
    ):
        cfg = TrialConfig(**{**bigger.to_dict(), "overrides": (), **smaller})
        assert dominated_by(cfg, failed) is None, smaller


def test_drift_is_detected_when_the_machine_slows_down(models, tmp_path):
    """A real slowdown mid-study: the search and its workers on one CPU, and busy hogs start there after the
    first anchor (tests/slowdown.py: the workers then get a quarter of the CPU at most, whatever else runs on this
    machine). Later trials are marked drift."""
    args = [
        TUNER,
        "search",
        "-m",
        str(models / "tiny-q8_0.gguf"),
        "--threads",
        "1",
        "-ub",
        "64,128,256,512",
        "-p",
        "64",
        "-n",
        "1024",
        "-r",
        "6",
        "--n-trials",
        "6",
        "--drift-every",
        "2",
        "--no-auto-space",
        "--no-confirm",
        "--results",
        str(tmp_path),
        "--study",
        "drift",
        "--no-baselines",
    ]
    with pinned() as cpu:
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parquet = tmp_path / "drift" / "trials.parquet"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if (store.read(parquet)["state"] == "anchor").any():
                    break
            except store.StoreError:
                pass
            time.sleep(0.05)
        with Hogs(cpu):
            out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err[-2000:]
    df = store.read(parquet).sort_values("trial_number")
    anchors = df[df["state"] == "anchor"]
    assert len(anchors) >= 2
    assert anchors["tg_ts_mean"].iloc[-1] < anchors["tg_ts_mean"].iloc[0]
    assert "warning: drift" in err
    assert df[df["state"] != "anchor"]["drift"].iloc[-2:].all(), err[-3000:]


def test_a_second_search_never_touches_a_running_one(models, tmp_path):
    args = [
        TUNER,
        "search",
        "-m",
        str(models / "tiny-q8_0.gguf"),
        "--threads",
        "1",
        "-ub",
        "64,128,256,512",
        "-p",
        "256",
        "-n",
        "1024",
        "-r",
        "3",
        "--n-trials",
        "200",
        "--drift-every",
        "0",
        "--no-auto-space",
        "--results",
        str(tmp_path),
        "--study",
        "busy",
    ]
    env = dict(os.environ, TUNER_LOCK_FILE=str(tmp_path / "lock"))
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    parquet = tmp_path / "busy" / "trials.parquet"
    deadline = time.monotonic() + 120
    while _rows(parquet) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(args + ["--no-wait"], capture_output=True, text=True, env=env, timeout=120)
    first.send_signal(signal.SIGINT)  # the first one stops after its current trial
    out, err = first.communicate(timeout=300)
    assert second.returncode == 75 and "another measurement is running" in second.stderr
    assert first.returncode == 0, err[-2000:]
    df = store.read(parquet)
    # on a loaded machine the 4 configs may all be measured before the SIGINT: the race's runs then repeat a
    # searched trial's number (state confirm), which is not a second search's doing
    df = df[df["state"] != "confirm"]
    assert len(df) >= 1 and (df["outcome"] == "ok").all() and df["trial_number"].is_unique


def test_changed_test_shape_does_not_resume_a_study(models, tmp_path):
    base = [
        "search",
        "-m",
        str(models / "tiny-q8_0.gguf"),
        "-t",
        "1",
        "--n-trials",
        "1",
        "--drift-every",
        "0",
        "--no-confirm",
        "--results",
        str(tmp_path),
        "--study",
        "shape",
    ]
    assert run(base + ["-p", "16", "-n", "4", "-r", "2"]).exit_code == 0
    res = CliRunner().invoke(cli, base + ["-p", "64", "-n", "4", "-r", "2"])
    assert res.exit_code == 2 and "exists with another search space" in res.output
    assert set(store.read(tmp_path / "shape")["n_prompt"]) == {16}


def test_synthetic_with_bad_quants_is_one_line(tmp_path):
    res = CliRunner().invoke(cli, ["search", "--synthetic", "tiny", "--quants", "bogus", "--results", str(tmp_path)])
    assert res.exit_code == 2 and "unknown quant type(s): bogus" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_context_smaller_than_the_test_is_refused(models, tmp_path):
    res = CliRunner().invoke(
        cli,
        [
            "search",
            "-m",
            str(models / "tiny-q8_0.gguf"),
            "--ctx",
            "64,1024",
            "-p",
            "128",
            "-n",
            "4",
            "--results",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 2 and "--ctx 64 cannot hold the test" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not list(tmp_path.rglob("trials.parquet"))
    res = CliRunner().invoke(
        cli, ["bench", str(models / "tiny-q8_0.gguf"), "-c", "64", "-p", "128", "-o", str(tmp_path / "b.parquet")]
    )
    assert res.exit_code == 2 and "smaller than the test needs" in res.output


def test_clamped_range_keeps_every_value_reachable(models):
    from tuner.model.meta import read_model
    from tuner.search.space import build_space

    m = str(models / "tiny-q8_0.gguf")
    space = build_space([m], {m: read_model(m)}, {"n_gpu_layers": "0:15:5"}, TrialConfig(model=m), True, 2, 2)
    d = space.dims["n_gpu_layers"]
    assert d.values == [0, 3] and d.step is None  # 3 = 2 blocks + output: "all"


def test_host_and_gpu_ooms_dominate_in_opposite_directions():
    base = dict(model="m", n_ctx=8192, n_gpu_layers=10, n_cpu_moe=2)
    gpu_oom = [(1, TrialConfig(**base), "CUDA error: out of memory")]
    host_oom = [(2, TrialConfig(**base), "ggml_aligned_malloc: insufficient memory")]
    more_gpu = TrialConfig(**{**base, "n_gpu_layers": 12, "n_cpu_moe": 1})
    more_host = TrialConfig(**{**base, "n_gpu_layers": 8, "n_cpu_moe": 3})
    assert dominated_by(more_gpu, gpu_oom) and not dominated_by(more_host, gpu_oom)
    assert dominated_by(more_host, host_oom) and not dominated_by(more_gpu, host_oom)
    assert not dominated_by(TrialConfig(**{**base, "n_gpu_layers": 12, "split_mode": "row"}), gpu_oom)


def test_recommend_with_a_corrupt_recommended_json(study10, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(study10[0], d)
    (d / "recommended.json").write_text("{not json")
    res = CliRunner().invoke(cli, ["recommend", str(d)])
    assert res.exit_code == 2 and "recommended.json is not valid JSON" in res.output


def test_space_bounds_from_min_ctx_and_the_planner(models):
    from tuner.model.meta import read_model
    from tuner.plan.planner import predict
    from tuner.search import feasible as fit
    from tuner.search.space import SpaceError, build_space, require_ctx

    m = str(models / "tiny-q8_0.gguf")
    infos = {m: read_model(m)}
    space = build_space([m], infos, {"n_gpu_layers": "0:3", "n_ctx": "512,2048,8192"}, TrialConfig(model=m), True, 2, 2)
    require_ctx(space, 2048)
    assert space.dims["n_ctx"].values == [2048, 8192]
    with pytest.raises(SpaceError, match="no n_ctx in the space is that large"):
        require_ctx(space, 100_000)
    # a VRAM budget that holds one layer (the output layer) but not two: the planner drops the rest
    one = predict(space.config(m, {"n_gpu_layers": 1, "n_ctx": 2048}), infos[m], gpu_offload=True).vram_bytes
    fit.gpu_region(
        space, infos, fit.Rig(ram_cap=1 << 40, gpu_totals=[one], vram_caps=[one], gpu_free=[one], gpu_offload=True)
    )
    assert max(space.dims["n_gpu_layers"].values) == 1
    assert any("bounded to 1" in n for n in space.notes)


def test_a_load_block_never_outgrows_the_budget_with_configs_already_queued(models, tmp_path):
    """A duplicate's steer may have queued a config before a trial moves to another load: the block queued after
    it counts that config, so no queued trial is left waiting when the budget is spent."""
    from tuner.measure import hardware
    from tuner.model.meta import read_model
    from tuner.record import TrialRecord
    from tuner.search.loop import Search
    from tuner.search.options import SearchOptions
    from tuner.search.space import build_space

    class Kept:  # after_load asks only whether the runner keeps models loaded
        reuse, loaded_key, loaded_keys = True, None, []

    m = str(models / "tiny-q8_0.gguf")
    info = read_model(m)
    space = build_space([m], {m: info}, {"n_ubatch": "64,128,256,512"}, TrialConfig(model=m), False, 2, 2)
    opts = SearchOptions(results=tmp_path, study="blk", n_trials=2, per_load=4, baselines=False, drift_every=0)
    srch = Search(space, opts, {m: info}, hardware.probe(), {}, runner=Kept())
    srch.prepare()
    for ub in (64, 128):  # the steered config, and one more queued behind it
        srch.study.enqueue_trial({"n_ubatch": ub}, user_attrs={"enqueued": "not measured yet"})
    trial = srch.study.ask()
    srch.study.tell(trial, 1.0)
    rec = TrialRecord(config=srch._config_from_params(trial.params), outcome="ok", model_loaded=True)
    srch.after_load(trial, rec)
    waiting = srch.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    assert len(waiting) == 1 and srch.done_trials() + len(waiting) == opts.n_trials
    srch.close()

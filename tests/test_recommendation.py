"""What a user acts on (issue 11): the default space, the working context, the confirmed winner, the ladder.

Real searches on the tiny synthetic model through the CLI; the statistics alone are in tests/test_confirm.py.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import wilcoxon

from tuner.cli import cli
from tuner.measure import store
from tuner.search import confirm

SHAPE = ["-p", "16", "-n", "4", "-r", "2"]


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def new_user(models, tmp_path_factory):
    """`tuner search --model M` and nothing else but a small test shape and a budget above the space."""
    results = tmp_path_factory.mktemp("results")
    res = run(
        [
            "search",
            "--model",
            str(models / "tiny-q8_0.gguf"),
            *SHAPE,
            "--n-trials",
            "40",
            "--drift-every",
            "0",
            "--results",
            str(results),
            "--study",
            "new",
        ]
    )
    assert res.exit_code == 0, res.output
    return results / "new", res.output


def test_default_space_varies_what_matters_and_says_why(new_user):
    d, out = new_user
    m = re.search(r"(\d+) configs \((.*?)\); storage", out)
    varying = dict(x.split("=") for x in m.group(2).split(", "))
    assert {"n_threads", "n_threads_batch", "n_ubatch", "flash_attn"} <= set(varying)
    assert "default space (set any of these yourself to override):" in out
    assert re.search(r"n_ubatch = 128,256,512: physical batch size", out)
    assert "type_k/type_v = f16: KV-cache types change the output" in out
    assert "n_ctx = 4096: the working context: every trial allocates it" in out


def test_a_small_space_is_finished_not_resampled(new_user):
    d, out = new_user
    n = int(re.search(r"(\d+) configs \(", out).group(1))
    assert f"search finished: every config of the space is measured ({n} configs)" in out
    df = store.read(d)
    trials = df[~df["state"].isin(["anchor", "confirm"])]
    keys = trials[["n_threads", "n_threads_batch", "n_ubatch", "flash_attn"]].apply(tuple, axis=1)
    assert len(trials) == n and keys.is_unique  # every config once: no two rows compete for "best"


def test_every_trial_allocates_the_working_context_and_the_forms_carry_it(new_user):
    d, _ = new_user
    df = store.read(d)
    assert set(df["n_ctx"]) == {4096}
    rec = json.loads((d / "recommended.json").read_text())
    assert rec["working_ctx"] == 4096
    assert rec["forms"]["llama_cpp_python"]["n_ctx"] == 4096
    assert " -c 4096 " in rec["forms"]["llama_server"]
    assert "PARAMETER num_ctx 4096" in rec["forms"]["ollama_modelfile"]
    assert rec["forms"]["tuner"]["n_ctx"] == 4096


def test_the_winner_is_confirmed_against_the_defaults(new_user):
    d, out = new_user
    rec = json.loads((d / "recommended.json").read_text())
    conf = rec["confirmation"]
    assert conf["verdict"] in ("separated", "tie") and confirm.MIN_ROUNDS <= conf["rounds"] <= confirm.MAX_ROUNDS
    assert rec["trial_number"] == conf["winner"]
    tops = [c for c in conf["candidates"] if "candidate" in c["roles"]]
    assert len(tops) == 3 and any("llama.cpp defaults" in c["roles"] for c in conf["candidates"])
    for c in conf["candidates"]:  # the race: everyone runs its minimum; who is behind leaves, the winner stays
        assert confirm.MIN_ROUNDS <= c["runs"] <= conf["rounds"] and c["ci95"][0] <= c["median"] <= c["ci95"][1]
    assert next(c for c in conf["candidates"] if c["trial_number"] == conf["winner"])["runs"] == conf["rounds"]
    # the "x the defaults" figure and its verdict, re-derived here with scipy from the saved round values of the
    # two candidates (tuner.stats' rule: the rounds both ran, paired; one-sided in the ratio's direction)
    vs = conf["vs_baseline"]
    win = next(c for c in conf["candidates"] if c["trial_number"] == conf["winner"])
    dflt = next(c for c in conf["candidates"] if "llama.cpp defaults" in c["roles"])
    assert vs["trial_number"] == dflt["trial_number"]
    n = min(len(win["round_values"]), len(dflt["round_values"]))
    a, b = np.array(win["round_values"][:n]), np.array(dflt["round_values"][:n])
    ratio = float(np.median(a / b))  # mixed t/s: higher is better
    assert vs["rounds"] == n and vs["ratio"] == pytest.approx(ratio, rel=1e-9)
    assert vs["ci95"][0] <= ratio <= vs["ci95"][1]
    if win is dflt:
        assert vs["verdict"] == "same config" and ratio == 1.0
    else:
        p = wilcoxon(np.log(a / b), alternative="greater" if ratio >= 1 else "less").pvalue
        assert vs["p"] == pytest.approx(p, rel=1e-6)
        told_apart = p < 0.05 and abs(ratio - 1) > 0.01 and not vs["ci95"][0] <= 1 <= vs["ci95"][1]
        assert vs["verdict"] == (("faster" if ratio > 1 else "slower") if told_apart else "tie")
    base = rec["baselines"]["llama.cpp defaults"]
    assert base["source"] == "confirmation" and base["trial_number"] == dflt["trial_number"]
    assert base["recommended_vs_baseline"] == pytest.approx(ratio, rel=1e-9) and base["verdict"] == vs["verdict"]
    assert re.search(r"x the llama.cpp defaults baseline \(95 % interval [\d.]+-[\d.]+, ", out)
    # tuner recommend re-derives the same verdict from trials.parquet alone
    again = json.loads(run(["recommend", str(d), "--json", "--no-write"]).output)
    assert again["confirmation"]["winner"] == conf["winner"] and again["confirmation"]["verdict"] == conf["verdict"]
    # --no-write prints the summary but claims no file (recommended.json stays as the search wrote it)
    before = (d / "recommended.json").stat().st_mtime_ns
    summary = run(["recommend", str(d), "--no-write"]).output
    assert "recommended (trial #" in summary and "written:" not in summary
    assert (d / "recommended.json").stat().st_mtime_ns == before


def test_context_ladder_searches_once_and_measures_every_rung_filled_against_the_defaults(models, tmp_path):
    res = run(
        [
            "search",
            "-m",
            str(models / "tiny-q8_0.gguf"),
            "--ctx",
            "256,1024",
            "-t",
            "1",
            "-fa",
            "on,off",
            *SHAPE,
            "--no-auto-space",
            "--confirm",
            "2",
            "--confirm-rounds",
            "5",
            "--drift-every",
            "0",
            "--results",
            str(tmp_path),
            "--study",
            "ladder",
        ]
    )
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "ladder" / "recommended.json").read_text())
    # the search ran once, at the working context (the largest rung), filled: depth = n_ctx - n_prompt - n_gen
    df = store.read(tmp_path / "ladder")
    searched = df[df["state"] != "confirm"]
    assert set(searched["n_ctx"]) == {1024} and set(searched["n_depth"]) == {1024 - 16 - 4}
    assert rec["config"]["n_ctx"] == rec["working_ctx"] == 1024 and rec["config"]["n_depth"] == 1004
    ladder = rec["context_ladder"]
    assert [(r["n_ctx"], r["n_depth"]) for r in ladder] == [(256, 236), (1024, 1004)]
    for r in ladder:
        assert r["confirmed"] and r["rounds"] == 5 and r["trial_number"] == rec["trial_number"]
        assert r["tg_ts"] and r["pp_ts"] and r["peak_rss_bytes"] and r["defaults"]["tg_ts"]
        # like with like: the defaults at the same context and depth, paired by the ladder's rounds
        assert r["defaults"]["config"]["n_ctx"] == r["n_ctx"] and r["vs_defaults"]["rounds"] == 5
        assert r["vs_defaults"]["verdict"] in ("faster", "slower", "tie", "same config")
        # flash attention depends on the context: the other value is measured at every rung, alone
        alt = [a for a in r["alternatives"] if a["kind"] == "context-dependent"]
        assert len(alt) == 1 and list(alt[0]["differs"]) == ["flash_attn"]
    runs = df[df["state"] == "confirm"]
    rungs = runs[runs["baseline"].str.contains("rung")]
    # every rung candidate (recommended, defaults/alternative) for 5 rounds at each of the 2 rungs, filled
    assert len(rungs) == 2 * 2 * 5 and set(zip(rungs["n_ctx"], rungs["n_depth"])) == {(256, 236), (1024, 1004)}
    # filled at most once per rung and KV settings (the search may have filled the working rung already), then
    # restored by every later run, each in a fresh worker
    kv = rungs[["n_ctx", "n_depth", "flash_attn", "type_k", "type_v", "n_ubatch", "n_gpu_layers"]].drop_duplicates()
    assert 1 <= rungs["depth_fill_ms"].notna().sum() <= len(kv) < len(rungs)
    assert rungs["depth_restore_ms"].notna().all()
    assert "context ladder: the recommended config (#" in res.output
    assert re.search(r"^ +256 +236 ", res.output, re.M) and re.search(r"^ +1024 +1004 ", res.output, re.M)
    # recommend re-derives the same ladder from the trials alone
    again = json.loads(run(["recommend", str(tmp_path / "ladder"), "--json", "--no-write"]).output)
    assert again["context_ladder"] == ladder


def test_no_confirm_says_the_figure_is_unconfirmed(models, tmp_path):
    res = run(
        [
            "search",
            "-m",
            str(models / "tiny-q8_0.gguf"),
            "--threads",
            "1:2",
            *SHAPE,
            "--no-auto-space",
            "--no-confirm",
            "--n-trials",
            "6",
            "--drift-every",
            "0",
            "--results",
            str(tmp_path),
            "--study",
            "nc",
        ]
    )
    assert res.exit_code == 0, res.output
    assert "search finished: every config of the space is measured (2 configs)" in res.output
    rec = json.loads((tmp_path / "nc" / "recommended.json").read_text())
    assert rec["confirmation"]["verdict"] == "unconfirmed" and "winner's curse" in rec["confirmation"]["reason"]
    assert not (store.read(tmp_path / "nc")["state"] == "confirm").any()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ctx", "200000"], "above the trained context of tiny-q8_0.gguf (131072 tokens)"),
        (["--depth", "4096"], "--depth 4096 is beyond the context 4096"),
        (["--ctx", "256,4096", "--depth", "300"], "--depth 300 is beyond the context 256 of --ctx 256,4096"),
        (["--ctx", "256,4096", "-p", "512"], "--ctx 256 cannot hold the test"),
        (["--confirm", "0"], "--confirm"),
        (["--ctx", "65536,131072", "--max-ram", "2MiB"], "no context of --ctx 65536,131072 can fit"),
    ],
)
def test_bad_recommendation_input_is_one_line_exit_2(models, tmp_path, extra, message):
    res = CliRunner().invoke(cli, ["search", "-m", str(models / "tiny-q8_0.gguf"), *extra, "--results", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("trials.parquet"))

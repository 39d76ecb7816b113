"""Quality in the search (issue 12 item 5): real quality passes (an F32 reference and llama.cpp's q8_0 / q4_k_m /
q2_k of the tiny synthetic model), real trials, the budget applied to the recommendation and its re-derivation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tuner.cli import cli
from tuner.measure import store
from tuner.model.synth import synthesize
from tuner.quality.measure import Budget, StudyQuality
from tuner.quality.results import Cache
from tuner.search import recommend as recommendlib
from tuner.search.options import Limits
from tuner.search.run import study_hardware

QUANTS = ("q8_0", "q4_k_m", "q2_k")
# between the tiny model's q4_k_m (KLD ~0.0014 at ctx 64) and q2_k (~0.014): q2_k misses it by a factor ~3
BUDGET = 0.005


@pytest.fixture(scope="module")
def tiny(models) -> dict[str, str]:
    paths = synthesize(models / "quality", "tiny", ("f32",) + QUANTS)
    return {p.stem.split("-", 1)[1]: str(p) for p in paths}


def search_args(tiny, results: Path, *extra) -> list[str]:
    return [
        "search",
        *[a for k in QUANTS for a in ("-m", tiny[k])],
        "--reference",
        tiny["f32"],
        "--quality-ctx",
        "64",
        "-t",
        "1",
        "-p",
        "16",
        "-n",
        "8",
        "-r",
        "1",
        "--no-auto-space",
        "--sampler",
        "grid",
        "--drift-every",
        "0",
        "--no-baselines",
        "--results",
        str(results),
        "--study",
        "q",
        *extra,
    ]


def invoke(args, tmp: Path):
    return CliRunner().invoke(cli, [str(a) for a in args], env={"TUNER_LOCK_FILE": str(tmp / "measure.lock")})


@pytest.fixture(scope="module")
def study(tiny, tmp_path_factory) -> tuple[Path, object]:
    """Three quants, one config each, a one-round confirmation of the top 2, budget between q4_k_m and q2_k."""
    tmp = tmp_path_factory.mktemp("qsearch")
    res = invoke(search_args(tiny, tmp, "--max-kld", BUDGET, "--confirm", "2", "--confirm-rounds", "5"), tmp)
    assert res.exit_code == 0, res.output
    return tmp / "q", res


def by_type(recs):
    return {r.model_file_type: r for r in recs}


def test_search_records_quality_and_never_recommends_a_quant_over_budget(study, tiny):
    folder, res = study
    recs = store.records(folder)
    searched = by_type([r for r in recs if r.searched])
    assert set(searched) == {"Q8_0", "Q4_K_M", "Q2_K"}
    # every record carries its file's figures, as the quality pass measured them (in quality.json)
    sq = StudyQuality.load(folder)
    assert sq is not None and sq.budget.max_kld == BUDGET and len(sq.results) == 3
    for r in recs:
        res_q = sq.lookup(r.model_hash, r.config.type_k, r.config.type_v)
        assert r.kld_mean == res_q.kld_mean and r.same_top_pct == res_q.same_top_pct
    assert searched["Q8_0"].kld_mean < searched["Q4_K_M"].kld_mean < BUDGET < searched["Q2_K"].kld_mean
    assert searched["Q2_K"].quality_ok is False and searched["Q4_K_M"].quality_ok is True
    # q2_k was searched (its speed is known) but never confirmed nor recommended
    assert not [r for r in recs if r.state == "confirm" and r.model_file_type == "Q2_K"]
    assert {r.model_file_type for r in recs if r.state == "confirm"} == {"Q8_0", "Q4_K_M"}
    rec = json.loads((folder / "recommended.json").read_text())
    assert rec["model"]["file_type"] in ("Q8_0", "Q4_K_M")
    files = {Path(f["model"]).name: f for f in rec["quality"]["files"]}
    q2 = files["tiny-q2_k.gguf"]
    assert q2["within_budget"] is False and f"> {BUDGET:g}" in q2["reason"]
    assert q2["best_objective"] > 0 and q2["best_trial_number"] == searched["Q2_K"].trial_number
    assert sum(f["recommended"] for f in files.values()) == 1
    # the terminal says what the quant left out would have cost
    assert "tiny-q2_k.gguf (KV f16/f16): KLD" in res.output and "not recommended: mean KLD" in res.output


def test_recommend_rederives_under_the_same_budget(study, tmp_path):
    folder, _ = study
    before = json.loads((folder / "recommended.json").read_text())
    r = invoke(["recommend", folder, "--json", "--no-write"], tmp_path)
    assert r.exit_code == 0, r.output
    again = json.loads(r.output)
    assert again["model"]["hash"] == before["model"]["hash"] and again["trial_number"] == before["trial_number"]
    assert again["quality"]["files"] == before["quality"]["files"]


def test_a_tighter_budget_leaves_only_the_files_within_it(study):
    """The library filter: a budget only q8_0 meets makes it the recommendation whatever the speeds."""
    folder, _ = study
    recs = store.records(folder)
    sq = StudyQuality.load(folder)
    q8 = next(r for r in sq.results if r.file_type == "Q8_0")
    tight = StudyQuality(sq.results, Budget(max_kld=q8.kld_mean * 2))
    out = recommendlib.recommend(recs, study_hardware(recs[0]), Limits(), "mixed", quality=tight)
    assert out["model"]["file_type"] == "Q8_0"
    assert [f["within_budget"] for f in out["quality"]["files"]] == [True, False, False]
    none = StudyQuality(sq.results, Budget(max_kld=0.0, min_same_top=100.0))
    assert recommendlib.recommend(recs, study_hardware(recs[0]), Limits(), "mixed", quality=none) is None


def test_a_resumed_search_pays_nothing_for_quality(study, tiny):
    folder, _ = study
    cache = Cache(folder.parent)
    before = cache.path.read_text()
    res = invoke(search_args(tiny, folder.parent, "--max-kld", BUDGET, "--no-confirm"), folder.parent)
    assert res.exit_code == 0, res.output
    assert "quality [" not in res.output  # no pass ran: no progress line
    assert res.output.count("(cached)") == 3
    assert cache.path.read_text() == before


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--max-kld", "-0.01"], "--max-kld must not be negative"),
        (["--min-same-top", "-5"], "--min-same-top is a percentage"),
        (["--reference", "{moe}"], "the reference (moe-q8_0.gguf) has 2048"),
    ],
)
def test_bad_quality_input_is_one_line_exit_2_nothing_written(tiny, models, tmp_path, extra, words):
    args = search_args(tiny, tmp_path / "results", "--no-confirm")
    if extra[0] == "--reference":
        args[args.index("--reference") + 1] = str(models / "moe-q8_0.gguf")
    else:
        args += extra
    res = invoke(args, tmp_path)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tuner: error: ") and words in lines[0], res.stderr
    assert not (tmp_path / "results").exists()


def test_report_charts_speed_against_kld_with_the_budget(study, tmp_path):
    from tuner import report

    folder, _ = study
    rep = report.build([folder])
    rep.write(tmp_path / "out")
    ch = next(c for c in rep.charts if c.key == "10-speed-vs-kld")
    assert ch.counts["ok"] == 3 and ch.counts["budget"] == 1 and ch.counts["recommended"] == 1 and not ch.notes
    ax = ch.fig.axes[0]
    budget_lines = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == [BUDGET, BUDGET]]
    assert len(budget_lines) == 1
    md = (tmp_path / "out" / "report.md").read_text()
    table = md.split("### Quality")[1].split("\n### ")[0]
    assert "tiny-q2_k.gguf" in table and "mean KLD" in table and "recommended" in table


def test_compare_gates_a_quality_regression(study, tmp_path):
    """The records' own figures: q4_k_m's trials as BASELINE and q2_k's as CURRENT (paired with --ignore model)
    regress in KLD by ~10x; q4_k_m against itself does not."""
    folder, _ = study
    recs = [r for r in store.records(folder) if r.searched]
    q4 = [r for r in recs if r.model_file_type == "Q4_K_M"]
    q2 = [r for r in recs if r.model_file_type == "Q2_K"]
    base, cur, same = tmp_path / "base.parquet", tmp_path / "cur.parquet", tmp_path / "same.parquet"
    store.append(base, q4)
    store.append(cur, q2)
    store.append(same, q4)
    r = invoke(["compare", base, cur, "--ignore", "model", "--json", "--no-wait"], tmp_path)
    assert r.exit_code == 1, r.output
    res = [m for p in json.loads(r.output)["pairs"] for m in p["metrics"] if m["metric"] == "kld"]
    assert len(res) == 1 and res[0]["verdict"] == "regression"
    assert res[0]["base"] == q4[0].kld_mean and res[0]["cur"] == q2[0].kld_mean
    r = invoke(["compare", base, same, "--json", "--no-wait"], tmp_path)
    assert r.exit_code == 0, r.output
    res = [m for p in json.loads(r.output)["pairs"] for m in p["metrics"] if m["metric"] == "kld"]
    assert [m["verdict"] for m in res] == ["unchanged"]
    # the threshold is the user's: a 2000 % allowance lets the q2_k step through
    r = invoke(["compare", base, cur, "--ignore", "model", "--max-kld-increase", "2000", "--no-wait"], tmp_path)
    assert r.exit_code == 0 and "kld" in r.output, r.output


def test_kv_cache_types_are_budgeted_per_combination(tiny, tmp_path):
    """-ctk f16,q4_0: quality is measured per (file, type_k, type_v) and each trial carries its own pair's."""
    args = [
        "search",
        "-m",
        tiny["q8_0"],
        "--reference",
        tiny["f32"],
        "--quality-ctx",
        "64",
        "-t",
        "1",
        "-p",
        "16",
        "-n",
        "8",
        "-r",
        "1",
        "-ctk",
        "f16,q4_0",
        "-fa",
        "on",
        "--no-auto-space",
        "--sampler",
        "grid",
        "--drift-every",
        "0",
        "--no-baselines",
        "--no-confirm",
        "--results",
        tmp_path,
        "--study",
        "kv",
    ]
    res = invoke(args, tmp_path)
    assert res.exit_code == 0, res.output
    sq = StudyQuality.load(tmp_path / "kv")
    assert sorted((r.type_k, r.type_v) for r in sq.results) == [("f16", "f16"), ("q4_0", "f16")]
    assert all(r.ok for r in sq.results)
    by_kv = {r.type_k: r for r in sq.results}
    # a quantized K cache changes the output: its own KLD, larger than the f16 cache's
    assert by_kv["q4_0"].kld_mean > by_kv["f16"].kld_mean
    recs = [r for r in store.records(tmp_path / "kv") if r.searched]
    assert {r.config.type_k for r in recs} == {"f16", "q4_0"}
    for r in recs:
        assert r.kld_mean == by_kv[r.config.type_k].kld_mean
    files = json.loads((tmp_path / "kv" / "recommended.json").read_text())["quality"]["files"]
    assert sorted(f["type_k"] for f in files) == ["f16", "q4_0"]

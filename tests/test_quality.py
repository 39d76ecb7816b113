"""tuner quality with real llama.cpp and real GGUF files: synthetic models (tuner.model.synth, an F32 reference and
llama.cpp's own quants of it) and the real Gemma 3 270M. Faults are real signals to real worker processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import psutil
import pytest
from click.testing import CliRunner
from conftest import worker_processes
from scipy.special import log_softmax

from tuner.cli import cli
from tuner.measure.runner import Runner
from tuner.model.synth import synthesize
from tuner.quality.kld import KLD_CUTOFF, compare_rows, statistics, summarize_rows
from tuner.quality.logits import QualityError, ReferenceLogits, default_text_path
from tuner.quality.measure import DEFAULT_MAX_KLD, DEFAULT_TOP_K, Budget, Settings, measure, qualifying
from tuner.quality.results import STAT_KEYS, Cache, QualityResult, judge_regression

GEMMA = "gemma-3-270m-q4_k_m.gguf"  # the real model, next to the synthetic ones (tests/conftest.py)
FAST = Settings(ctx=64, n_threads=1)  # tiny model: 64-token chunks, ~140 of them in the default text


@pytest.fixture(scope="module")
def tiny(models) -> dict[str, str]:
    """An F32 reference and llama.cpp's q8_0 / q4_k_m / q2_k of it (seed 0: same bytes every time)."""
    paths = synthesize(models / "quality", "tiny", ("f32", "q8_0", "q4_k_m", "q2_k"))
    return {p.stem.split("-", 1)[1]: str(p) for p in paths}


@pytest.fixture(scope="module")
def runner():
    with Runner(timeout=300) as r:
        yield r


def quiet(*_):
    pass


# -- the arithmetic, against an independent computation ---------------------------------------------------
def random_logits(seed: int, n: int = 40, n_vocab: int = 3000, noise: float = 0.3):
    rng = np.random.default_rng(seed)
    # a peaked head and a long flat tail, like a language model's next-token logits
    ref = rng.standard_normal((n, n_vocab)) * 2.0 - 4.0 * np.log1p(np.arange(n_vocab))[None, :] ** 0.5
    ref = ref[:, rng.permutation(n_vocab)].astype(np.float32)
    model = (ref + rng.standard_normal(ref.shape) * noise).astype(np.float32)
    targets = rng.integers(0, n_vocab, n)
    return ref, model, targets


def direct_kld(ref: np.ndarray, model: np.ndarray) -> np.ndarray:
    lp = log_softmax(ref.astype(np.float64), axis=1)
    lq = log_softmax(model.astype(np.float64), axis=1)
    return np.where(lp > KLD_CUTOFF, np.exp(lp) * (lp - lq), 0.0).sum(axis=1)


def test_full_vocabulary_is_exact_kl_divergence():
    ref, model, targets = random_logits(1)
    buf = np.empty_like(ref)
    summary = summarize_rows(ref, targets, 0, buf)
    out = compare_rows(model, targets, summary, buf)
    np.testing.assert_allclose(out["kld"], direct_kld(ref, model), rtol=1e-5, atol=1e-7)
    lq = log_softmax(model.astype(np.float64), axis=1)
    np.testing.assert_allclose(out["nll"], -lq[np.arange(len(targets)), targets], rtol=1e-6)
    np.testing.assert_array_equal(out["same_top"], ref.argmax(1) == model.argmax(1))
    assert 0 < out["same_top"].mean() < 1  # the case distinguishes agreement from disagreement


@pytest.mark.parametrize("noise", [0.3, 0.01], ids=["lossy", "near-lossless"])
def test_top_k_with_tail_samples_estimates_the_full_sum(noise):
    ref, model, targets = random_logits(2, n=400, noise=noise)
    buf = np.empty_like(ref)
    exact = direct_kld(ref, model)
    sampled = compare_rows(model, targets, summarize_rows(ref, targets, 64, buf, 64), buf)["kld"]
    bucket = compare_rows(model, targets, summarize_rows(ref, targets, 64, buf, 0), buf)["kld"]
    # one bucket for the tail is a lower bound (log-sum inequality) and here a poor one ...
    assert np.all(bucket <= exact + 1e-6)  # (up to the float32 rounding of the stored log-probs)
    assert bucket.mean() < 0.9 * exact.mean()
    # ... the sampled tail (with its control variate) is unbiased and quiet even when the KLD is tiny
    assert abs(sampled.mean() / exact.mean() - 1) < 0.02
    assert np.median(np.abs(sampled / exact - 1)) < 0.1  # per position too, not only on average


def test_statistics_as_llama_perplexity_prints_them():
    rng = np.random.default_rng(3)
    kld = rng.gamma(0.5, 0.02, 999)
    nll_ref = rng.gamma(2.0, 1.5, 999)
    nll = nll_ref + rng.normal(0.05, 0.1, 999)
    same = rng.random(999) < 0.9
    st = statistics(kld, nll, nll_ref, same)
    n = len(kld)
    s = np.sort(kld)
    pos = 0.99 * (n - 1)  # llama-perplexity's percentile: linear between the two neighbours
    p99 = (1 - (pos - int(pos))) * s[int(pos)] + (pos - int(pos)) * s[int(pos) + 1]
    assert st["kld_p99"] == pytest.approx(p99, rel=1e-12)
    assert st["kld_median"] == pytest.approx((s[n // 2] + s[n // 2 - 1]) / 2 if n % 2 == 0 else s[n // 2])
    assert st["kld_mean_err"] == pytest.approx(kld.std() / np.sqrt(n - 1), rel=1e-9)
    assert st["ppl"] == pytest.approx(np.exp(nll.mean())) and st["ppl_ref"] == pytest.approx(np.exp(nll_ref.mean()))
    assert st["ln_ppl_ratio"] == pytest.approx(nll.mean() - nll_ref.mean())
    assert st["same_top_pct"] == pytest.approx(100 * same.mean())
    assert st["n_tokens"] == n


# -- real passes on synthetic models -------------------------------------------------------------------------
def test_identical_file_and_saved_reference(tiny, runner, tmp_path):
    saved = tmp_path / "ref.npz"
    live = measure(
        [tiny["f32"], tiny["q4_k_m"], tiny["q2_k"]], runner, settings=FAST, progress=quiet, save_reference=str(saved)
    )
    by = {Path(r.model).stem: r for r in live}
    assert all(r.ok for r in live), [(r.outcome, r.cause) for r in live]
    ref = by["tiny-f32"]  # measured against its own summary in the reference pass: 0 within float error
    assert ref.is_reference and abs(ref.kld_mean) < 1e-9 and ref.same_top_pct == 100
    # the header identifies model, tokenizer, text and ctx
    header = ReferenceLogits.read_header(saved)
    assert header["arch"] == "llama" and header["n_vocab"] == 512 and header["ctx"] == 64
    assert header["model_hash"] == by["tiny-f32"].model_hash and header["text_hash"] == by["tiny-f32"].text_hash

    # the same file under another name, in a real compare pass against the saved reference: KLD 0, all tops agree
    copy = tmp_path / "copy-of-f32.gguf"
    shutil.copyfile(tiny["f32"], copy)
    again = measure(
        [str(copy), tiny["q4_k_m"], tiny["q2_k"]],
        runner,
        reference_logits=str(saved),
        settings=Settings(n_threads=1),
        progress=quiet,
    )
    same = again[0]
    assert same.ok and same.n_tokens == by["tiny-f32"].n_tokens > 1000
    assert abs(same.kld_mean) < 1e-6 and same.kld_max < 1e-5
    assert same.same_top_pct == 100.0
    assert same.ppl == pytest.approx(same.ppl_ref, rel=1e-6)
    # the saved reference reproduces the live reference's figures
    for live_r, saved_r in zip(live[1:], again[1:]):
        for k in STAT_KEYS:
            assert saved_r.stats[k] == pytest.approx(live_r.stats[k], rel=1e-9, abs=1e-12), k


def test_kld_orders_the_quants(tiny, runner):
    res = measure(
        [tiny["q2_k"], tiny["q8_0"], tiny["q4_k_m"]], runner, reference=tiny["f32"], settings=FAST, progress=quiet
    )
    assert all(r.ok for r in res), [(r.outcome, r.cause) for r in res]
    q2, q8, q4 = res
    # each step down costs several times more divergence, far beyond the standard errors
    assert q8.kld_mean * 5 < q4.kld_mean and q4.kld_mean * 3 < q2.kld_mean
    for lo, hi in ((q8, q4), (q4, q2)):
        assert hi.kld_mean - lo.kld_mean > 10 * (hi.kld_mean_err + lo.kld_mean_err)
    assert q8.same_top_pct > q4.same_top_pct > q2.same_top_pct
    assert q8.ppl_ref == q4.ppl_ref == q2.ppl_ref  # one reference, one text
    assert qualifying(res, Budget(max_kld=q4.kld_mean * 1.01)) == {
        q2.model: (False, f"mean KLD {q2.kld_mean:.4f} > {q4.kld_mean * 1.01:g}"),
        q8.model: (True, ""),
        q4.model: (True, ""),
    }


def test_cache_pays_once_per_file(tiny, runner, tmp_path):
    cache = Cache(tmp_path / "results")
    first = measure([tiny["f32"], tiny["q8_0"]], runner, settings=FAST, cache=cache, progress=quiet)
    assert not any(r.cached for r in first)
    assert cache.path.is_file() and len(list(cache.dir.glob("reference-*.npz"))) == 1
    # everything cached: no worker is needed at all
    second = measure([tiny["f32"], tiny["q8_0"]], None, settings=FAST, cache=cache, progress=quiet)
    assert all(r.cached for r in second)
    assert [r.stats for r in second] == [r.stats for r in first]
    # another ctx is another measurement; the cached reference summary is reused for a new file
    other = measure([tiny["q8_0"]], runner, settings=Settings(ctx=32, n_threads=1), cache=cache, progress=quiet)
    assert not other[0].cached and other[0].ctx == 32
    # (the default reference is the highest-precision file given: name the F32 one, or q8_0 would be it)
    third = measure(
        [tiny["q8_0"], tiny["q2_k"]], runner, reference=tiny["f32"], settings=FAST, cache=cache, progress=quiet
    )
    assert third[0].cached and not third[1].cached and third[1].ok


def test_killed_worker_is_a_recorded_failure_and_the_rest_go_on(tiny, runner, tmp_path):
    cache = Cache(tmp_path / "results")
    victim = Path(tiny["q4_k_m"]).name
    killed = []

    def kill_mid_pass(label, done, total, t0):
        if label == victim and 0 < done < total and not killed:
            procs = worker_processes()
            assert len(procs) == 1  # the worker running this pass, no spare yet
            os.kill(procs[0].pid, signal.SIGKILL)
            killed.append(procs[0].pid)

    res = measure(
        [tiny["q8_0"], tiny["q4_k_m"], tiny["q2_k"]],
        runner,
        reference=tiny["f32"],
        settings=FAST,
        cache=cache,
        progress=kill_mid_pass,
    )
    assert killed
    q8, q4, q2 = res
    assert q8.ok and q2.ok
    assert q4.outcome == "crash" and "SIGKILL" in q4.cause and q4.kld_mean is None
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    # only results are cached: the next run measures the killed file and reuses the others
    again = measure(
        [tiny["q8_0"], tiny["q4_k_m"], tiny["q2_k"]],
        runner,
        reference=tiny["f32"],
        settings=FAST,
        cache=cache,
        progress=quiet,
    )
    assert [r.cached for r in again] == [True, False, True] and again[1].ok


def test_fault_inside_the_worker_is_classified(tiny, runner):
    res = measure(
        [tiny["q8_0"], tiny["q2_k"]],
        runner,
        reference=tiny["f32"],
        settings=FAST,
        progress=quiet,
        faults={tiny["q8_0"]: "abort"},
    )
    assert res[0].outcome == "crash" and "SIGABRT" in res[0].cause
    assert res[1].ok


# -- budget and regression judgement -------------------------------------------------------------------------
def result(kld: float, err: float, **kw) -> QualityResult:
    base = dict(model="m.gguf", model_hash="h", reference_hash="r", text_hash="t", ctx=512, top_k=256, tail_samples=256)
    return QualityResult(**{**base, **kw}, stats={"kld_mean": kld, "kld_mean_err": err, "same_top_pct": 90.0})


def test_budget_and_regression_verdicts():
    assert Budget().max_kld == DEFAULT_MAX_KLD
    assert Budget(max_kld=0.1).judge(result(0.05, 0.001)) == (True, "")
    assert Budget(max_kld=0.1, min_same_top=95).judge(result(0.05, 0.001))[0] is False
    assert Budget().judge(QualityResult(model="m", model_hash="h", outcome="oom", cause="x"))[0] is False
    with pytest.raises(QualityError, match="must not be negative"):
        Budget(max_kld=-0.1)
    assert judge_regression(result(0.030, 0.001), result(0.045, 0.001)).verdict == "regression"
    assert judge_regression(result(0.045, 0.001), result(0.030, 0.001)).verdict == "improvement"
    assert judge_regression(result(0.030, 0.001), result(0.031, 0.001)).verdict == "unchanged"
    assert judge_regression(result(0.030, 0.010), result(0.045, 0.010)).verdict == "inconclusive"
    assert judge_regression(result(0.03, 0.001), result(0.05, 0.001, ctx=256)).verdict == "incomparable"
    d = result(0.03, 0.001).to_dict()
    assert judge_regression(d, result(0.05, 0.001).to_dict()).verdict == "regression"


# -- the command line ----------------------------------------------------------------------------------------
def invoke(*args):
    return CliRunner().invoke(cli, ["quality", *map(str, args)])


def test_cli_json_cache_and_budget(tiny, tmp_path):
    results = tmp_path / "results"
    common = ["-m", tiny["f32"], "-m", tiny["q8_0"], "-m", tiny["q2_k"], "-c", 64, "-t", 1, "--results", results]
    r = invoke(*common, "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [Path(x["model"]).name for x in rows] == ["tiny-f32.gguf", "tiny-q8_0.gguf", "tiny-q2_k.gguf"]
    for x in rows:
        assert {
            "kld_mean",
            "kld_mean_err",
            "kld_median",
            "kld_p99",
            "same_top_pct",
            "ppl",
            "ppl_ratio",
            "n_tokens",
            "model",
            "model_hash",
        } <= set(x)
    assert rows[0]["is_reference"] and abs(rows[0]["kld_mean"]) < 1e-9
    assert rows[2]["kld_mean"] > rows[1]["kld_mean"] > 0
    assert "ETA" in r.stderr
    # again: all from the cache; a budget that q2_k misses makes the exit code 1
    budget = (rows[1]["kld_mean"] + rows[2]["kld_mean"]) / 2
    r2 = invoke(*common, "--max-kld", budget)
    assert r2.exit_code == 1, r2.output
    assert "(cached)" in r2.stdout and "mean KLD" in r2.stdout.splitlines()[3]
    assert "ETA" not in r2.stderr


@pytest.fixture(scope="module")
def saved_ref(tiny, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("ref") / "tiny-ref.npz"
    r = invoke("-m", tiny["f32"], "-c", 64, "-t", 1, "--no-cache", "--save-reference-logits", p)
    assert r.exit_code == 0 and p.is_file(), r.output
    return p


BAD = [
    ("other-vocabulary", ["-m", "{moe}", "--reference", "{f32}"], "vocabulary of 2048 tokens"),
    ("other-architecture", ["-m", "{q8_0}", "--reference", "{gemma}"], "is a llama model but the reference"),
    ("text-shorter-than-a-chunk", ["-m", "{q8_0}", "--text", "{short}"], "shorter than one chunk"),
    ("ctx-below-16", ["-m", "{q8_0}", "-c", "8"], "--ctx must be at least 16"),
    ("ctx-above-trained", ["-m", "{q8_0}", "-c", "200000"], "above tiny-q8_0.gguf's trained context (131072)"),
    ("logits-other-model", ["-m", "{moe}", "--reference-logits", "{saved}"], "vocabulary of 2048 tokens"),
    (
        "logits-other-text",
        ["-m", "{q8_0}", "--reference-logits", "{saved}", "--text", "{short}"],
        "made from another text",
    ),
    ("logits-other-ctx", ["-m", "{q8_0}", "--reference-logits", "{saved}", "-c", "128"], "made with --ctx 64"),
    ("logits-not-a-logits-file", ["-m", "{q8_0}", "--reference-logits", "{short}"], "not a tuner reference logits"),
    ("max-kld-negative", ["-m", "{q8_0}", "--max-kld", "-0.01"], "--max-kld must not be negative"),
    ("text-not-utf8", ["-m", "{q8_0}", "--text", "{latin1}"], "not UTF-8"),
    ("text-missing", ["-m", "{q8_0}", "--text", "{nowhere}"], "text file not found"),
    ("no-model", [], "no model"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(case, tiny, models, saved_ref, tmp_path, request):
    _, args, words = case
    # the real model comes from the test extra's packages (tuner.model.real); it is assembled only when a case needs it
    gemma = request.getfixturevalue("gemma_model") if "{gemma}" in args else models / GEMMA
    short = tmp_path / "short.txt"
    short.write_text("Too short for a chunk.\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    subs = {
        **tiny,
        "moe": models / "moe-q8_0.gguf",
        "gemma": gemma,
        "short": short,
        "latin1": latin1,
        "saved": saved_ref,
        "nowhere": tmp_path / "nowhere.txt",
    }
    results, target = tmp_path / "results", tmp_path / "out.npz"
    before = saved_ref.read_bytes()
    r = invoke(
        *[a.format(**{k: str(v) for k, v in subs.items()}) for a in args],
        "-t",
        1,
        "--results",
        results,
        "--save-reference-logits",
        target,
    )
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("tuner: error: ") and words in lines[-1], r.stderr
    assert not results.exists() and not target.exists() and not list(tmp_path.glob("out.npz*"))
    assert saved_ref.read_bytes() == before


# -- the real Gemma 3 270M -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma(gemma_model) -> Path:
    """The real model, assembled from the test extra's packages (conftest's gemma_model): never skipped."""
    return gemma_model


@pytest.fixture(scope="module")
def gemma_q4_0(gemma) -> str:
    """A lower quant of the real model: llama.cpp requantizes its Q4_K_M (allow_requantize)."""
    from tuner.llama import quantize
    from tuner.model.synth import quant_ftypes

    dst = gemma.parent / "quality" / "gemma-3-270m-q4_0.gguf"
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        part = dst.with_suffix(".gguf.part")
        quantize(gemma, part, quant_ftypes()["q4_0"], allow_requantize=True)
        os.replace(part, dst)
    return str(dst)


def test_gemma_identical_file_and_a_lower_quant(gemma, gemma_q4_0, runner, tmp_path):
    text = tmp_path / "text.txt"
    text.write_bytes(default_text_path().read_bytes()[:3000])  # ~700 tokens: 2 chunks of 256
    saved = tmp_path / "gemma-ref.npz"
    s = Settings(ctx=256, n_threads=1)
    measure([str(gemma)], runner, text=str(text), settings=s, save_reference=str(saved), progress=quiet)
    assert saved.stat().st_size < 3 << 20  # 262k vocabulary, yet a few MB: top-k and tail samples only
    copy = tmp_path / "gemma-copy.gguf"
    shutil.copyfile(gemma, copy)
    same, low = measure(
        [str(copy), gemma_q4_0], runner, reference_logits=str(saved), progress=quiet, settings=Settings(n_threads=1)
    )
    assert same.ok and low.ok, (same.cause, low.cause)
    assert abs(same.kld_mean) < 1e-5 and same.same_top_pct == 100.0
    assert same.n_tokens >= 254 and same.n_tokens % 127 == 0  # 127 scored positions per chunk of 256
    assert same.ppl == pytest.approx(same.ppl_ref, rel=1e-6)
    assert low.kld_mean > 0.05 and low.same_top_pct < 95 and low.ppl_ratio > 1.05


def test_gemma_top_k_estimate_against_the_full_vocabulary(gemma, gemma_q4_0, runner, tmp_path):
    """The default summary (top 256 + 256 tail samples) against every one of the 262,144 log-probs."""
    text = tmp_path / "text.txt"
    text.write_bytes(default_text_path().read_bytes()[:1200])  # one chunk of 128: 63 positions
    full, default = (
        measure(
            [gemma_q4_0],
            runner,
            reference=str(gemma),
            text=str(text),
            progress=quiet,
            settings=Settings(ctx=128, n_threads=1, top_k=k),
        )[0]
        for k in (0, DEFAULT_TOP_K)
    )
    assert full.ok and default.ok
    assert default.kld_mean == pytest.approx(full.kld_mean, rel=0.01)
    assert default.same_top_pct == full.same_top_pct and default.ppl == full.ppl

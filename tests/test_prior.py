"""The search's prior (tuner.search.prior): its ranking from a recorded probe, the correction from recorded samples,
the start and the blocks it queues, `tuner search --dry-run`'s answer, --no-prior, and a probe of another machine
refused. No speed is asserted of a live run: one short search checks only what recommended.json keeps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from tuner.cli import cli
from tuner.measure import hardware
from tuner.model.meta import read_model
from tuner.plan import probe as probelib
from tuner.record import TrialConfig, TrialRecord
from tuner.search import space as spacelib
from tuner.search.prior import MODELLED, Prior

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
RECORDED = RESULTS / "speed-accuracy-20261203-173607.json"  # a probe `tuner probe` measured (round 0)


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def recorded_probe(hw_fp: str | None = None, build_fp: str | None = None) -> dict:
    """The recorded probe, its fingerprints this machine's (or `hw_fp`, `build_fp`): figures measured, not chosen."""
    data = json.loads(RECORDED.read_text())["rounds"][0]["probe"]
    here_hw, here_build = probelib.fingerprints()
    return {**data, "hw_fingerprint": hw_fp or here_hw, "build_fingerprint": build_fp or here_build}


def tiny_space(models, specs=None):
    files = [str(models / "tiny-f16.gguf"), str(models / "tiny-q4_k_m.gguf")]
    infos = {m: read_model(m) for m in files}
    base = TrialConfig(model=files[0], n_threads=2, n_threads_batch=0, n_prompt=16, n_gen=8, repetitions=1)
    specs = specs or {"n_threads": "1,2", "type_k": "f16,q8_0"}
    space = spacelib.build_space(files, infos, specs, base, False, 2, 2, objective="mixed", auto=False)
    return space, infos


def build(models, **knobs) -> Prior:
    space, infos = tiny_space(models)
    return Prior.build(space, infos, recorded_probe(), "mixed", gpu_offload=False, fits=lambda c: True, **knobs)


def record(prior: Prior, key: tuple, tg: float, pp: float) -> TrialRecord:
    rec = TrialRecord(prior.configs[key], outcome="ok", tg_samples=[tg], pp_samples=[pp])
    rec.state = "COMPLETE"
    return rec


def test_the_unmodelled_dimension_is_neutral_and_the_start_spans_loads(models):
    prior = build(models, start=2)
    assert prior.active and len(prior.guesses) == 8
    assert prior.unmodelled == ["type_k"] and "type_k" not in MODELLED
    # configs that differ only in the K-cache type get the same prediction: the model does not know it
    by_rest: dict = {}
    for k, c in prior.configs.items():
        by_rest.setdefault((c.model, c.n_threads), set()).add(round(prior.guesses[k].value, 6))
    assert all(len(v) == 1 for v in by_rest.values())
    ranked = prior.ranked()
    scores = [prior.guesses[k].score for k in ranked]
    assert scores == sorted(scores, reverse=True)
    # the two start picks load different files: one wrong quant term costs one of them
    assert len({prior.configs[k].load_key() for k in prior.picks}) == 2
    assert prior.picks[0] == ranked[0]
    # the recorded probe reads fewer bytes for Q4_K than F16: at equal threads the q4_k_m file ranks higher
    best = prior.configs[ranked[0]]
    assert best.model.endswith("q4_k_m.gguf")


def test_the_correction_follows_recorded_samples(models):
    prior = build(models)
    q4 = [k for k, c in prior.configs.items() if c.model.endswith("q4_k_m.gguf") and c.n_threads == 2]
    f16 = [k for k, c in prior.configs.items() if c.model.endswith("f16.gguf") and c.n_threads == 2]
    assert prior.corrected([]) == {k: g.score for k, g in prior.guesses.items()}
    # recorded: the q4_k_m file at a tenth of its prediction, the f16 file at its prediction
    recs = []
    for k in q4[:1]:
        g = prior.guesses[k]
        recs.append(record(prior, k, g.tg / 10, g.pp / 10))
    for k in f16[:1]:
        g = prior.guesses[k]
        recs.append(record(prior, k, g.tg, g.pp))
    corr = prior.corrected(recs)
    # the unmeasured q4_k_m config (other K type) inherits the file's error: it now ranks below the f16 ones
    other_q4 = q4[1]
    assert corr[other_q4] < prior.guesses[other_q4].score
    assert corr[other_q4] < min(corr[k] for k in f16)
    # a correction is shrunk (ridge): one sample does not move it the whole way
    assert corr[q4[0]] > prior.guesses[q4[0]].score - math.log(10)
    explained = prior.explain(prior.configs[q4[0]].to_dict(), recs)
    assert explained["measured_objective"] == pytest.approx(prior.guesses[q4[0]].value / 10, rel=1e-6)
    assert explained["pred_tg_tps"] == prior.guesses[q4[0]].tg


def test_a_block_keeps_to_its_load_and_to_configs_near_the_best(models):
    prior = build(models, keep=0.5, block=3)
    top = prior.ranked()[0]
    g = prior.guesses[top]
    recs = [record(prior, top, g.tg, g.pp)]
    load = prior.configs[top].load_key()
    block = prior.block_params(recs, load, 3)
    keys = {k for k, p in prior.params.items() for b in block if p == b}
    assert block and all(prior.configs[k].load_key() == load for k in keys) and top not in keys
    # the first of the block is the measured config's twin in the unmodelled K type (explored, not repeated)
    first = next(k for k, p in prior.params.items() if p == block[0])
    assert prior.configs[first].type_k != prior.configs[top].type_k
    # a load far below the best corrected prediction gets no block
    worst = prior.ranked()[-1]
    strict = build(models, keep=0.999)
    assert strict.block_params(recs, prior.configs[worst].load_key(), 3) == [] or (
        prior.configs[worst].load_key() == load
    )


def probe_file(tmp_path, hw_fp=None, build_fp=None) -> str:
    p = tmp_path / f"probe-{hw_fp}-{build_fp}.json"
    p.write_text(json.dumps(recorded_probe(hw_fp, build_fp)))
    return str(p)


def test_dry_run_prints_the_predicted_best(models, tmp_path):
    args = ["search", "-m", str(models / "tiny-f16.gguf"), "-m", str(models / "tiny-q4_k_m.gguf")]
    args += ["--threads", "1,2", "--cache-type-k", "f16,q8_0", "--no-auto-space", "--dry-run"]
    res = CliRunner().invoke(cli, [*args, "--probe", probe_file(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "predicted best: " in res.output and "tg " in res.output and "pp " in res.output
    assert "does not cover type_k" in res.output
    res = CliRunner().invoke(cli, [*args, "--probe", probe_file(tmp_path), "--json"])
    best = json.loads(res.output)["prior"]["best"]
    assert best["pred_tg_tps"] > 0 and best["pred_pp_tps"] > 0 and best["objective"] == "mixed"
    res = CliRunner().invoke(cli, [*args, "--probe", probe_file(tmp_path), "--json", "--no-prior"])
    assert res.exit_code == 0 and json.loads(res.output)["prior"] is None


@pytest.mark.parametrize(
    ("fps", "says"), [({"hw_fp": "0000000000000000"}, "another machine"), ({"build_fp": "0" * 16}, "another llama.cpp")]
)
def test_a_probe_of_another_machine_or_build_is_refused_unless_the_prior_is_off(models, tmp_path, fps, says):
    other = probe_file(tmp_path, **fps)
    args = ["search", "-m", str(models / "tiny-q8_0.gguf"), "--dry-run", "--probe", other]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2
    assert says in res.output and len(res.output.strip().splitlines()) == 1
    assert "Traceback" not in res.output
    res = CliRunner().invoke(cli, [*args, "--no-prior", "--json"])  # off: the probe is not read at all
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["prior"] is None


def test_the_winner_keeps_predicted_against_measured(models, tmp_path):
    """One short real search with the prior on, one with --no-prior: only what recommended.json keeps is checked."""
    base = ["search", "-m", str(models / "tiny-f16.gguf"), "-m", str(models / "tiny-q4_k_m.gguf"), "--threads", "1,2"]
    base += ["--no-auto-space", "-p", "8", "-n", "4", "-r", "1", "--n-trials", "3", "--no-confirm", "--no-quality"]
    base += ["--drift-every", "0", "--results", str(tmp_path / "r"), "--probe", probe_file(tmp_path)]
    res = CliRunner().invoke(cli, [*base, "--study", "with"])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "r" / "with" / "recommended.json").read_text())
    p = rec["prior"]
    assert p["pred_tg_tps"] > 0 and p["pred_pp_tps"] > 0 and p["measured_objective"] > 0
    res = CliRunner().invoke(cli, [*base, "--study", "without", "--no-prior"])
    assert res.exit_code == 0, res.output
    assert "prior" not in json.loads((tmp_path / "r" / "without" / "recommended.json").read_text())


def test_no_probe_means_no_prior(models, tmp_path):
    assert hardware.probe()  # the machine is known; its probe is not (a fresh cache home)
    res = CliRunner().invoke(cli, ["search", "-m", str(models / "tiny-q8_0.gguf"), "--dry-run", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["prior"] is None


def test_after_the_start_the_prior_leads_with_its_best_corrected_config_and_prefers_the_loaded_model(models):
    """`lead`: the next config of any load, best corrected first; between configs the prediction cannot tell
    apart, one of the model already loaded; none once nothing unmeasured is within `keep` of the best."""
    prior = build(models, keep=0.5)
    top = prior.ranked()[0]
    g = prior.guesses[top]
    recs = [record(prior, top, g.tg, g.pp)]
    [nxt] = prior.block_params(recs, None, 1, prefer=prior.configs[top].load_key())
    k = next(k for k, p in prior.params.items() if p == nxt)
    assert k != top and prior.configs[k].load_key() == prior.configs[top].load_key()
    # measured at a tenth of its prediction while another file meets its own, the top file falls behind: the lead
    # moves to the other file
    other = next(k for k in prior.ranked() if prior.configs[k].model != prior.configs[top].model)
    h = prior.guesses[other]
    recs = [record(prior, top, g.tg / 10, g.pp / 10), record(prior, other, h.tg, h.pp)]
    [nxt] = prior.block_params(recs, None, 1, prefer=prior.configs[top].load_key())
    k = next(k for k, p in prior.params.items() if p == nxt)
    assert prior.configs[k].model != prior.configs[top].model
    # nothing within keep: the sampler's turn
    strict = build(models, keep=1.5)
    assert strict.block_params(recs, None, 1) == []

"""The Python API: each command's work as one library call (real trials on the tiny synthetic model)."""

from __future__ import annotations

import json

import pytest

from tuner.measure import store
from tuner.search import bench
from tuner.search.options import Limits
from tuner.search.run import SearchError, recommend_study, run_search

TINY = {"n_threads": 1, "n_prompt": 16, "n_gen": 8, "repetitions": 2}  # bench: one value each


def test_run_search_is_one_call(models, tmp_path):
    # search: llama.cpp parameters as `tuner search` spells them (a value, a list or a range), the shape as numbers
    seen, lines = [], []
    res = run_search(
        [str(models / "tiny-q8_0.gguf")],
        results=tmp_path,
        study="api",
        n_trials=3,
        n_ctx="128",
        n_threads_batch="1,2",
        baselines=False,
        drift_every=0,
        on_trial=lambda s, rec: seen.append(rec),
        log=lines.append,
        n_threads="1",
        n_prompt=16,
        n_gen=8,
        repetitions=2,
        auto_space=False,
        confirm=0,
    )
    assert res.study_dir == tmp_path / "api" and not res.interrupted and not res.stopped
    # two configs and a budget of three: the space is finished, not re-sampled
    assert res.finished == "every config of the space is measured (2 configs)"
    assert len(seen) == 2 and len(store.read(res.study_dir)) == 2
    assert any(line.startswith("study api: 1 model(s), 2 configs (n_threads_batch=1,2)") for line in lines)
    rec = res.recommendation
    assert rec == json.loads((res.study_dir / "recommended.json").read_text())
    assert rec["config"]["n_ctx"] == 128
    # re-derived under a limit it meets, without touching the file
    again = recommend_study(res.study_dir, limits=Limits(min_ctx=100), write=False)
    assert again["config"]["n_ctx"] == 128 and again["trial_number"] == rec["trial_number"]
    assert json.loads((res.study_dir / "recommended.json").read_text()) == rec
    with pytest.raises(SearchError, match="meets these limits"):
        recommend_study(res.study_dir, limits=Limits(min_ctx=4096))


def test_run_search_bad_input_raises_before_anything_runs(models, tmp_path):
    with pytest.raises(SearchError, match="no model"):
        run_search([], results=tmp_path)
    with pytest.raises(SearchError, match="measures nothing"):
        run_search([str(models / "tiny-q8_0.gguf")], results=tmp_path, n_gen=0, objective="tg")
    assert not any(tmp_path.iterdir())


def test_bench_measure_appends_one_record(models, tmp_path):
    out = tmp_path / "b.parquet"
    res = bench.measure(str(models / "tiny-q8_0.gguf"), out, **TINY)
    assert res.record.ok and not res.interrupted and res.out == out
    assert res.record.config.n_threads_batch == 1  # resolved: follows n_threads
    assert len(res.record.tg_samples) == 2 and len(store.read(out)) == 1
    with pytest.raises(bench.BenchError, match="expected PATTERN=BUFFER"):
        bench.measure(str(models / "tiny-q8_0.gguf"), out, overrides=("exps",), **TINY)
    assert len(store.read(out)) == 1


def test_search_options_are_one_object_from_click_params_to_the_loop(tmp_path):
    from tuner.search import fleet
    from tuner.search.ledger import LocalLedger
    from tuner.search.options import DEFAULTS, SearchOptions

    # Click's params by name: the options' fields, every other name a llama.cpp parameter of the space
    opts = SearchOptions.from_params(
        {"n_trials": 5, "n_ctx": "4096,8192", "use_mmap": None, "headroom": "5%", "results": tmp_path, "study": "s"}
    )
    assert opts.n_trials == 5 and opts.specs == {"n_ctx": "4096,8192", "use_mmap": None}
    assert opts.limits.headroom == 0.05 and opts.study_dir == tmp_path / "s"
    # overrides merge into a copy: the caller's object and the defaults stay as they were
    more = opts.replace(seed=3, n_gpu_layers="0:13")
    assert more.specs == {"n_ctx": "4096,8192", "use_mmap": None, "n_gpu_layers": "0:13"} and more.seed == 3
    assert opts.specs == {"n_ctx": "4096,8192", "use_mmap": None} and opts.seed == 0 and DEFAULTS.specs == {}
    # the ledger follows the storage, chosen in one place
    assert isinstance(fleet.ledger_for(opts), LocalLedger)
    assert isinstance(fleet.ledger_for(opts.replace(storage="sqlite:///x.db")), fleet.FleetLedger)
    with pytest.raises(fleet.FleetError, match="--allow-mixed needs a shared --storage"):
        fleet.ledger_for(opts.replace(allow_mixed=True))

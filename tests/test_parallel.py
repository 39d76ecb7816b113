"""--parallel N: N sequences decoded together as llama-batched-bench does (real llama.cpp trials, real GGUF files)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from tuner.cli import cli
from tuner.measure import store
from tuner.model.meta import read_model
from tuner.plan import planner
from tuner.record import TrialConfig, TrialRecord, invalid_reason
from tuner.search import recommend
from tuner.search.space import Space, SpaceError, check_parallel, parse_dimension

SHAPE = ["-p", "32", "-n", "8", "-r", "2", "-t", "1"]


def bench(*args):
    return CliRunner().invoke(cli, ["bench", *map(str, args)])


@pytest.fixture(scope="module")
def tiny_runs(models, tmp_path_factory):
    """tuner bench --parallel 1,2 and --parallel 3 --kv-unified on the tiny model."""
    out = tmp_path_factory.mktemp("parallel") / "bench.parquet"
    tiny = models / "tiny-q8_0.gguf"
    res = bench(tiny, "--parallel", "1,2", *SHAPE, "-o", out)
    assert res.exit_code == 0, res.output
    res = bench(tiny, "--parallel", "3", "-kvu", *SHAPE, "-o", out)
    assert res.exit_code == 0, res.output
    return store.records(out), res.output


def test_one_trial_per_count_with_aggregate_and_per_stream_figures(tiny_runs):
    recs, _ = tiny_runs
    assert [(r.config.n_seq, r.config.kv_unified) for r in recs] == [(1, False), (2, False), (3, True)]
    for r in recs:
        n = r.config.n_seq
        assert r.ok and len(r.tg_samples) == len(r.pp_samples) == 2
        # batched-bench's S_TG = N x n_gen / t_tg: each sequence got n_gen tokens in the same time
        assert r.tg_stream_samples == pytest.approx([x / n for x in r.tg_samples])
        assert r.pp_stream_samples == pytest.approx([x / n for x in r.pp_samples])
        assert len(r.ttft_stream_ms) == n and all(t > 0 for t in r.ttft_stream_ms)
        assert r.peak_rss_bytes > 0
        assert r.objective("tg") == pytest.approx(n * r.objective("tg_stream"))


def test_table_names_aggregate_and_per_stream_rows(tiny_runs):
    _, output = tiny_runs
    assert "tg8 x3 kvu" in output and "tg8 per stream kvu" in output and "TTFT per stream" in output


def test_kv_cache_per_slot_matches_llama_cpp(gemma_model, tmp_path):
    """The planner counts every slot's cache (and Gemma's sliding-window cache once per slot): llama.cpp's own
    buffer sizes, as the worker read them from its log, for one, four split and four unified sequences."""
    out = tmp_path / "b.parquet"
    for extra in (["--parallel", "1"], ["--parallel", "4"], ["--parallel", "4", "-kvu"]):
        res = bench(gemma_model, *extra, "-c", "2048", "-p", "16", "-n", "2", "-r", "1", "-t", "1", "-o", out)
        assert res.exit_code == 0, res.output
    info = read_model(str(gemma_model))
    recs = store.records(out)
    kvs = [r.buffers["CPU"]["kv"] for r in recs]
    assert kvs == [planner.buffers(r.config, info)["kv"] for r in recs]
    assert kvs[1] > kvs[0]  # four sliding windows of 512 + ubatch where one sequence had one
    assert [r.buffers["CPU"]["output"] for r in recs] == [planner.output_bytes(info, n) for n in (1, 4, 4)]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--parallel", "0"], "must be at least 1"),
        (["--parallel", "two"], "a count or a list of counts"),
        (["--parallel", "4", "-c", "1024", "-p", "512", "-n", "128"], "leaves 256 KV cells per sequence"),
        (["--parallel", "1,4", "-c", "1024", "-p", "512", "-n", "128"], "leaves 256 KV cells per sequence"),
        (["--parallel", "4", "-kvu", "-c", "1024", "-p", "512", "-n", "128"], "unified KV cache of 1024 cells"),
    ],
)
def test_bad_parallel_is_one_line_exit_2_nothing_written(models, tmp_path, args, words):
    out = tmp_path / "b.parquet"
    res = bench(models / "tiny-q8_0.gguf", *args, "-o", out)
    assert res.exit_code == 2, res.output
    assert words in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()


def test_unified_cache_fits_where_slots_do_not():
    cfg = TrialConfig(model="m", n_ctx=4096, n_prompt=512, n_gen=512, n_seq=8)
    assert "512 KV cells per sequence" in invalid_reason(cfg)
    assert invalid_reason(TrialConfig(**{**cfg.to_dict(), "kv_unified": True, "n_gen": 0})) is None
    # llama.cpp pads each slot to 256 cells: -c 1000 -np 4 gives 4 slots of 256
    assert TrialConfig(model="m", n_ctx=1000, n_seq=4).seq_cells() == 256
    assert TrialConfig(model="m", n_prompt=100, n_gen=20, n_seq=3).effective_ctx() == 360


def test_old_parquet_without_the_columns_still_loads(tmp_path, tiny_runs):
    """Records written before --parallel (no n_seq, kv_unified or stream columns) load as one request; a parallel
    record appended to such a file keeps its count as an int."""
    recs, _ = tiny_runs
    old = pd.DataFrame([recs[0].to_row()]).drop(
        columns=["n_seq", "kv_unified", "pp_stream_samples", "tg_stream_samples", "ttft_stream_ms"]
        + [c for c in recs[0].to_row() if "_stream_" in c]
    )
    path = tmp_path / "old.parquet"
    store.write_frame(path, old)
    (r,) = store.records(path)
    assert (r.config.n_seq, r.config.kv_unified, r.tg_stream_samples) == (0, False, [])
    assert r.samples("tg_stream") == r.tg_samples  # one request: its stream is the request
    store.append(path, [recs[2]])
    a, b = store.records(path)
    assert a.config.n_seq == 0 and b.config.n_seq == 3 and type(b.config.n_seq) is int and b.config.kv_unified is True
    assert b.config.key() == recs[2].config.key()
    assert TrialRecord.from_json(recs[2].to_json()).ttft_stream_ms == recs[2].ttft_stream_ms


def test_recommendation_forms_carry_the_slots(tiny_runs):
    recs, _ = tiny_runs
    split, unified = recs[1], recs[2]
    f = recommend.forms(split.config, split)
    assert f["llama_server_argv"][-3:] == ["-np", "2", "-no-kvu"]
    assert recommend.forms(unified.config, unified)["llama_server_argv"][-3:] == ["-np", "3", "-kvu"]
    assert f["parallel"] == {"n_seq_max": 2, "kv_unified": False}
    assert "OLLAMA_NUM_PARALLEL=2" in f["ollama_modelfile"]
    assert any("n_seq_max" in n for n in f["notes"])
    assert "n_seq_max" not in f["llama_cpp_python"]  # Llama() would swallow it silently
    assert "-np" not in recommend.forms(TrialConfig(model="m"))["llama_server_argv"]
    p = recommend.parallel([split])
    assert p["n_seq"] == 2 and p["aggregate_tg_tps"] == pytest.approx(2 * p["per_stream_tg_tps"])
    assert set(p) >= {"aggregate_tg_tps", "per_stream_tg_tps", "aggregate_pp_tps"}
    assert len(p["ttft_ms_per_stream"]) == 2


def test_search_space_refuses_counts_that_cannot_fit():
    base = TrialConfig(model="m", n_prompt=512, n_gen=128)
    space = Space(models=["m"], base=base)
    space.dims["n_ctx"] = parse_dimension("n_ctx", "1024")
    space.dims["n_seq"] = parse_dimension("n_seq", "1,4")
    with pytest.raises(SpaceError, match="leaves 256 KV cells per sequence"):
        check_parallel(space)
    space.dims["kv_unified"] = parse_dimension("kv_unified", "true,false")
    with pytest.raises(SpaceError, match="unified KV cache of 1024 cells"):
        check_parallel(space)
    space.dims["n_ctx"] = parse_dimension("n_ctx", "4096")
    check_parallel(space)
    with pytest.raises(SpaceError, match="--parallel: must be at least 1"):
        parse_dimension("n_seq", "0,2")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--parallel", "0"], "--parallel: must be at least 1"),
        (["--parallel", "4", "--ctx", "1024", "-p", "512", "-n", "128"], "leaves 256 KV cells per sequence"),
    ],
)
def test_bad_search_parallel_is_one_line_exit_2(models, tmp_path, args, words):
    res = CliRunner().invoke(cli, ["search", "-m", str(models / "tiny-q8_0.gguf"), *args, "--results", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert words in res.output and len(res.output.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("trials.parquet"))


def test_search_with_parallel_recommends_the_slots(models, tmp_path):
    res = CliRunner().invoke(
        cli,
        ["search", "-m", str(models / "tiny-q8_0.gguf"), "--parallel", "2", "--ctx", "512", "--threads", "1,2"]
        + ["-p", "32", "-n", "8", "-r", "2", "--n-trials", "2", "--no-auto-space", "--no-confirm"]
        + ["--no-baselines", "--objective", "tg", "--results", str(tmp_path), "--study", "p"],
    )
    assert res.exit_code == 0, res.output
    rec = json.loads(Path(tmp_path / "p" / "recommended.json").read_text())
    assert rec["config"]["n_seq"] == 2 and rec["parallel"]["n_seq"] == 2
    assert rec["parallel"]["aggregate_tg_tps"] == pytest.approx(rec["measured"]["tg_ts_mean"])
    assert "-np 2 -no-kvu" in rec["forms"]["llama_server"]
    assert "2 parallel sequences" in res.output
    trials = store.records(tmp_path / "p")
    assert trials and all(t.config.n_seq == 2 for t in trials)
    # the `tuner bench --config recommended.json` form re-measures the slots
    out = tmp_path / "again.parquet"
    res = CliRunner().invoke(cli, ["bench", "--config", str(tmp_path / "p" / "recommended.json"), "-r", "1", "-o", out])
    assert res.exit_code == 0, res.output
    (again,) = store.records(out)
    assert (again.config.n_seq, again.config.kv_unified, len(again.ttft_stream_ms)) == (2, False, 2)


def test_fit_baseline_counts_every_slot(gemma_model):
    """llama-server -np 8 fits with 8 slots' KV cache: on a GPU where one slot's cache lets every layer in, the
    --fit baseline of a --parallel 8 search keeps layers out (Gemma 3's sliding-window cache is per slot)."""
    from tuner.plan import fit as F  # noqa: PLC0415 - only this test needs the fit port

    m = str(gemma_model)
    args = ["search", "-m", m, "--dry-run", "--json", "--gpus", "1750MiB", "-c", "32768", "-p", "16", "-n", "4"]
    res = CliRunner().invoke(cli, [*args, "--parallel", "8"])
    assert res.exit_code == 0, res.output
    fitted = {b["label"]: b for b in json.loads(res.output)["baselines"]}["llama-server default (--fit)"]
    assert fitted["config"]["n_seq"] == 8 and " -np 8 " in f" {fitted['server_flags']} "
    dev = [F.DeviceMemory(1750 << 20, 1750 << 20, "CUDA0")]
    info = read_model(m)
    slots, one = (F.fit(info, dev, F.server_config(m, n_ctx=32768, n_seq=n)).to_flags() for n in (8, 0))
    assert fitted["fit_flags"] == slots != one

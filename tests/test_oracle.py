"""llama.cpp as the planner's oracle: sparse GGUFs of real architectures, loaded by the real llama.cpp, whose own
buffer figures the uncalibrated planner must match (KV and recurrent state exactly, compute within 10 %)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from click.testing import CliRunner

from tuner.cli import cli
from tuner.model.meta import read_model
from tuner.plan import oracle, planner
from tuner.record import TrialConfig

MiB = 1 << 20
HALF = 0.005 * MiB + 1  # llama.cpp logs MiB with two decimals: each figure is exact to half a step
ARCHS = ("deepseek2", "gpt-oss", "gemma3", "lfm2")  # MLA, sinks + SWA, SWA 5:1, hybrid recurrent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("oracle")
    return {a: oracle.model_file(a, out, small=True) for a in ARCHS}


@pytest.fixture(scope="module")
def measured(files):
    """One llama.cpp worker per model, several contexts each (sim: buffers sized, nothing allocated)."""
    grid = [(4096, "on", 512, "f16"), (8192, "off", 256, "f16"), (2048, "on", 1024, "q8_0")]
    jobs = [
        oracle.Job(model=str(p), n_ctx=c, flash_attn=fa, n_ubatch=ub, type_k=kv, type_v=kv)
        for p in files.values()
        for c, fa, ub, kv in grid
    ]
    return list(zip(jobs, oracle.measure(jobs)))


def _cfg(job: oracle.Job) -> TrialConfig:
    return TrialConfig(
        model=job.model,
        n_ctx=job.n_ctx,
        n_batch=job.n_batch,
        n_ubatch=job.n_ubatch,
        type_k=job.type_k,
        type_v=job.type_v,
        flash_attn=job.flash_attn,
    )


def test_sparse_files_are_holes_with_real_headers(files):
    for arch, p in files.items():
        info = read_model(p)
        assert info.arch == arch
        assert p.stat().st_blocks * 512 < 8 * MiB < p.stat().st_size  # apparent size, no data on disk
        assert sum(t.n_bytes for t in info.tensors) == oracle.shape(arch, small=True).n_bytes
    assert read_model(files["deepseek2"]).kv_mla
    assert read_model(files["lfm2"]).shortconv_l_cache == 3


def test_planner_matches_llama_cpp_buffers(measured):
    for job, res in measured:
        assert res["outcome"] == "ok", (job, res.get("cause"))
        info = read_model(job.model)
        want = planner.buffers(_cfg(job), info)
        assert want["note"] == ""
        k = sum(c["k"] for c in res["kv_caches"])
        v = sum(c["v"] for c in res["kv_caches"])
        n = len(res["kv_caches"])
        assert abs(want["kv_k"] - k) <= n * HALF and abs(want["kv_v"] - v) <= n * HALF, (info.arch, job)
        assert abs(want["rs"] - res["rs_bytes"]) <= 2 * HALF, (info.arch, job)
        assert abs(want["output"] - sum(res["output"].values())) <= HALF
        compute = sum(res["compute"].values())
        assert abs(want["compute"] / compute - 1) <= 0.10, (info.arch, job, want["compute"], compute)
        if "model_size" in res:  # first job of a worker: the model was loaded there
            assert want["model"] == res["model_size"]


def test_layouts_llama_cpp_reports(measured):
    """The layouts themselves, from llama.cpp's own log: MLA keeps no V, SWA caches hold window + ubatch cells,
    the hybrid keeps a recurrent state for its convolution layers and KV only for its attention layers."""
    by = {(read_model(j.model).arch, j.n_ctx): r for j, r in measured}
    ds = by[("deepseek2", 4096)]["kv_caches"]
    assert len(ds) == 1 and ds[0]["v"] == 0 and ds[0]["k"] == 4 * 4096 * 576 * 2
    gemma = by[("gemma3", 4096)]["kv_caches"]  # 7 layers: 6 sliding (1024-token window), 1 global
    assert sorted((c["cells"], c["layers"]) for c in gemma) == [(1536, 6), (4096, 1)]
    oss = by[("gpt-oss", 8192)]["kv_caches"]  # window 128 + ubatch 256, padded to 256
    assert sorted(c["cells"] for c in oss) == [512, 8192]
    lfm = by[("lfm2", 4096)]
    assert lfm["rs_caches"] and lfm["rs_bytes"] > 0 and lfm["kv_caches"][0]["cells"] == 4096
    info = read_model(next(j.model for j, _ in measured if "lfm2" in j.model))
    assert (
        planner.rs_layer_bytes(info, 0) == 4 * info.n_embd * 2
        and planner.kv_layer_bytes(TrialConfig(model="", n_ctx=4096), info, 0) == 0
    )


def test_sim_and_real_loads_report_the_same_buffers(files):
    """no_alloc sizes what a real (mmap, buffers allocated) load allocates; the mmap'd model buffer is the
    file's tensor data, as the planner counts it."""
    p = str(files["lfm2"])
    sim, real = oracle.measure([oracle.Job(model=p, mode="sim"), oracle.Job(model=p, mode="real")])
    assert sim["outcome"] == real["outcome"] == "ok"
    for k in ("kv_bytes", "rs_bytes", "compute", "output"):
        assert sim[k] == real[k], k
    assert real["kv"]["CPU"] == real["kv_bytes"]  # really allocated, not a dummy buffer
    mapped = real["model"]["CPU_Mapped"]
    assert abs(mapped / planner.buffers(TrialConfig(model=p), read_model(p))["model"] - 1) < 0.02


def test_refused_configs_are_the_ones_the_planner_names(files):
    ds, oss = str(files["deepseek2"]), str(files["gpt-oss"])
    jobs = [
        oracle.Job(model=ds, type_k="q8_0", type_v="f16", flash_attn="off"),
        oracle.Job(model=oss, type_k="q8_0", type_v="q8_0", flash_attn="off"),
        oracle.Job(model=ds, type_k="q8_0", type_v="q8_0", flash_attn="on"),
    ]
    res = oracle.measure(jobs)
    assert res[0]["outcome"] == "error" and "different K (q8_0) and V (f16)" in res[0]["cause"]
    assert "MLA" in planner.refusal(_cfg(jobs[0]), read_model(ds))
    assert res[1]["outcome"] == "error" and "quantized V" in planner.refusal(_cfg(jobs[1]), read_model(oss))
    assert res[2]["outcome"] == "ok" and planner.refusal(_cfg(jobs[2]), read_model(ds)) == ""


def test_a_broken_model_fails_its_jobs_not_the_caller(tmp_path):
    s = oracle.shape("llama", small=True)
    del s.meta[".attention.layer_norm_rms_epsilon"]
    bad = oracle.write_sparse(s, tmp_path / "bad.gguf")
    (res,) = oracle.measure([oracle.Job(model=str(bad))])
    assert res["outcome"] == "error" and "layer_norm_rms_epsilon" in res["cause"]


def test_unknown_architecture_gets_weights_and_a_note(tmp_path):
    s = oracle.shape("llama", small=True)
    s = dataclasses.replace(s, arch="bloom", meta={k: v for k, v in s.meta.items() if k != ".rope.freq_base"})
    path = oracle.write_sparse(s, tmp_path / "bloom.gguf")
    info = read_model(path)
    cfg = TrialConfig(model=str(path), n_ctx=8192)
    p = planner.predict(cfg, info)
    assert p.note.startswith("unknown architecture bloom: KV and compute not modelled")
    assert p.kv_bytes == 0 and p.weights_total == s.n_bytes
    r = CliRunner().invoke(cli, ["estimate", str(path), "--ctx", "8192", "--ram", "64GiB", "--vram", "0", "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)[0]["contexts"][0]
    assert row["note"] == p.note and row["size_bytes"] == s.n_bytes
    r = CliRunner().invoke(cli, ["estimate", str(path), "--ctx", "8192", "--ram", "64GiB", "--vram", "0"])
    assert "note: unknown architecture bloom: KV and compute not modelled" in r.output


def test_estimate_table_json_and_warning_say_the_same_host_numbers(files):
    """Host RAM is resident (must fit: fits is judged on it) + mmap'd pages (reclaimable); the table, the JSON
    and the warning carry the same figures."""
    p = str(files["gemma3"])
    info = read_model(p)
    pred = planner.predict(TrialConfig(model=p, n_ctx=4096), info)
    ram = int((pred.resident_bytes + pred.file_bytes // 2) / 0.95)  # room for the resident part, not for all pages
    args = ["estimate", p, "--ctx", "4096", "--ram", str(ram), "--vram", "0"]
    row = json.loads(CliRunner().invoke(cli, [*args, "--json"]).output)[0]["contexts"][0]
    assert row["resident_bytes"] == pred.resident_bytes and row["mmap_bytes"] == pred.file_bytes
    assert row["host_bytes"] == row["resident_bytes"] + row["mmap_bytes"]
    assert row["fits"] and row["weights_cached"] is False and "re-reads weights from disk" in row["warning"]
    text = CliRunner().invoke(cli, args).output
    from tuner.units import fmt_size

    assert fmt_size(row["resident_bytes"]) in text and fmt_size(row["mmap_bytes"]) in text
    assert f"next to {fmt_size(row['resident_bytes'])} resident" in text
    # less RAM than the resident part: it would swap, and says so with the same figure
    short = json.loads(
        CliRunner()
        .invoke(cli, ["estimate", p, "--ctx", "4096", "--ram", str(pred.resident_bytes // 2), "--vram", "0", "--json"])
        .output
    )
    srow = short[0]["contexts"][0]
    assert not srow["fits"] and re.search(
        rf"needs {re.escape(fmt_size(pred.resident_bytes))} resident", srow["warning"]
    )

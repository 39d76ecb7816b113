"""The memory planner against real llama.cpp: KV and peak RSS of real trials, real quantizer output sizes,
and a 400 GB DeepSeek-V3-like header that is planned without reading any tensor data."""

from __future__ import annotations

import dataclasses
import json
import os
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from tuner.cli import cli
from tuner.errors import TunerError
from tuner.model.meta import ModelError, read_model
from tuner.model.synth import synthesize
from tuner.plan import planner, whatif
from tuner.plan.estimate import EstimateError, estimate
from tuner.record import TrialConfig, TrialRecord
from tuner.units import fmt_size

MiB = 1 << 20


# -- a DeepSeek-V3-like split model: real GGUF headers, sparse data regions --------------------------------------


def _nbytes(qt, n: int) -> int:
    blck, size = gguf.GGML_QUANT_SIZES[qt]
    return n // blck * size


def write_deepseek_v3(out_dir: Path, n_shards: int = 2) -> Path:
    """MLA (kv_lora_rank 512, rope 64), 256 experts (8 used, 1 shared), 61 layers, 129 k vocabulary.

    Headers are written by the gguf package; each shard's data region is a hole made by os.truncate, so
    ~435 GB of apparent size takes a few MB of disk.
    """
    Q = gguf.GGMLQuantizationType
    n_layer, n_embd, n_vocab, n_head = 61, 7168, 129280, 128
    q_lora, kv_lora, rope, nope, vdim = 1536, 512, 64, 128, 128
    n_exp, n_ff, n_ff_exp, n_dense = 256, 18432, 2048, 3
    tensors = [("token_embd.weight", (n_vocab, n_embd), Q.Q4_K)]
    for il in range(n_layer):
        p = f"blk.{il}"
        tensors += [
            (f"{p}.attn_norm.weight", (n_embd,), Q.F32),
            (f"{p}.ffn_norm.weight", (n_embd,), Q.F32),
            (f"{p}.attn_q_a_norm.weight", (q_lora,), Q.F32),
            (f"{p}.attn_kv_a_norm.weight", (kv_lora,), Q.F32),
            (f"{p}.attn_q_a.weight", (q_lora, n_embd), Q.Q4_K),
            (f"{p}.attn_q_b.weight", (n_head * (nope + rope), q_lora), Q.Q4_K),
            (f"{p}.attn_kv_a_mqa.weight", (kv_lora + rope, n_embd), Q.Q4_K),
            (f"{p}.attn_k_b.weight", (n_head, kv_lora, nope), Q.Q8_0),
            (f"{p}.attn_v_b.weight", (n_head, vdim, kv_lora), Q.Q8_0),
            (f"{p}.attn_output.weight", (n_embd, n_head * vdim), Q.Q4_K),
        ]
        if il < n_dense:
            tensors += [
                (f"{p}.ffn_gate.weight", (n_ff, n_embd), Q.Q4_K),
                (f"{p}.ffn_up.weight", (n_ff, n_embd), Q.Q4_K),
                (f"{p}.ffn_down.weight", (n_embd, n_ff), Q.Q6_K),
            ]
        else:
            tensors += [
                (f"{p}.ffn_gate_inp.weight", (n_exp, n_embd), Q.F32),
                (f"{p}.exp_probs_b.bias", (n_exp,), Q.F32),
                (f"{p}.ffn_gate_exps.weight", (n_exp, n_ff_exp, n_embd), Q.Q4_K),
                (f"{p}.ffn_up_exps.weight", (n_exp, n_ff_exp, n_embd), Q.Q4_K),
                (f"{p}.ffn_down_exps.weight", (n_exp, n_embd, n_ff_exp), Q.Q6_K),
                (f"{p}.ffn_gate_shexp.weight", (n_ff_exp, n_embd), Q.Q4_K),
                (f"{p}.ffn_up_shexp.weight", (n_ff_exp, n_embd), Q.Q4_K),
                (f"{p}.ffn_down_shexp.weight", (n_embd, n_ff_exp), Q.Q6_K),
            ]
    tensors += [("output_norm.weight", (n_embd,), Q.F32), ("output.weight", (n_vocab, n_embd), Q.Q6_K)]
    per = -(-len(tensors) // n_shards)
    paths = []
    for s in range(n_shards):
        path = out_dir / f"DeepSeek-V3-Q4_K_M-{s + 1:05d}-of-{n_shards:05d}.gguf"
        w = gguf.GGUFWriter(str(path), "deepseek2")
        w.add_uint16("split.no", s)
        w.add_uint16("split.count", n_shards)
        w.add_int32("split.tensors.count", len(tensors))
        if s == 0:
            w.add_name("DeepSeek-V3 (sparse test header)")
            w.add_block_count(n_layer)
            w.add_context_length(163840)
            w.add_embedding_length(n_embd)
            w.add_feed_forward_length(n_ff)
            w.add_head_count(n_head)
            w.add_head_count_kv(1)  # MLA: one latent KV "head" of kv_lora_rank + rope dims
            w.add_key_length(kv_lora + rope)
            w.add_value_length(kv_lora)
            w.add_uint32("deepseek2.attention.key_length_mla", nope + rope)
            w.add_uint32("deepseek2.attention.value_length_mla", vdim)
            w.add_q_lora_rank(q_lora)
            w.add_kv_lora_rank(kv_lora)
            w.add_rope_dimension_count(rope)
            w.add_expert_count(n_exp)
            w.add_expert_used_count(8)
            w.add_expert_shared_count(1)
            w.add_expert_feed_forward_length(n_ff_exp)
            w.add_leading_dense_block_count(n_dense)
            w.add_vocab_size(n_vocab)
            w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_K_M))
            w.add_tokenizer_model("gpt2")
            w.add_token_list([f"tok{i}" for i in range(n_vocab)])  # a real-sized vocabulary in the header
            w.add_token_types([1] * n_vocab)
        total = 0
        for name, shape, qt in tensors[s * per : (s + 1) * per]:
            nb = _nbytes(qt, int(np.prod(shape)))
            w.add_tensor_info(name, shape, np.float32, nb, raw_dtype=qt)
            total += -(-nb // 32) * 32
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        start = -(-path.stat().st_size // 32) * 32
        os.truncate(path, start + total)  # the data region is a hole: no disk used, never read
        paths.append(path)
    return paths[0]


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> Path:
    return write_deepseek_v3(tmp_path_factory.mktemp("ds3"))


def _bytes_read() -> int:
    """What this process has read through read(2)/pread(2) so far (the kernel's rchar)."""
    return int(next(ln.split()[1] for ln in Path("/proc/self/io").read_text().splitlines() if ln.startswith("rchar")))


def test_400gb_model_plans_without_reading_data(deepseek):
    shards = sorted(deepseek.parent.glob("*.gguf"))
    apparent = sum(p.stat().st_size for p in shards)
    used = sum(p.stat().st_blocks * 512 for p in shards)
    assert apparent > 400e9 and used < 50 * MiB  # a sparse file really
    from tuner.model import meta as ggufmeta

    ggufmeta._read_cached.cache_clear()
    read0 = _bytes_read()
    tracemalloc.start()
    info = read_model(deepseek)
    cfg = TrialConfig(model=str(deepseek), n_ctx=32768)
    pred = planner.predict(cfg, info, gpu_offload=True)
    ngl = planner.max_gpu_layers(cfg, info, 80 << 30)
    sizes = whatif.what_if(info, ["q8_0", "q4_k_m", "iq2_xxs"])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # the headers only: what a 400 GB plan reads and holds does not grow with the weights (time is the
    # benchmarks' business, not a test's)
    assert peak < 64 * MiB, f"planning held {peak / MiB:.0f} MiB"
    assert _bytes_read() - read0 < 64 * MiB, "planning read tensor data"
    # the facts of the model, summed over both shards
    assert len(info.shards) == 2 and info.file_size == apparent
    assert (info.arch, info.n_layer, info.n_expert, info.n_expert_used, info.n_expert_shared) == (
        "deepseek2",
        61,
        256,
        8,
        1,
    )
    assert (info.kv_lora_rank, info.rope_dim, info.head_kv(0), info.head_dim_k, info.head_dim_v) == (
        512,
        64,
        1,
        576,
        512,
    )
    assert info.n_vocab == 129280 and info.n_ff_exp == 2048 and info.n_layer_dense_lead == 3
    # MLA KV as llama.cpp allocates it: one latent K row (512 + 64) per cell per layer, f16, no V tensor
    assert pred.kv_bytes == 61 * 32768 * 576 * 2
    assert pred.weights_total == sum(t.n_bytes for t in info.tensors)
    assert 0 <= info.file_size - info.header_bytes - pred.weights_total < 32 * len(info.tensors)  # padding only
    # 80 GB cannot hold every layer of a ~400 GB model, but holds some
    assert 0 < ngl < 20
    bpw = {s["quant"]: s["bpw"] for s in sizes}
    assert 8.4 < bpw["q8_0"] < 8.6 and 4.5 < bpw["q4_k_m"] < 5.2 and 2.0 < bpw["iq2_xxs"] < 2.6


def test_kv_cache_formula_gqa_swa_and_types(models):
    info = read_model(models / "tiny-q8_0.gguf")  # 2 layers, 2 KV heads of 64
    cfg = TrialConfig(model=info.path, n_ctx=1000)  # padded to 1024 cells, as llama.cpp does
    assert planner.predict(cfg, info).kv_bytes == 2 * 1024 * (2 * 128 * 2)
    q8 = dataclasses.replace(cfg, type_k="q8_0", type_v="q4_0")
    assert planner.predict(q8, info).kv_bytes == 2 * 1024 * (128 // 32 * 34 + 128 // 32 * 18)
    swa = dataclasses.replace(info, arch="gemma2", sliding_window=256)
    big = dataclasses.replace(cfg, n_ctx=8192, n_ubatch=256)
    # gemma2: every other layer attends to a 256-token window: holds 256 + n_ubatch cells
    assert planner.predict(big, swa).kv_bytes == (8192 + 512) * (2 * 128 * 2)


@pytest.mark.slow
def test_predicted_peak_rss_within_10_percent_of_real_trials(models, dense_model, gemma_model, monkeypatch):
    """Real trials (each a cold start in a fresh worker): KV matches llama.cpp's own log exactly, peak RSS within
    ±10 % uncalibrated and after calibration (the real Gemma 3 270M too: its fixture never skips)."""
    from tuner.measure.runner import Runner
    from tuner.plan.oracle import parse_log

    monkeypatch.setenv("TUNER_WORKER_VERBOSE", "1")  # llama.cpp prints its buffer sizes at info level
    moe = models / "moe-q8_0.gguf"
    tiny = models / "tiny-q8_0.gguf"
    grid = [
        TrialConfig(
            model=str(m),
            n_ctx=ctx,
            n_batch=b,
            n_ubatch=ub,
            type_k=t,
            type_v=t,
            use_mmap=mm,
            n_prompt=256,
            n_gen=8,
            repetitions=1,
            n_threads=2,
        )
        for m, ctx, b, ub, t, mm in [
            (tiny, 1024, 2048, 512, "f16", True),
            (tiny, 8192, 256, 128, "q8_0", False),
            (moe, 2048, 512, 256, "f16", True),
            (moe, 4096, 256, 64, "q8_0", False),
            (dense_model, 1024, 512, 512, "f16", True),
            (dense_model, 2048, 128, 128, "q8_0", False),
            (gemma_model, 4096, 2048, 512, "f16", True),
            (gemma_model, 8192, 512, 128, "q8_0", False),
        ]
    ]
    recs = []
    with Runner(timeout=300) as r:
        for cfg in grid:
            rec = r.run(cfg)
            assert rec.outcome == "ok", rec.cause
            info = read_model(cfg.model)
            p = planner.predict(cfg, info)
            sizes = parse_log(r.last_log)
            assert abs(p.kv_bytes - sizes["kv"]["CPU"]) <= 0.01 * MiB
            if "q4_0" in cfg.model:
                repacked = sizes["model"]["CPU_REPACK"]
                assert abs(p.repack_bytes - repacked) < 0.02 * repacked
            recs.append(rec)
    # leave-one-out: each trial is predicted by a calibration learned from the others
    for i, rec in enumerate(recs):
        cal = planner.Calibration.from_records(recs[:i] + recs[i + 1 :])
        pred = planner.predict(rec.config, read_model(rec.config.model), cal).ram_bytes
        assert abs(pred / rec.peak_rss_bytes - 1) < 0.10, (rec.config, pred, rec.peak_rss_bytes)
    # and uncalibrated: llama.cpp's layout plus the process baseline
    default_err = [planner.predict(r.config, read_model(r.config.model)).ram_bytes / r.peak_rss_bytes - 1 for r in recs]
    assert max(abs(e) for e in default_err) < 0.10, default_err


def test_calibration_recovers_baseline_and_scale(models, dense_model):
    """Records whose peaks are raw terms + 40 MiB + 0.8 × compute give back exactly those terms."""
    recs = []
    for m, ctx, ub in [
        (models / "tiny-q8_0.gguf", 1024, 512),
        (models / "moe-q8_0.gguf", 4096, 128),
        (dense_model, 2048, 256),
        (dense_model, 8192, 64),
    ]:
        cfg = TrialConfig(model=str(m), n_ctx=ctx, n_ubatch=ub)
        raw = planner.predict(cfg, read_model(m), planner.RAW)
        peak = raw.ram_bytes - raw.compute_host + 40 * MiB + int(0.8 * raw.compute_host)
        recs.append(TrialRecord(config=cfg, outcome="ok", peak_rss_bytes=peak))
    recs.append(TrialRecord(config=recs[0].config, outcome="oom", peak_rss_bytes=1))  # failed: ignored
    cal = planner.Calibration.from_records(recs)
    assert cal.n_ram == 4
    assert abs(cal.baseline_ram - 40 * MiB) < 0.01 * MiB
    assert abs(cal.compute_scale - 0.8) < 1e-3
    assert abs(cal.worst_ram_error) < 1e-3
    assert planner.Calibration.from_records([]) == planner.Calibration()


def test_gpu_split_follows_llama_cpp_layer_assignment(models):
    info = read_model(models / "moe-q8_0.gguf")  # 6 layers, 8 experts
    layers = info.layer_bytes()
    out = sum(t.n_bytes for t in info.tensors if t.group == "output" or t.name == "output_norm.weight")
    cfg = TrialConfig(model=info.path, n_ctx=1024)

    def split(**kw):
        return planner.predict(dataclasses.replace(cfg, **kw), info, gpu_offload=True)

    assert split(n_gpu_layers=0).weights_gpu == 0 and split(n_gpu_layers=0).vram_bytes == 0
    # llama.cpp offloads the output layer first (src/llama-model.cpp load_tensors: i_gpu_start =
    # n_layer + 1 - n_gpu_layers; "offloading output layer to GPU" for any n_gpu_layers > 0)
    p1 = split(n_gpu_layers=1)
    assert p1.weights_gpu == out and p1.kv_gpu == 0 and p1.n_gpu_layers == 1
    p2 = split(n_gpu_layers=2)  # the output layer and the last block
    assert p2.weights_gpu == sum(layers[5].values()) + out
    assert p2.kv_gpu == p2.kv_bytes // 6 and p2.kv_host == 5 * p2.kv_bytes // 6
    full = split(n_gpu_layers=99)  # all blocks + output; token embeddings stay on the host
    embd = sum(t.n_bytes for t in info.tensors if t.group == "embd")
    assert full.weights_gpu == sum(sum(g.values()) for g in layers) + out
    assert full.weights_host == embd and full.n_gpu_layers == 7
    exps = [layers[i]["exps"] for i in range(6)]
    assert split(n_gpu_layers=99, n_cpu_moe=2).weights_gpu == full.weights_gpu - exps[0] - exps[1]
    assert split(n_gpu_layers=99, cpu_moe=True).weights_gpu == full.weights_gpu - sum(exps)
    assert (
        split(n_gpu_layers=99, overrides=("blk\\.5\\.ffn_(gate|up|down)=CPU",)).weights_gpu
        == full.weights_gpu - layers[5]["exps"] - layers[5]["ffn"]
    )
    # without offload (this CPU build) everything is host memory
    cpu = planner.predict(dataclasses.replace(cfg, n_gpu_layers=99), info, gpu_offload=False)
    assert cpu.vram_bytes == 0 and cpu.weights_gpu == 0


def test_max_gpu_layers_and_fits(models):
    info = read_model(models / "moe-q8_0.gguf")
    cfg = TrialConfig(model=info.path, n_ctx=4096)
    cal = planner.Calibration(baseline_vram=10 * MiB)
    vram = [
        planner.predict(dataclasses.replace(cfg, n_gpu_layers=n), info, cal, gpu_offload=True).vram_bytes
        for n in range(8)
    ]
    assert vram == sorted(vram)
    budget = (vram[4] + vram[5]) // 2
    n = planner.max_gpu_layers(cfg, info, int(budget / 0.95), headroom=0.05, calib=cal)
    assert n == 4
    assert planner.max_gpu_layers(cfg, info, 1 << 40, calib=cal) == 7
    assert planner.max_gpu_layers(cfg, info, 1, calib=cal) == 0
    p = planner.predict(cfg, info, cal)
    ok, why = planner.fits(p, ram_total=p.ram_bytes * 2, vram_total=None)
    assert ok and why == "fits"
    ok, why = planner.fits(p, ram_total=p.resident_bytes, vram_total=None, headroom=0.1)
    assert not ok and "swap" in why and "resident host RAM" in why
    ok, why = planner.fits(p, ram_total=p.ram_bytes * 10, vram_total=None, max_ram=p.resident_bytes // 2)
    assert not ok
    # mmap'd weights are file pages: RAM between the resident part and the whole peak still fits (never
    # swaps), but the weights do not all stay cached
    assert p.file_bytes > 0 and p.ram_bytes == p.resident_bytes + p.file_bytes
    between = (p.resident_bytes + p.file_bytes // 2) / 0.95
    assert planner.fits(p, ram_total=int(between), vram_total=None)[0]
    assert planner.weights_cached(p, int(between)) is False and planner.weights_cached(p, p.ram_bytes * 2)
    pg = planner.predict(dataclasses.replace(cfg, n_gpu_layers=7), info, cal, gpu_offload=True)
    ok, why = planner.fits(pg, ram_total=1 << 40, vram_total=pg.vram_bytes // 2)
    assert not ok and "VRAM" in why


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """Real llama.cpp quantizer output for several types: a 10-layer dense model and an 8-expert MoE."""
    d = tmp_path_factory.mktemp("quants")
    dense_types = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q4_0", "q3_k_m", "q2_k", "iq4_xs")
    dense = synthesize(d, "dense", dense_types, n_embd=256, n_ff=512, n_vocab=1024, n_head=4, n_head_kv=2)
    moe_types = ("f16", "q4_k_m", "q3_k_m", "q8_0")
    moe = synthesize(d, "moe", moe_types, n_embd=256, n_ff=256, n_vocab=1024, n_layer=3)
    return dict(zip(dense_types, dense)), dict(zip(moe_types, moe))


def test_what_if_sizes_match_llama_cpp_quantizer(quantized):
    for files in quantized:
        src = read_model(files["f16"])
        for q, path in files.items():
            real = read_model(path)
            types = whatif.quant_types(src, q)
            # the exact type llama.cpp chose for every tensor (q4_k_m mixes Q4_K/Q6_K, MoE attn_v gets Q8_0...)
            assert {t.name: t.type for t in real.tensors} == types, q
            size = whatif.quant_size(src, q)
            assert abs(size / real.file_size - 1) < 0.02, (q, size, real.file_size)
    # and from an already quantized file: the shapes, not the current types, decide
    dense, _ = quantized
    q4 = read_model(dense["q4_k_m"])
    assert abs(whatif.quant_size(q4, "q8_0") / read_model(dense["q8_0"]).file_size - 1) < 0.02


def test_what_if_rejects_unknown_types(models):
    with pytest.raises(ValueError, match="unknown quant type 'q9_k'"):
        whatif.quant_size(read_model(models / "tiny-f16.gguf"), "q9_k")


# -- tuner estimate ----------------------------------------------------------------------------------------


def test_estimate_cli_table_and_json(models):
    moe = str(models / "moe-q8_0.gguf")
    r = CliRunner().invoke(
        cli, ["estimate", moe, "--ctx", "1024,65536", "--vram", "400MiB", "--ram", "300MiB", "--json"]
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    (m,) = data
    info = read_model(moe)
    assert m["vram"] == 400 * MiB and m["ram"] == 300 * MiB and [c["n_ctx"] for c in m["contexts"]] == [1024, 65536]
    small, big = m["contexts"]
    assert small["size_bytes"] == sum(t.n_bytes for t in info.tensors)
    assert small["kv_bytes"] == 6 * 1024 * 2 * (4 * 64 * 2) and big["kv_bytes"] == 64 * small["kv_bytes"]
    cal = planner.Calibration()
    want = planner.max_gpu_layers(TrialConfig(model=moe, n_ctx=1024), info, 400 * MiB, 0.05, cal)
    assert small["max_gpu_layers"] == want and small["fits"] and not small["warning"]
    # 64 k context: the KV cache alone is 384 MiB: host RAM short, the swap trap is named
    assert not big["fits"] and "host RAM short" in big["warning"] and "swap" in big["warning"]
    r = CliRunner().invoke(cli, ["estimate", moe, "--ctx", "1024,65536", "--vram", "400MiB", "--ram", "300MiB"])
    assert r.exit_code == 0
    assert "max ngl" in r.output and f"{want}/7" in r.output
    assert "warning: n_ctx 65536: host RAM short" in r.output


def test_estimate_what_if_cli(models):
    f16 = str(models / "tiny-f16.gguf")
    r = CliRunner().invoke(cli, ["estimate", f16, "--what-if", "q8_0,q4_k_m", "--json"])
    assert r.exit_code == 0, r.output
    wi = json.loads(r.output)[0]["what_if"]
    assert [w["quant"] for w in wi] == ["q8_0", "q4_k_m"]
    for w in wi:
        real = read_model(models / f"tiny-{w['quant']}.gguf").file_size
        assert abs(w["size_bytes"] / real - 1) < 0.02
    r = CliRunner().invoke(cli, ["estimate", f16, "--what-if", "q8_0,q4_k_m"])
    assert "what if" in r.output and "q4_k_m" in r.output and "bits/weight" in r.output


def test_estimate_library_call_is_what_the_command_prints(models):
    """`tuner estimate` is tuner.plan.estimate.estimate plus printing: one call, the same figures."""
    moe, f16 = str(models / "moe-q8_0.gguf"), str(models / "tiny-f16.gguf")
    base = TrialConfig(model="", type_k="q8_0", type_v="q8_0", n_ubatch=256)
    est = estimate(
        [moe, read_model(f16)],
        ctx=[1024, 65536],
        ram=300 * MiB,
        vram=400 * MiB,
        headroom="5%",
        base=base,
        what_if="q4_k_m",
    )
    assert (est.ram, est.vram, est.headroom, est.quants, est.probe) == (300 * MiB, 400 * MiB, 0.05, ["q4_k_m"], None)
    m, d = est.models
    assert m.info.path == moe and d.info.path == f16 and [c["n_ctx"] for c in m.contexts] == [1024, 65536]
    info = read_model(moe)
    want = planner.estimate(info, [1024, 65536], 300 * MiB, 400 * MiB, 0.05, base)
    assert m.contexts == want and m.speed is None and "speed" not in m.to_dict()
    assert m.what_if == whatif.what_if(info, ["q4_k_m"])
    args = [
        "estimate",
        moe,
        f16,
        "--ctx",
        "1024,65536",
        "--ram",
        "300MiB",
        "--vram",
        "400MiB",
        "-ctk",
        "q8_0",
        "-ctv",
        "q8_0",
        "-ub",
        "256",
        "--what-if",
        "q4_k_m",
    ]
    r = CliRunner().invoke(cli, [*args, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == est.to_list() and r.output == est.to_json() + "\n"
    text = CliRunner().invoke(cli, args).output
    small, big = m.contexts
    assert f"{small['max_gpu_layers']}/{info.n_layer + 1}" in text and fmt_size(small["resident_bytes"]) in text
    assert big["warning"] and f"warning: n_ctx 65536: {big['warning']}" in text
    assert f"{fmt_size(m.what_if[0]['size_bytes'])}" in text and "planning for 400.00 MiB VRAM, 300.00 MiB RAM" in text
    # one path, a single context, this machine's memory when none is given
    one = estimate(f16, ctx=4096, vram=0)
    assert len(one.models) == 1 and one.ram > 0 and one.models[0].contexts[0]["n_ctx"] == 4096


@pytest.mark.parametrize(
    "kwargs, error, msg",
    [
        (dict(ctx="4096,x"), EstimateError, "--ctx: not a list"),
        (dict(ctx=[4096, 0]), EstimateError, "--ctx"),
        (dict(headroom="95%"), EstimateError, "--headroom"),
        (dict(headroom=0.95), EstimateError, "--headroom"),
        (dict(what_if=["q8_0", "q7_z"]), whatif.QuantTypeError, "unknown quant type 'q7_z'"),
        (dict(n_gpu_layers=-2), EstimateError, "-ngl must be -1"),
    ],
)
def test_estimate_library_bad_input_raises_tuner_errors(models, kwargs, error, msg):
    with pytest.raises(error, match=msg) as e:
        estimate(models / "tiny-f16.gguf", **{"ram": 64 * MiB, "vram": 0, **kwargs})
    assert isinstance(e.value, TunerError)
    with pytest.raises(ModelError, match="model not found"):
        estimate([models / "tiny-f16.gguf", models / "nothere.gguf"], ram=64 * MiB, vram=0)


@pytest.mark.parametrize(
    "args, msg",
    [
        (["nothere.gguf"], "model not found"),
        (["{tiny}", "--ctx", "4096,x"], "--ctx"),
        (["{tiny}", "--ctx", "0"], "--ctx"),
        (["{tiny}", "--what-if", "q4_k_m,q7_z"], "unknown quant type 'q7_z'"),
        (["{tiny}", "--headroom", "95%"], "--headroom"),
        (["{tiny}", "--headroom", "lots"], "--headroom"),
        (["{tiny}", "--vram", "24 potatoes"], "not a size"),
        (["{tiny}", "nothere.gguf"], "model not found"),
    ],
)
def test_estimate_bad_input_is_one_line_exit_2(models, args, msg):
    args = [a.format(tiny=models / "tiny-f16.gguf") for a in args]
    r = CliRunner().invoke(cli, ["estimate", *args])
    assert r.exit_code == 2, r.output
    assert msg in r.output and r.output.count("\n") == 1 and "Traceback" not in r.output
    assert "tuner: error:" in r.output


def test_estimate_split_model_via_cli(deepseek):
    r = CliRunner().invoke(
        cli,
        [
            "estimate",
            str(deepseek),
            "--ctx",
            "8192",
            "--vram",
            "80GiB",
            "--ram",
            "512GiB",
            "-ctk",
            "q8_0",
            "-ctv",
            "q8_0",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)[0]
    assert m["shards"] == 2 and m["file_size"] > 400e9
    c = m["contexts"][0]
    assert c["kv_bytes"] == 61 * 8192 * (576 // 32 * 34)  # MLA: the latent K only
    assert 0 < c["max_gpu_layers"] < 62 and c["fits"]
    assert c["min_n_cpu_moe"] is not None and 0 < c["min_n_cpu_moe"] <= 61

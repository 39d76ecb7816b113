"""Speed prediction (tuner.plan.speed) and the rig probe (tuner.plan.probe): the arithmetic on given figures, the
probe file's checks, and one real probe of llama.cpp on small models. Speed itself is never asserted: benchmarks
measure it (benchmarks/speed_accuracy.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from tuner.cli import cli
from tuner.measure import hardware
from tuner.model.meta import read_model
from tuner.plan import oracle, probe, roofline, speed, whatif
from tuner.plan.estimate import EstimateError, estimate
from tuner.record import TrialConfig

TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K", "Q2_K"]


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def figures(s_per_byte=1e-10, s_per_flop=1e-11, layer=0.0, fixed=0.0, **per_type) -> dict:
    """Probe figures as `tuner probe` writes them (chosen here, not measured): one rate for every type unless
    per_type names one (Q2_K=3e-10 makes Q2_K's bytes three times as dear)."""
    return {
        "tg_s_per_byte": {t: per_type.get(t, s_per_byte) for t in TYPES},
        "tg_layer_s": layer,
        "tg_fixed_s": fixed,
        "pp_s_per_flop": {t: s_per_flop for t in TYPES},
        "pp_layer_s": layer,
        "pp_fixed_s": fixed,
    }


def probe_dict(
    cpu: dict[int, dict], gpu: dict | None = None, hw_fp: str | None = None, build_fp: str | None = None
) -> dict:
    here_hw, here_build = probe.fingerprints()
    return {
        "version": probe.VERSION,
        "hw_fingerprint": hw_fp or here_hw,
        "build_fingerprint": build_fp or here_build,
        "shape": {"n_prompt": 128, "n_gen": 32, "repetitions": 1},
        "types": TYPES,
        "threads": sorted(cpu),
        "cpu": {str(t): f for t, f in cpu.items()},
        "gpu": gpu,
    }


def test_tg_time_is_the_bytes_read_per_token_over_the_rate(models):
    info = read_model(models / "tiny-q8_0.gguf")
    p = speed.predict(info, probe_dict({2: figures(s_per_byte=1e-10)}), threads=2, n_gen=32)
    host, dev = roofline.bytes_per_token(TrialConfig(model=info.path, n_gpu_layers=0, n_gen=32), info, False)
    assert dev == 0
    # the same bytes the roofline counts (the tied-or-not output matrix whole, one embedding row, the KV cache)
    assert 1 / p.pred_tg_tps == pytest.approx(host * 1e-10, rel=0.02)
    # fixed costs add per token: per layer and once
    q = speed.predict(info, probe_dict({2: figures(s_per_byte=1e-10, layer=1e-4, fixed=1e-3)}), threads=2, n_gen=32)
    assert 1 / q.pred_tg_tps == pytest.approx(1 / p.pred_tg_tps + info.n_layer * 1e-4 + 1e-3, rel=1e-9)


def test_what_if_quants_scale_with_their_bytes_and_with_their_type_rates(models):
    info = read_model(models / "tiny-f16.gguf")
    quants = ["q8_0", "q4_0", "q2_k"]
    rows = {r["quant"]: r for r in speed.rows(info, probe_dict({1: figures()}), quants, threads=1)}
    assert rows["f16"]["file"] and not rows["q8_0"]["file"]
    # one rate for all types: fewer bytes, faster generation, in the order of the sizes
    tg = [rows[q]["pred_tg_tps"] for q in ["f16", *quants]]
    assert tg == sorted(tg)
    sizes = [whatif.quant_size(info, q) for q in quants]
    assert sizes == sorted(sizes, reverse=True)
    # bytes per token follow the quantizer's tensor types (token_embd stays a row, the output matrix is whole)
    t8 = speed.terms(info, TrialConfig(model=info.path, n_gpu_layers=0), speed.tensor_types(info, "q8_0"))
    t4 = speed.terms(info, TrialConfig(model=info.path, n_gpu_layers=0), speed.tensor_types(info, "q4_0"))
    assert sum(t4.tg_bytes.values()) < sum(t8.tg_bytes.values())
    # a type whose kernel is slow per byte can lose to a bigger file: speed is not the file size
    slow_q2 = {r["quant"]: r for r in speed.rows(info, probe_dict({1: figures(Q2_K=4e-10)}), quants, threads=1)}
    assert slow_q2["q2_k"]["pred_tg_tps"] < slow_q2["q4_0"]["pred_tg_tps"]
    assert slow_q2["q4_0"]["pred_tg_tps"] == pytest.approx(rows["q4_0"]["pred_tg_tps"])


def test_each_matrix_row_a_token_computes_costs_the_row_figure(models):
    info = read_model(models / "tiny-q8_0.gguf")
    tm = speed.terms(info, TrialConfig(model=info.path, n_gpu_layers=0))
    tied = not any(t.name == "output.weight" for t in info.tensors)
    # every weight matrix's rows (ne1 and beyond: a row is ne0 long) except the embedding, which is a row lookup
    # unless it is also the output matrix
    rows = sum(
        t.n_elements // t.shape[0]
        for t in info.tensors
        if len(t.shape) >= 2 and (tied or not t.name.startswith("token_embd"))
    )
    assert tm.rows == {speed.HOST: rows}
    assert tm.out_rows == {speed.HOST: info.n_vocab}
    base, per_row = figures(s_per_byte=1e-10, s_per_flop=1e-11), 5e-9
    a = speed.predict(info, probe_dict({1: base}), 1, n_prompt=128)
    b = speed.predict(info, probe_dict({1: {**base, "tg_s_per_row": per_row}}), 1, n_prompt=128)
    assert 1 / b.pred_tg_tps == pytest.approx(1 / a.pred_tg_tps + rows * per_row, rel=1e-9)
    # a prompt computes the output matrix once per batch, for its last token only
    assert 1 / b.pred_pp_tps == pytest.approx(1 / a.pred_pp_tps + info.n_vocab * per_row / 128, rel=1e-9)
    # a MoE's rows are those of the experts in use
    moe = read_model(models / "moe-q8_0.gguf")
    cfg = TrialConfig(model=moe.path, n_gpu_layers=0)
    exps = sum(t.n_elements // t.shape[0] for t in moe.tensors if t.group == "exps")
    rest = speed.terms(dataclasses.replace(moe, tensors=[t for t in moe.tensors if t.group != "exps"]), cfg)
    assert speed.terms(moe, cfg).rows[speed.HOST] - rest.rows[speed.HOST] == pytest.approx(exps * 2 / 8)


def test_pp_is_flops_over_the_rate_and_the_output_matrix_once_per_batch(models):
    info = read_model(models / "tiny-q8_0.gguf")
    a = speed.predict(info, probe_dict({2: figures(s_per_byte=0.0, s_per_flop=1e-11)}), threads=2, n_prompt=128)
    b = speed.predict(info, probe_dict({2: figures(s_per_byte=0.0, s_per_flop=2e-11)}), threads=2, n_prompt=128)
    assert a.pred_pp_tps == pytest.approx(2 * b.pred_pp_tps)
    tm = speed.terms(info, TrialConfig(model=info.path, n_gpu_layers=0, n_prompt=128))
    weights = sum(2 * t.n_elements for t in info.tensors if len(t.shape) >= 2 and t.group not in ("embd", "output"))
    assert weights <= sum(tm.pp_flops.values()) < 1.1 * weights  # matrices plus attention
    # the output matrix is read once per batch: a longer prompt spreads it over more tokens
    c = speed.predict(info, probe_dict({2: figures(s_per_byte=1e-9, s_per_flop=0.0)}), threads=2, n_prompt=64)
    d = speed.predict(info, probe_dict({2: figures(s_per_byte=1e-9, s_per_flop=0.0)}), threads=2, n_prompt=128)
    assert d.pred_pp_tps == pytest.approx(2 * c.pred_pp_tps)


def test_moe_reads_only_the_experts_in_use(models):
    info = read_model(models / "moe-q8_0.gguf")
    assert info.n_expert == 8 and info.n_expert_used == 2
    cfg = TrialConfig(model=info.path, n_gpu_layers=0)
    exps = sum(t.n_bytes for t in info.tensors if t.group == "exps")
    tm = speed.terms(info, cfg)
    everything_else = speed.terms(
        dataclasses.replace(info, tensors=[t for t in info.tensors if t.group != "exps"]), cfg
    )
    assert sum(tm.tg_bytes.values()) - sum(everything_else.tg_bytes.values()) == pytest.approx(exps * 2 / 8)
    pr = probe_dict({2: figures()})
    all_used = dataclasses.replace(info, n_expert_used=8)
    assert speed.predict(info, pr, 2).pred_tg_tps > speed.predict(all_used, pr, 2).pred_tg_tps


def test_thread_counts_between_those_probed_are_interpolated(models):
    info = read_model(models / "tiny-q8_0.gguf")
    pr = probe_dict({1: figures(s_per_byte=4e-10), 4: figures(s_per_byte=1e-10)})
    tg = {t: speed.predict(info, pr, t).pred_tg_tps for t in (1, 2, 3, 4, 8)}
    assert tg[1] < tg[2] < tg[3] < tg[4] == tg[8]  # held beyond the last count probed
    assert tg[2] == pytest.approx(tg[1] + (tg[4] - tg[1]) / 3, rel=0.05)


def test_unprobed_types_borrow_the_nearest_and_are_named(models):
    info = read_model(models / "tiny-f16.gguf")
    (row,) = [r for r in speed.rows(info, probe_dict({1: figures()}), ["iq4_nl"], 1) if not r["file"]]
    assert row["pred_tg_tps"] and "IQ4_NL" in row["unprobed_types"]


def test_gpu_layers_need_gpu_figures(models):
    info = read_model(models / "tiny-q8_0.gguf")
    p = speed.predict(info, probe_dict({2: figures()}), 2, n_gpu_layers=99, gpu_offload=True)
    assert p.pred_tg_tps is None and p.pred_pp_tps is None and "no GPU figures" in p.note
    gpu = {**figures(s_per_byte=1e-12, s_per_flop=1e-13), "link_bytes_per_s": 2e10}
    full = speed.predict(info, probe_dict({2: figures()}, gpu=gpu), 2, n_gpu_layers=99, gpu_offload=True)
    cpu = speed.predict(info, probe_dict({2: figures()}, gpu=gpu), 2, n_gpu_layers=0, gpu_offload=True)
    assert full.pred_tg_tps > cpu.pred_tg_tps  # device bytes at the device rate


def test_experts_in_ram_cost_host_layers_and_their_prompt_products_run_on_the_gpu(models):
    """All layers on the GPU, the routed experts in RAM (--cpu-moe): every block runs partly on the host, so the
    host's per-layer cost applies to each; a prompt batch multiplies the host experts on the GPU (op offload, the
    weights copied over the link), so every FLOP, the experts' too, goes at the GPU's rate."""
    info = read_model(models / "moe-q8_0.gguf")
    cfg = TrialConfig(model=info.path, n_gpu_layers=99, cpu_moe=True, n_prompt=128, n_gen=32)
    tm = speed.terms(info, cfg, gpu_offload=True)
    assert tm.layers[speed.HOST] == tm.layers[speed.DEVICE] == info.n_layer
    assert tm.moe_layers[speed.HOST] == info.n_layer and tm.exp_pp_flops and tm.link_bytes > 0

    def pred(host_layer=0.0, gpu_flop=1e-13):
        gpu = {**figures(s_per_byte=1e-12, s_per_flop=gpu_flop), "link_bytes_per_s": 2e10}
        return speed.predict(
            info,
            probe_dict({2: figures(layer=host_layer)}, gpu=gpu),
            2,
            n_gpu_layers=99,
            cpu_moe=True,
            gpu_offload=True,
        )

    base = pred()
    assert 1 / pred(host_layer=1e-4).pred_tg_tps - 1 / base.pred_tg_tps == pytest.approx(info.n_layer * 1e-4)
    flops = sum(tm.pp_flops.values())
    assert 1 / pred(gpu_flop=2e-13).pred_pp_tps - 1 / base.pred_pp_tps == pytest.approx(flops * 1e-13, rel=1e-9)
    # full offload: the host runs no block
    assert speed.terms(info, dataclasses.replace(cfg, cpu_moe=False), gpu_offload=True).layers[speed.HOST] == 0


def test_unmodelled_architecture_predicts_nothing(tmp_path, models):
    s = oracle.shape("llama", small=True)
    s = dataclasses.replace(s, arch="bloom", meta={k: v for k, v in s.meta.items() if k != ".rope.freq_base"})
    path = oracle.write_sparse(s, tmp_path / "bloom.gguf")
    pf = tmp_path / "probe.json"
    pf.write_text(json.dumps(probe_dict({2: figures()})))
    r = CliRunner().invoke(
        cli, ["estimate", str(path), "--speed", "--probe", str(pf), "--what-if", "q4_0", "--vram", "0", "--json"]
    )
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)[0]
    assert all(row["pred_tg_tps"] is None and row["pred_pp_tps"] is None for row in m["speed"])
    assert m["speed"][0]["note"].startswith("no speed prediction: unknown architecture bloom")
    assert m["what_if"][0]["pred_tg_tps"] is None
    r = CliRunner().invoke(cli, ["estimate", str(path), "--speed", "--probe", str(pf), "--vram", "0"])
    assert "speed: no speed prediction: unknown architecture bloom" in r.output


def test_estimate_speed_json_and_table(tmp_path, models):
    pf = tmp_path / "probe.json"
    pf.write_text(json.dumps(probe_dict({1: figures(), 2: figures(s_per_byte=5e-11)})))
    args = [
        "estimate",
        str(models / "tiny-q8_0.gguf"),
        "--speed",
        "--probe",
        str(pf),
        "--what-if",
        "q4_0,q2_k",
        "-t",
        "2",
        "--vram",
        "0",
    ]
    r = CliRunner().invoke(cli, args + ["--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)[0]
    assert [x["quant"] for x in m["speed"]] == ["q8_0", "q4_0", "q2_k"]
    assert all(x["pred_tg_tps"] > 0 and x["pred_pp_tps"] > 0 and x["threads"] == 2 for x in m["speed"])
    assert [w["pred_tg_tps"] for w in m["what_if"]] == [x["pred_tg_tps"] for x in m["speed"][1:]]
    out = CliRunner().invoke(cli, args).output
    assert "pred tg t/s" in out and f"{m['speed'][1]['pred_tg_tps']:.1f}" in out
    assert "predicted speed of this file (q8_0), 2 threads" in out


def test_estimate_speed_as_a_library_call(tmp_path, models):
    """estimate(..., speed=True) returns the rows `tuner estimate --speed` prints; a probe file or its dict."""
    data = probe_dict({1: figures(), 2: figures(s_per_byte=5e-11)})
    pf = tmp_path / "probe.json"
    pf.write_text(json.dumps(data))
    model = models / "tiny-q8_0.gguf"
    est = estimate(model, what_if=["q4_0", "q2_k"], speed=True, probe=pf, threads=2, vram=0)
    (m,) = est.models
    assert est.probe == data and m.speed_shape == data["shape"]
    assert m.speed == speed.rows(read_model(model), data, ["q4_0", "q2_k"], 2, gpu_offload=False)
    assert [w["pred_tg_tps"] for w in m.what_if] == [x["pred_tg_tps"] for x in m.speed[1:]]
    assert estimate(model, what_if="q4_0,q2_k", speed=True, probe=data, threads=2, vram=0).to_list() == est.to_list()
    r = CliRunner().invoke(
        cli,
        [
            "estimate",
            str(model),
            "--speed",
            "--probe",
            str(pf),
            "--what-if",
            "q4_0,q2_k",
            "-t",
            "2",
            "--vram",
            "0",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)[0]["speed"] == m.speed and json.loads(r.output)[0]["ram"] == est.ram
    other = tmp_path / "other-hw.json"
    other.write_text(json.dumps(probe_dict({2: figures()}, hw_fp="0123456789abcdef")))
    with pytest.raises(probe.ProbeError, match="another machine"):
        estimate(model, speed=True, probe=other)
    with pytest.raises(EstimateError, match="run `tuner probe`"):
        estimate(model, speed=True)


def _one_line_error(r, *words):
    assert r.exit_code == 2, r.output
    assert r.output.count("\n") == 1 and r.output.startswith("tuner: error:"), r.output
    for w in words:
        assert w in r.output


def test_probe_files_of_another_machine_or_build_are_refused(tmp_path, models, monkeypatch):
    model = str(models / "tiny-q8_0.gguf")
    other_hw = tmp_path / "other-hw.json"
    other_hw.write_text(json.dumps(probe_dict({2: figures()}, hw_fp="0123456789abcdef")))
    _one_line_error(
        CliRunner().invoke(cli, ["estimate", model, "--speed", "--probe", str(other_hw)]),
        "another machine",
        "tuner probe",
    )
    # a build tuner cannot tell apart itself is kept apart by the salt (hardware.FINGERPRINT_SALT)
    monkeypatch.setenv(hardware.FINGERPRINT_SALT, "other-driver")
    salted = tmp_path / "other-build.json"
    salted.write_text(json.dumps(probe_dict({2: figures()})))
    monkeypatch.delenv(hardware.FINGERPRINT_SALT)
    _one_line_error(
        CliRunner().invoke(cli, ["estimate", model, "--speed", "--probe", str(salted)]), "another llama.cpp build"
    )
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    _one_line_error(
        CliRunner().invoke(cli, ["estimate", model, "--speed", "--probe", str(garbage)]), "not a tuner probe file"
    )
    _one_line_error(
        CliRunner().invoke(cli, ["estimate", model, "--speed", "--probe", str(tmp_path / "none.json")]),
        "probe file not found",
    )
    # probe --show reads it the same way
    _one_line_error(CliRunner().invoke(cli, ["probe", "--show", "-o", str(other_hw)]), "another machine")


def test_speed_without_a_probe_says_how_to_make_one(models):
    r = CliRunner().invoke(cli, ["estimate", str(models / "tiny-q8_0.gguf"), "--speed"])
    _one_line_error(r, "run `tuner probe`")


def test_probe_bad_input_is_one_line(tmp_path):
    _one_line_error(CliRunner().invoke(cli, ["probe", "--types", "Q9_9"]), "unknown probe type")
    _one_line_error(CliRunner().invoke(cli, ["probe", "-t", "0"]), "--threads")
    assert not list(tmp_path.glob("cache/tuner/probe-*.json"))


SMALL = {
    "wide": dict(n_embd=512, n_ff=1024, n_head=8, n_head_kv=4, n_layer=2, n_vocab=512),
    "overhead": dict(n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_layer=2, n_vocab=512),
    "moe": dict(n_embd=512, n_ff=512, n_head=8, n_head_kv=4, n_layer=2, n_vocab=512, n_expert=8, n_expert_used=2),
    "rows": dict(n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_layer=2, n_vocab=32768),
}


@pytest.mark.slow
def test_probe_measures_llama_cpp_and_estimate_uses_it(tmp_path, models):
    """A real probe (llama.cpp's kernels through tuner's worker) on small models: the file, its fingerprints,
    and estimate --speed reading it. The figures are measured, so only their presence is checked."""
    data, path = probe.run(
        tmp_path / "p.json",
        ["Q8_0", "Q4_0", "F16"],
        [1],
        repetitions=1,
        model_dir=tmp_path / "m",
        shapes=SMALL,
        passes=2,
    )
    assert path == tmp_path / "p.json" and probe.load(path) == json.loads(path.read_text())
    assert (data["hw_fingerprint"], data["build_fingerprint"]) == probe.fingerprints()
    assert sorted((r["type"], r["role"]) for r in data["trials"]) == [
        ("F16", "moe"),
        ("F16", "wide"),
        ("Q4_0", "moe"),
        ("Q4_0", "wide"),
        ("Q8_0", "moe"),
        ("Q8_0", "overhead"),
        ("Q8_0", "overhead"),
        ("Q8_0", "rows"),
        ("Q8_0", "wide"),
    ]
    assert all(r["tg_tps"] > 0 and r["pp_tps"] > 0 and r["threads"] == 1 for r in data["trials"])
    # every trial ran once per pass (one repetition each here), and its figure is the median over its passes
    for r in data["trials"]:
        assert len(r["passes"]) == 2 and len(r["tg_samples"]) == 2
        assert r["tg_tps"] == pytest.approx(sum(p["tg_tps"] for p in r["passes"]) / 2)
    fig = data["cpu"]["1"]
    assert set(fig["tg_s_per_byte"]) == set(fig["pp_s_per_flop"]) == {"Q8_0", "Q4_0", "F16"}
    assert all(v > 0 for v in [*fig["tg_s_per_byte"].values(), *fig["pp_s_per_flop"].values()])
    assert min(fig["tg_layer_s"], fig["tg_fixed_s"], fig["pp_layer_s"], fig["pp_fixed_s"], fig["tg_s_per_row"]) >= 0
    assert data["host_bandwidth_bytes_per_s"]["1"] > 1e8
    assert (data["gpu"] is None) == (not hardware.build_info()["gpu_offload"])
    # the figures reproduce the probe's own trials through speed.predict: fit and prediction count the same terms
    for r in data["trials"]:
        share = fig["overhead_share"].get(r["type"], {})
        if r["role"] == "wide" and max(share.values()) < 0.9:  # else the weights' floor (a tenth) applies
            p = speed.predict(read_model(r["model"]), data, 1, n_prompt=128, n_gen=32)
            assert p.pred_tg_tps == pytest.approx(r["tg_tps"], rel=1e-6)
            assert p.pred_pp_tps == pytest.approx(r["pp_tps"], rel=1e-6)
    # the row cost is what the short-row model took beyond the wide Q8_0 model's rate: that trial is reproduced too
    # (unless the wide Q8_0 model's rate sits at the weights' floor, as above)
    if fig["tg_s_per_row"] > 0 and fig["overhead_share"]["Q8_0"]["tg"] < 0.9:
        rows = next(r for r in data["trials"] if r["role"] == "rows")
        p = speed.predict(read_model(rows["model"]), data, 1, n_prompt=128, n_gen=32)
        assert p.pred_tg_tps == pytest.approx(rows["tg_tps"], rel=1e-4)
    # the MoEs: what experts cost beyond their weights is fitted on them, one MoE per type, and the figures are
    # the types' medians, so the median type's trial is reproduced (unless a figure sits at its floor: a
    # negative routing cost, a factor under a tenth)
    assert set(fig["pp_moe_factor_by_type"]) == set(fig["tg_moe_layer_s_by_type"]) == {"Q8_0", "Q4_0", "F16"}
    assert fig["tg_moe_layer_s"] == sorted(fig["tg_moe_layer_s_by_type"].values())[1] >= 0
    assert fig["pp_moe_factor"] == sorted(fig["pp_moe_factor_by_type"].values())[1] >= 0.1
    for moe in (r for r in data["trials"] if r["role"] == "moe"):
        p = speed.predict(read_model(moe["model"]), data, 1, n_prompt=128, n_gen=32)
        if fig["pp_moe_factor_by_type"][moe["type"]] == fig["pp_moe_factor"] > 0.1:
            assert p.pred_pp_tps == pytest.approx(moe["pp_tps"], rel=1e-6), moe["type"]
        if fig["tg_moe_layer_s_by_type"][moe["type"]] == fig["tg_moe_layer_s"] > 0:
            assert p.pred_tg_tps == pytest.approx(moe["tg_tps"], rel=1e-6), moe["type"]
    # ...and a dense model's prediction does not change with them
    dense = read_model(next(r["model"] for r in data["trials"] if r["type"] == "Q8_0" and r["role"] == "wide"))
    bare = {**data, "cpu": {"1": {k: v for k, v in fig.items() if "moe" not in k}}}
    assert speed.predict(dense, bare, 1).to_dict() == speed.predict(dense, data, 1).to_dict()
    # one-type models: every weight matrix is the probed type
    q4 = read_model(next(r["model"] for r in data["trials"] if r["type"] == "Q4_0"))
    assert {t.type for t in q4.tensors if len(t.shape) >= 2} == {"Q4_0"}
    r = CliRunner().invoke(
        cli,
        [
            "estimate",
            str(models / "tiny-q8_0.gguf"),
            "--speed",
            "--probe",
            str(path),
            "--what-if",
            "q4_0",
            "-t",
            "1",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)[0]["speed"]
    assert [x["quant"] for x in rows] == ["q8_0", "q4_0"] and all(x["pred_tg_tps"] > 0 for x in rows)
    assert "rig probe" in CliRunner().invoke(cli, ["probe", "--show", "-o", str(path)]).output

"""The bandwidth roofline: a real copy benchmark, bytes per generated token, and the bound in tuner bench."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
from click.testing import CliRunner

from tuner.cli import cli
from tuner.measure import hardware
from tuner.model.meta import read_model
from tuner.plan import roofline
from tuner.record import TrialConfig, TrialRecord


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_bandwidth_is_measured_once_and_cached(tmp_path):
    bw = roofline.bandwidth()
    assert bw["host"] > 1e8  # any machine copies more than 100 MB/s
    if hardware.probe().gpus:  # measured through the CUDA driver: any GPU copies more than 10 GB/s
        assert bw["device"] > 1e10
    else:
        assert bw["device"] is None
    path = tmp_path / "cache" / "tuner" / "bandwidth.json"
    cached = json.loads(path.read_text())
    assert cached["host"] == bw["host"] and cached["key"]
    assert roofline.bandwidth() == bw
    # read back, not re-measured: a figure no measurement gives, saved under this machine's key, comes back as is
    path.write_text(json.dumps({**cached, "host": 12345.0}))
    assert roofline.bandwidth()["host"] == 12345.0
    # a cache from another machine is not trusted
    path.write_text(json.dumps({**cached, "key": "other", "host": 1.0}))
    assert roofline.bandwidth()["host"] > 1e8


def test_bytes_per_token_dense_and_moe(models, dense_model):
    info = read_model(dense_model)
    cfg = TrialConfig(model=str(dense_model), n_gen=128, n_depth=0)
    host, dev = roofline.bytes_per_token(cfg, info, gpu_offload=False)
    embd = sum(t.n_bytes for t in info.tensors if t.group == "embd")
    kv_row = 10 * (2 * 4 * 64 * 2)  # 10 layers, K + V, 4 KV heads of 64, f16
    assert dev == 0
    # every weight once, one embedding row, and the KV cache at the mean tg position (n_gen / 2 + 1)
    assert host == sum(t.n_bytes for t in info.tensors) - embd + embd // info.n_vocab + 65 * kv_row
    deeper = roofline.bytes_per_token(dataclasses.replace(cfg, n_depth=4096), info, False)[0]
    assert deeper - host == 4096 * kv_row  # the KV read grows with depth
    moe = read_model(models / "moe-q8_0.gguf")
    mcfg = TrialConfig(model=moe.path, n_gen=2)
    mh, _ = roofline.bytes_per_token(mcfg, moe, False)
    exps = sum(t.n_bytes for t in moe.tensors if t.group == "exps")
    other = sum(t.n_bytes for t in moe.tensors if t.group not in ("exps", "embd"))
    # only 2 of 8 experts are read per token
    assert abs(mh - (other + exps * 2 // 8)) < 0.01 * mh


def test_tg_bound_splits_host_and_device(models):
    info = read_model(models / "moe-q8_0.gguf")
    cfg = TrialConfig(model=info.path, n_gen=16, n_gpu_layers=3)
    bw = {"host": 50e9, "device": 1000e9}
    host, dev = roofline.bytes_per_token(cfg, info, gpu_offload=True)
    assert host > 0 and dev > 0
    assert roofline.tg_bound(cfg, info, bw, True) == pytest.approx(1 / (host / 50e9 + dev / 1000e9))
    assert roofline.tg_bound(cfg, info, {"host": 50e9, "device": None}, True) is None
    cpu = roofline.tg_bound(cfg, info, bw, False)
    assert cpu == pytest.approx(50e9 / sum(roofline.bytes_per_token(cfg, info, False)))
    assert roofline.tg_bound(cfg, info, bw, True) > cpu  # offloading layers to faster memory raises the bound


def test_roofline_pct_in_record_row(models):
    rec = TrialRecord(
        config=TrialConfig(model=str(models / "tiny-q8_0.gguf")),
        outcome="ok",
        tg_samples=[50.0, 70.0],
        tg_roofline_ts=200.0,
    )
    assert rec.to_row()["tg_roofline_pct"] == pytest.approx(30.0)


def test_bench_records_prediction_and_bound(models, tmp_path):
    out = tmp_path / "bench.parquet"
    model = str(models / "tiny-q8_0.gguf")
    args = ["bench", model, "-p", "32", "-n", "8", "-r", "1", "-t", "1", "-o", str(out)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "% of the bandwidth bound" in r.output
    row = pd.read_parquet(out).iloc[0]
    assert row["predicted_ram_bytes"] > 0 and row["tg_roofline_ts"] > 0
    # the prediction follows what the build reports: VRAM for the offloaded layers, or none on a CPU build
    if hardware.build_info()["gpu_offload"]:
        assert row["predicted_vram_bytes"] > 0
    else:
        assert pd.isna(row["predicted_vram_bytes"])
    assert row["tg_roofline_pct"] == pytest.approx(100 * row["tg_ts_mean"] / row["tg_roofline_ts"])
    # the second run is calibrated on the first (same rig, same store): its prediction is within 10 %
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    second = pd.read_parquet(out).iloc[1]
    assert abs(second["predicted_ram_bytes"] / second["peak_rss_bytes"] - 1) < 0.10

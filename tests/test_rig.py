"""The rig this tool exists for, reached from a CPU machine: MoE models far bigger than VRAM on one or two GPUs.

Planning (`tuner search --dry-run --gpus ...`) runs on the sparse flagship files (real GGUF headers of the published
shapes, data regions that are holes: tuner.plan.oracle), so the GPU logic is tested without a GPU. The worker-side parts
(VRAM sources, page cache, loads) run real trials of real synthetic models; only NVML is faked (tests/fake_nvml.py).
"""

from __future__ import annotations

import dataclasses
import json
import os

import psutil
import pytest
from click.testing import CliRunner
from fake_nvml import FakeGpu, FakeNvml, GiB, MiB

from tuner.cli import cli
from tuner.measure import hardware, pagecache, store
from tuner.measure.runner import Runner, resolve
from tuner.model.meta import read_model
from tuner.plan import oracle, placement, planner
from tuner.record import TrialConfig
from tuner.search import feasible as fit

FLAGSHIPS = ("deepseek2", "qwen3moe", "gpt-oss", "glm4moe")  # DeepSeek-V3, Qwen3-235B-A22B, gpt-oss-120b, GLM-4.5-Air
RIGS = {"24GiB": [24 * GiB], "48GiB": [48 * GiB], "80GiB": [80 * GiB], "2x24GiB": [24 * GiB, 24 * GiB]}


@pytest.fixture(scope="session")
def flagships(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("flagships")
    return {arch: oracle.model_file(arch, out) for arch in FLAGSHIPS}


def dry_run(model, gpus: str, *extra) -> dict:
    res = CliRunner().invoke(
        cli, ["search", "-m", str(model), "--dry-run", "--json", "--gpus", gpus, "--ram", "512GiB", *extra]
    )
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.parametrize("rig", RIGS)
@pytest.mark.parametrize("arch", FLAGSHIPS)
def test_flagship_dry_run_searches_the_hybrid_region(flagships, arch, rig):
    """All layers on the GPU, experts of the first N layers in RAM, N from the fewest that fit: the configuration
    the community runs by hand. The old bound (every n_gpu_layers judged with all experts on the GPU) cut
    DeepSeek-V3 to 3 / 7 / 12 layers at 24 / 48 / 80 GiB and never tried it."""
    info = read_model(flagships[arch])
    plan = dry_run(flagships[arch], ",".join(f"{g // GiB}GiB" for g in RIGS[rig]))
    dims = plan["dimensions"]
    assert dims["n_gpu_layers"] == [info.n_layer + 1]
    ncm = dims["n_cpu_moe"]
    assert ncm == list(range(ncm[0], info.n_layer + 1)) and plan["configs"] > 0
    usable = [g["vram_usable"] for g in plan["rig"]["gpus"]]
    assert len(usable) == len(RIGS[rig])
    # no config the plan counts as fitting needs more VRAM than any one GPU has (two 24 GiB cards are no pool)
    for label in ("lowest_vram", "highest_vram"):
        x = plan[label]
        assert len(x["vram_by_device"]) == len(usable)
        assert all(v <= u for v, u in zip(x["vram_by_device"], usable)), (label, x["vram_by_device"], usable)
        assert x["config"]["n_gpu_layers"] == info.n_layer + 1
    # every expert in RAM needs least: of every layer, or of all but the last and that one's whole FFN (--fit's
    # overflow pattern, which takes its shared expert too)
    low = plan["lowest_vram"]["config"]
    assert (low["n_cpu_moe"], low["moe_part"]) in ((info.n_layer, "none"), (info.n_layer - 1, "ffn")), low
    # the lower bound is tight: one expert layer fewer in RAM does not fit even at the leanest settings
    rig_ = fit.described_rig(RIGS[rig], 512 * GiB, hardware.probe(hardware.Nvml(module=FakeNvml(gpus=[]))), _limits())
    space = _space(flagships[arch], info, rig_)
    assert fit.can_fit(space, {space.models[0]: info}, rig_, n_gpu_layers=info.n_layer + 1, n_cpu_moe=ncm[0])
    if ncm[0] > 0:
        assert not fit.can_fit(
            space, {space.models[0]: info}, rig_, n_gpu_layers=info.n_layer + 1, n_cpu_moe=ncm[0] - 1
        )
    if len(usable) > 1:
        assert len(dims["tensor_split"]) >= 3 and "50/50" in dims["tensor_split"]


def _limits():
    from tuner.search.options import Limits

    return Limits()


def _space(model, info, rig_):
    from tuner.search.space import build_space

    space = build_space(
        [str(model)], {str(model): info}, {}, TrialConfig(model=str(model)), True, 2, 2, auto=True, ram_total=512 * GiB
    )
    fit.apply(space, {str(model): info}, rig_)
    return space


def test_deepseek_at_24gib_is_the_community_recipe(flagships):
    """-ngl 62 --n-cpu-moe 61 (every expert in RAM) is in the region and the planner says it needs about 12 GiB."""
    plan = dry_run(flagships["deepseek2"], "24GiB")
    assert 61 in plan["dimensions"]["n_cpu_moe"]
    low = plan["lowest_vram"]
    every = (low["config"]["n_cpu_moe"], low["config"]["moe_part"]) in ((61, "none"), (60, "ffn"))
    assert every and 8 * GiB < low["vram_bytes"] < 16 * GiB
    # the experts stay in the mmap'd file, not in anonymous memory: a GPU build does not repack host weights
    assert low["mmap_bytes"] > 350 * GiB and low["resident_bytes"] < 2 * GiB


def test_partial_offload_only_when_the_non_expert_weights_do_not_fit(flagships):
    """On a 4 GiB GPU even every expert in RAM leaves DeepSeek-V3's attention and KV too big: then, and only
    then, fewer layers go on the GPU, with all their experts in RAM."""
    plan = dry_run(flagships["deepseek2"], "4GiB")
    dims = plan["dimensions"]
    assert dims["n_cpu_moe"] == [61]
    assert 0 in dims["n_gpu_layers"] and max(dims["n_gpu_layers"]) < 62
    assert "partial offload" in plan["reasons"]["n_gpu_layers"]


def test_dry_run_text_names_the_region_and_writes_nothing(flagships, tmp_path):
    res = CliRunner().invoke(
        cli,
        [
            "search",
            "-m",
            str(flagships["deepseek2"]),
            "--dry-run",
            "--gpus",
            "24GiB,24GiB",
            "--ram",
            "512GiB",
            "--results",
            str(tmp_path / "r"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "the hybrid region" in res.stdout and "fewest expert layers in RAM" in res.stdout
    assert "tensor_split = " in res.stdout and "highest vram" in res.stdout
    assert not (tmp_path / "r").exists()


def test_user_ranges_are_bounded_at_the_most_lenient_other_value(flagships):
    """--ngl 0:62 --n-cpu-moe 0:61 given by hand: every layer count fits with all experts in RAM, so none is cut;
    the n_cpu_moe bound is judged at the fewest GPU layers (where every value fits)."""
    plan = dry_run(flagships["deepseek2"], "24GiB", "--ngl", "0:62", "--n-cpu-moe", "0:61")
    assert plan["dimensions"]["n_gpu_layers"] == list(range(0, 63))
    assert plan["configs"] < plan["configs_in_space"]  # the rest is skipped by the planner, never run


def test_dense_model_bounds_gpu_layers_per_device(models):
    """A dense model on two small GPUs: n_gpu_layers is bounded where the fullest GPU overflows, not the pool."""
    m = models / "tiny-q8_0.gguf"
    info = read_model(m)
    one = planner.predict(
        TrialConfig(model=str(m), n_gpu_layers=info.n_layer + 1, n_ctx=512), info, gpu_offload=True, free=[GiB, GiB]
    )
    assert len(one.vram_by_device) == 2 and sum(one.vram_by_device) == one.vram_bytes


# -- llama.cpp's layer assignment ------------------------------------------------------------------------------


def test_layer_devices_follow_llama_cpp_split_points(flagships):
    """src/llama-model.cpp load_tensors: i_gpu_start = n_layer + 1 - ngl; layer il goes to the first device whose
    cumulative split point (float32) is above (il - i_gpu_start) / ngl (std::upper_bound); il = n_layer is the
    output layer."""
    info = read_model(flagships["deepseek2"])  # 61 blocks + output

    def devs(**kw):
        return placement.layer_devices(TrialConfig(model=info.path, **kw), info, True, free=[24 * GiB, 24 * GiB])

    d = devs(n_gpu_layers=62, tensor_split="3/1")  # split points 0.75, 1: il/62 < 0.75 for il <= 46
    assert d[:47] == [0] * 47 and d[47:] == [1] * 15
    d = devs(n_gpu_layers=62, tensor_split="1/1")  # 31/62 = 0.5 is not above 0.5: layer 31 goes to device 1
    assert d[:31] == [0] * 31 and d[31:] == [1] * 31
    d = devs(n_gpu_layers=10, tensor_split="3/1")  # blocks 52..60 and the output; (il-52)/10 < 0.75 for il <= 59
    assert d[:52] == [-1] * 52 and d[52:60] == [0] * 8 and d[60:] == [1, 1]
    d = devs(n_gpu_layers=62)  # no split given: by free memory, here equal
    assert d == devs(n_gpu_layers=62, tensor_split="1/1")
    uneven = placement.layer_devices(
        TrialConfig(model=info.path, n_gpu_layers=62), info, True, free=[16 * GiB, 48 * GiB]
    )  # 1/4 of the layers to device 0
    assert uneven.count(0) == 16 and uneven.count(1) == 46
    none = devs(n_gpu_layers=62, split_mode="none", main_gpu=1)
    assert set(none) == {1}


def test_per_device_prediction_adds_up(flagships):
    info = read_model(flagships["qwen3moe"])
    cfg = TrialConfig(model=info.path, n_gpu_layers=info.n_layer + 1, n_cpu_moe=80, n_ctx=4096, tensor_split="1/3")
    p = planner.predict(cfg, info, gpu_offload=True, free=[24 * GiB, 24 * GiB])
    assert len(p.vram_by_device) == 2 and sum(p.vram_by_device) == p.vram_bytes
    assert p.vram_by_device[1] > p.vram_by_device[0]  # 3/4 of the layers, and every expert on the GPU
    single = planner.predict(dataclasses.replace(cfg, tensor_split=""), info, gpu_offload=True)
    # two CUDA contexts and compute buffers instead of one; the weights and KV are the same bytes
    assert p.weights_gpu == single.weights_gpu and p.kv_gpu == single.kv_gpu
    assert p.vram_bytes > single.vram_bytes


# -- VRAM that is true or says it is unknown -------------------------------------------------------------------


def _trial(models, nvml, fault=None, **kw):
    cfg = resolve(
        TrialConfig(model=str(models / "tiny-q8_0.gguf"), n_prompt=16, n_gen=4, repetitions=1, n_threads=1, **kw)
    )
    with Runner(timeout=120, nvml=hardware.Nvml(module=nvml)) as runner:
        return runner.run(cfg, fault)


def test_vram_from_the_process_when_nvml_lists_it(models):
    me = os.getpid()

    def procs(gpu, n):
        return [(pid, 500 * MiB) for pid in (c.pid for c in psutil.Process(me).children())]

    rec = _trial(models, FakeNvml(processes=procs))
    assert rec.ok and rec.vram_by == "process" and rec.peak_vram_bytes == 500 * MiB


def test_vram_from_the_device_in_a_container(models):
    """NVML lists only host PIDs (none is the worker's): the device's used memory over its level before the
    worker started is the figure, and the record says where it came from."""
    me = os.getpid()
    state = {"base": 2 * GiB}

    def device_used(gpu, n):
        live = 0
        for c in psutil.Process(me).children():
            try:
                live += c.status() != psutil.STATUS_ZOMBIE and "tuner.measure.worker" in " ".join(c.cmdline())
            except psutil.NoSuchProcess:
                pass
        return state["base"] + 700 * MiB * live

    fake = FakeNvml(processes=lambda gpu, n: [(123456, 9 * GiB)], device_used=device_used)
    rec = _trial(models, fake)
    assert rec.ok and rec.vram_by == "device"
    assert rec.peak_vram_bytes == 700 * MiB and rec.peak_vram_by_gpu == [700 * MiB]


def test_unknown_vram_is_null_not_zero(models):
    def lost(gpu, n):  # the probe still saw the GPU; afterwards the device stops answering
        if n:
            raise RuntimeError("GPU is lost")
        return GiB

    fake = FakeNvml(process_list_error="Not Supported", device_used=lost)
    rec = _trial(models, fake)
    assert rec.ok and rec.vram_by == "none"
    assert rec.peak_vram_bytes is None and rec.peak_vram_by_gpu == []
    row = rec.to_row()
    assert row["peak_vram_bytes"] is None and row["vram_by"] == "none"


def test_max_vram_with_unknown_vram_warns_once(models, tmp_path, capsys):
    from tuner.record import TrialRecord
    from tuner.search.loop import Search
    from tuner.search.options import SearchOptions
    from tuner.search.space import build_space

    m = str(models / "tiny-q8_0.gguf")
    hw = hardware.probe(hardware.Nvml(module=FakeNvml(gpus=[FakeGpu(total=24 * GiB)])))
    space = build_space([m], {m: read_model(m)}, {}, TrialConfig(model=m), True, 2, 2)
    opts = SearchOptions(results=tmp_path, study="s", max_vram=20 * GiB)
    srch = Search(space, opts, {m: read_model(m)}, hw, {"gpu_offload": True})
    unknown = TrialRecord(config=TrialConfig(model=m), outcome="ok", vram_by="none")
    assert srch.warn_unknown_vram(unknown) and not srch.warn_unknown_vram(unknown)
    err = capsys.readouterr().err
    assert err.count("--max-vram cannot be checked") == 1
    known = TrialRecord(config=TrialConfig(model=m), outcome="ok", peak_vram_bytes=GiB, vram_by="device")
    assert not Search(space, opts, {m: read_model(m)}, hw, {"gpu_offload": True}).warn_unknown_vram(known)


# -- loads: page cache, load timeout, several configs per load ---------------------------------------------------


def test_page_cache_share_of_a_file(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(8 * MiB))
    os.sync()
    assert pagecache.cached_pct([str(f)]) == pytest.approx(100.0, abs=1)
    pagecache.evict([str(tmp_path / "gone"), f])  # a missing file is skipped, the rest evicted
    assert pagecache.cached_pct([str(f)]) < 50
    f.read_bytes()
    assert pagecache.cached_pct([str(f)]) == pytest.approx(100.0, abs=1)
    hole = tmp_path / "hole.gguf"
    with open(hole, "wb") as h:
        h.truncate(40 * GiB)  # a 40 GiB hole: checked window by window, nothing read
    assert pagecache.cached_bytes(str(hole)) == (0, 40 * GiB)
    assert pagecache.cached_pct([str(tmp_path / "gone")]) is None


def test_records_say_which_trial_loaded_and_how_cached(models):
    cfg = resolve(TrialConfig(model=str(models / "tiny-q8_0.gguf"), n_prompt=8, n_gen=2, repetitions=1, n_threads=1))
    with Runner(timeout=120, reuse=True) as runner:
        first = runner.run(cfg)
        again = runner.run(dataclasses.replace(cfg, n_ubatch=64))  # same load key: the worker keeps the model
        other = runner.run(dataclasses.replace(cfg, use_mmap=False))  # another load key: a new load
    assert first.model_loaded and first.page_cache_pct is not None and 0 <= first.page_cache_pct <= 100
    assert again.model_loaded is False and again.page_cache_pct is None
    assert other.model_loaded and other.page_cache_pct is not None


def test_a_slow_load_is_not_the_trials_timeout(models, monkeypatch):
    """The trial timeout counts from the end of the load; only a load beyond --load-timeout fails the trial."""
    monkeypatch.setenv("TUNER_SLOW_LOAD_S", "3")
    cfg = resolve(TrialConfig(model=str(models / "tiny-q8_0.gguf"), n_prompt=8, n_gen=2, repetitions=1, n_threads=1))
    with Runner(timeout=2.5, load_timeout=60) as runner:
        rec = runner.run(cfg, "slow_load")
    assert rec.ok, rec.cause
    with Runner(timeout=60, load_timeout=1.5) as runner:
        rec = runner.run(cfg, "slow_load")
    assert rec.outcome == "timeout" and "model load took over 1.5 s" in rec.cause


def test_a_slow_depth_fill_is_setup_not_the_trials_timeout(models, monkeypatch):
    """Filling a deep context (minutes at 32k on a CPU) is setup, like the load: outside the trial timeout,
    bounded by --load-timeout."""
    monkeypatch.setenv("TUNER_SLOW_LOAD_S", "3")
    cfg = resolve(
        TrialConfig(
            model=str(models / "tiny-q8_0.gguf"),
            n_ctx=256,
            n_prompt=8,
            n_gen=2,
            n_depth=200,
            repetitions=2,
            n_threads=1,
        )
    )
    with Runner(timeout=2.5, load_timeout=60) as runner:
        rec = runner.run(cfg, "slow_fill")
    assert rec.ok, rec.cause
    assert rec.depth_fill_ms and rec.depth_restore_ms  # filled once, restored for the other repetitions
    with Runner(timeout=60, load_timeout=1.5) as runner:
        rec = runner.run(cfg, "slow_fill")
    assert rec.outcome == "timeout" and "filling the context to its depth took over 1.5 s" in rec.cause


def test_search_loads_each_load_key_once(models, tmp_path):
    """4 load keys (experts in RAM for 0 or 1 layers × mmap on/off) × 4 configs each (batch, flash attention):
    with --per-load 4 every key's configs are measured in one load, 4 loads for 16 configs."""
    moe = str(models / "moe-q8_0.gguf")
    res = CliRunner().invoke(
        cli,
        [
            "search",
            "-m",
            moe,
            "--results",
            str(tmp_path),
            "--study",
            "loads",
            "--no-auto-space",
            "--n-cpu-moe",
            "0,1",
            "--mmap",
            "true,false",
            "-ub",
            "64,128",
            "-fa",
            "on,off",
            "-t",
            "1",
            "-p",
            "16",
            "-n",
            "4",
            "-r",
            "1",
            "--n-trials",
            "16",
            "--no-confirm",
            "--drift-every",
            "0",
            "--per-load",
            "4",
            "--seed",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    recs = [r for r in store.records(tmp_path / "loads" / store.TRIALS_FILE) if r.searched and r.ok]
    assert len({r.config.load_key() for r in recs}) == 4 and len(recs) == 16
    loads = [r for r in recs if r.model_loaded]
    assert len(loads) == 4, [(r.trial_number, r.config.n_cpu_moe, r.config.use_mmap, r.model_loaded) for r in recs]
    assert all(r.load_ms is not None for r in recs)


def test_a_depth_is_filled_once_and_restored_for_each_repetition(models):
    """-d N: the filled context is saved to a state file after the first fill and restored before every other
    repetition, and for any later trial with the same context settings: the file is the runner's, so a fresh
    worker (every trial gets one here, as in the race and the ladder) restores it too."""
    cfg = resolve(
        TrialConfig(
            model=str(models / "tiny-q8_0.gguf"),
            n_prompt=16,
            n_gen=4,
            n_depth=200,
            n_ctx=512,
            repetitions=3,
            n_threads=1,
        )
    )
    with Runner(timeout=120, reuse=False) as runner:
        first = runner.run(cfg)
        again = runner.run(dataclasses.replace(cfg, n_threads=2))  # threads never change the cache
        other = runner.run(dataclasses.replace(cfg, n_depth=300))  # another depth: filled anew
        tmp = runner._tmp.name
        states = [f for f in os.listdir(tmp) if ".state" in f]
    assert first.ok and again.ok and other.ok, (first.cause, again.cause, other.cause)
    assert first.depth_fill_ms and first.depth_fill_ms > 0 and first.depth_restore_ms is not None
    assert again.model_loaded  # another worker...
    assert again.depth_fill_ms is None and again.depth_restore_ms is not None  # ...and nothing filled: restored
    assert other.depth_fill_ms and other.depth_fill_ms > 0
    assert len(first.pp_samples) == 3 and len(first.tg_samples) == 3
    assert 1 <= len(states) <= 4
    assert not os.path.exists(tmp)  # the runner's folder, state files included, is gone with it

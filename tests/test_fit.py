"""tuner.plan.fit: the port of llama.cpp's --fit (common/fit.cpp), checked without the llama.cpp binaries.

(a) fixtures recorded from llama-fit-params runs (benchmarks/fit_equivalence.py --fixtures: flags as printed, device
sizes, margins, the model's make): the port, on the planner's figures, prints the same flags for the same model,
devices and margins; (b) the fit's rules: nothing changes when the model fits, experts leave before dense weights,
n_ctx is lowered only when unset and never below --fit-ctx, parameters the user set are never changed, and what
llama.cpp does when nothing fits.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from tuner.model.meta import EXPS_RE, read_model
from tuner.plan import fit as F
from tuner.plan import placement

MiB = 1 << 20
GiB = 1 << 30
FIXTURE = Path(__file__).parent / "data" / "fit_equivalence.json"


@pytest.fixture(scope="module")
def moe(models):
    return read_model(models / "moe-q8_0.gguf")


@pytest.fixture(scope="module")
def tiny(models):
    return read_model(models / "tiny-q8_0.gguf")


def devices(*mib: int, ram: int = 0) -> list[F.DeviceMemory]:
    """Devices of these sizes; with `ram`, RPC-style devices that all report `ram` (sizes then come from margins)."""
    return [
        F.DeviceMemory(free=ram or m * MiB, total=ram or m * MiB, name=f"RPC0[127.0.0.1:{50052 + i}]")
        for i, m in enumerate(mib)
    ]


def weights_by_device(res: F.FitResult, info, devs) -> tuple[list[int], list[str]]:
    """Where the fitted config puts each tensor (the planner's placement), and the names of those on the host."""
    cfg = res.trial_config(F.server_config(info.path))
    where, _ = placement.tensor_devices(cfg, info, True, [d.free for d in devs], tuple(d.name for d in devs))
    return where, [t.name for t, d in zip(info.tensors, where) if d < 0]


# -- (b) the rules ---------------------------------------------------------------------------------------------


def test_nothing_changes_when_the_model_fits(moe):
    devs = devices(4096, 4096)
    res = F.fit(moe, devs, F.server_config(moe.path))
    assert res.ok and res.n_measured == 1
    assert (res.n_gpu_layers, res.tensor_split, res.overrides) == (-1, [], [])
    assert res.n_ctx == moe.n_ctx_train  # an unset context is resolved to the trained one, not lowered
    assert res.to_flags() == f"-c {moe.n_ctx_train} -ngl -1"
    res = F.fit(moe, devs, F.server_config(moe.path, n_ctx=8192))
    assert res.to_flags() == "-c 8192 -ngl -1"


def test_context_is_lowered_only_when_unset_and_not_below_the_minimum(moe):
    devs = devices(300)
    res = F.fit(moe, devs, F.server_config(moe.path), margins=0)
    assert res.ok and 4096 <= res.n_ctx < moe.n_ctx_train and res.n_ctx % 256 == 0
    assert res.n_gpu_layers == -1  # one device: the smaller context is enough (fit.cpp 436-439)
    used = sum(u.total for u in res.projected[:-1])
    assert used <= 300 * MiB
    # a context the user set is kept, the weights move instead
    res = F.fit(moe, devs, F.server_config(moe.path, n_ctx=65536), margins=0)
    assert res.n_ctx == 65536 and res.n_gpu_layers >= 0
    # never below --fit-ctx: with a minimum of 32768 the context stops there and layers move
    small = devices(60)
    res = F.fit(moe, small, F.server_config(moe.path), margins=0, n_ctx_min=32768)
    assert res.n_ctx == 32768 and res.n_gpu_layers >= 0
    # n_ctx_min = UINT32_MAX: "the user asked for the full context"
    res = F.fit(moe, small, F.server_config(moe.path), margins=0, n_ctx_min=F.UINT32_MAX)
    assert res.n_ctx == moe.n_ctx_train
    assert any("user has requested full context size" in ln for ln in res.trace)


def test_experts_move_to_host_before_dense_weights(moe):
    devs = devices(60, 60)
    res = F.fit(moe, devs, F.server_config(moe.path, n_ctx=4096), margins=0)
    assert res.ok and res.n_gpu_layers == moe.n_layer + 1  # every layer offloaded
    where, host = weights_by_device(res, moe, devs)
    attn_on_host = [n for n in host if ".attn_" in n]
    assert not attn_on_host  # attention (dense) weights all on the devices
    assert any(EXPS_RE.search(n) for n in host)  # some experts in host memory
    # per device within its size
    assert all(u.total <= 60 * MiB for u in res.projected[:-1])
    # overrides are llama.cpp's patterns: whole layers' experts, or part of one layer's FFN spilling over
    for pattern, buf in res.overrides:
        assert pattern.startswith("blk\\.") and buf in ("CPU", devs[1].name)


def test_dense_model_moves_whole_layers(tiny):
    devs = devices(1)
    per_layer = [d for d in placement.layer_devices(F.server_config(tiny.path, n_ctx=4096, n_gpu_layers=3), tiny, True)]
    assert per_layer == [0, 0, 0]
    full = F.fit(tiny, devs, F.server_config(tiny.path, n_ctx=512), margins=0)
    assert full.ok and not full.overrides  # dense: no overrides, only n_gpu_layers
    assert 0 <= full.n_gpu_layers <= tiny.n_layer + 1


def test_user_set_parameters_are_not_changed(moe):
    devs = devices(10, 10)  # too small even with every expert in host memory
    for kw, why in (
        (dict(n_gpu_layers=99), "n_gpu_layers already set by user to 99"),
        (dict(tensor_split="1,1"), "tensor_split already set by user"),
        (dict(overrides=(r"exps=CPU",)), "tensor_buft_overrides already set by user"),
        (dict(n_cpu_moe=2), "tensor_buft_overrides already set by user"),
        (dict(split_mode="row"), "LLAMA_SPLIT_MODE_ROW not implemented"),
    ):
        cfg = F.server_config(moe.path, n_ctx=4096, **kw)
        res = F.fit(moe, devs, cfg, margins=0)
        assert res.status == F.FAILURE and why in res.message, (kw, res.message)
        assert res.n_ctx == 4096 and res.n_gpu_layers == cfg.n_gpu_layers and not res.overrides
    # the context was lowered before the fit gave up: llama-server goes on with it (fit.cpp 373-461, then 463)
    res = F.fit(moe, devs, F.server_config(moe.path, n_gpu_layers=99), margins=0)
    assert res.status == F.FAILURE and res.n_ctx < moe.n_ctx_train and res.n_gpu_layers == 99
    # a model that fits as the user set it: nothing to refuse
    res = F.fit(moe, devices(4096, 4096), F.server_config(moe.path, n_gpu_layers=99, tensor_split="1,1"))
    assert res.ok and res.to_flags() == f"-c {moe.n_ctx_train} -ngl 99"


def test_statuses_for_split_mode_tensor_a_broken_breakdown_and_bad_input(moe):
    # split mode tensor is refused before anything is measured, even for a model that fits (fit.cpp 183-185)
    res = F.fit(moe, devices(4096, 4096), F.server_config(moe.path, split_mode="tensor"))
    assert res.status == F.FAILURE and "SPLIT_MODE_TENSOR" in res.message and res.n_measured == 0

    def broken(cfg):
        raise F.FitError("no_alloc load failed")

    res = F.fit(moe, devices(60), F.server_config(moe.path), breakdown=broken)
    assert res.status == F.ERROR and "no_alloc load failed" in res.message
    with pytest.raises(F.FitError, match="margin"):
        F.fit(moe, devices(60, 60), F.server_config(moe.path), margins=[0])
    with pytest.raises(F.FitError, match="16 devices"):
        F.fit(moe, devices(*[60] * 17), F.server_config(moe.path))


def test_nothing_fits_gives_no_layers_not_a_failure(moe):
    """llama.cpp gives up on a device that cannot hold even its share of zero layers by offloading nothing
    (fit.cpp 663-729: every device keeps its lower bound, 0 layers) and reports success: -ngl 0."""
    res = F.fit(moe, devices(1, 1), F.server_config(moe.path, n_ctx=4096), margins=0)
    assert res.ok and res.n_gpu_layers == 0 and res.to_flags() == "-c 4096 -ngl 0"


def test_host_only_fails_when_reducing_the_context_is_not_enough(moe):
    host = F.DeviceMemory(free=64 * MiB, total=64 * MiB, name="CPU")
    res = F.fit(moe, [], F.server_config(moe.path), margins=0, host=host)
    assert res.status == F.FAILURE and "unable to fit model into system memory" in res.message
    res = F.fit(moe, [], F.server_config(moe.path), margins=0, host=F.DeviceMemory(64 * GiB, 64 * GiB, "CPU"))
    assert res.ok and res.n_ctx == moe.n_ctx_train


def test_flags_and_trial_config_round_trip(moe):
    devs = devices(40, 40)
    res = F.fit(moe, devs, F.server_config(moe.path, n_ctx=4096), margins=0)
    parsed = F.parse_flags(res.to_flags())
    assert parsed["n_ctx"] == 4096 and parsed["n_gpu_layers"] == res.n_gpu_layers
    assert parsed["overrides"] == res.overrides and parsed["tensor_split"] == res.tensor_split
    cfg = res.trial_config(F.server_config(moe.path))
    assert cfg.tensor_split == ",".join(str(int(s)) for s in res.tensor_split)
    assert cfg.overrides == tuple(f"{p}={b}" for p, b in res.overrides)
    args = res.server_args()
    assert args[args.index("-ot") + 1] == ",".join(f"{p}={b}" for p, b in res.overrides)
    # the planner reads the fitted config back to the same figures the fit projected
    again = F.device_usage(
        dataclasses.replace(cfg, n_ctx=4096), moe, [d.free for d in devs], tuple(d.name for d in devs), no_alloc=True
    )
    assert again == res.projected


def test_flags_drop_trailing_zero_shares():
    r = F.FitResult(status=F.SUCCESS, n_ctx=4096, n_gpu_layers=5, tensor_split=[5.0, 0.0])
    assert r.to_flags() == "-c 4096 -ngl 5"
    r.tensor_split = [0.0, 5.0]
    assert r.to_flags() == "-c 4096 -ngl 5 -ts 0,5"


def test_search_on_a_made_up_breakdown():
    """The search alone, on a made-up breakdown: 8 layers, each 10 MiB of dense weights + 30 MiB of experts, the
    output layer 5 MiB, 8 MiB of compute on a device holding layers; one device of 100 MiB. Traced by hand through
    fit.cpp: dense-only fill 9 layers -> 123 MiB (high), guess 7 -> 103 (high), 6 -> 93 (fits); conversion: all 6
    full -> 213 (high), guess 1 -> (6, 4) = 123 (high), stop at (6, 5); one more layer: UP keeps the up experts
    (123, no), ATTN moves the whole FFN of blk.4 (93, yes)."""
    info = dataclasses.make_dataclass("I", ["path", "n_layer", "n_ctx_train", "n_expert"])("m", 8, 4096, 4)

    def bd(cfg):
        ngl = cfg.n_gpu_layers if cfg.n_gpu_layers >= 0 else info.n_layer + 1
        layers = range(info.n_layer + 1 - ngl, info.n_layer + 1)
        patterns = [re.compile(o.rsplit("=", 1)[0]) for o in cfg.overrides]
        used = 8 * MiB if layers else 0
        for il in layers:
            used += 5 * MiB if il == info.n_layer else 10 * MiB
            if il < info.n_layer and not any(p.search(f"blk.{il}.ffn_up_exps") for p in patterns):
                used += 30 * MiB
        return [F.Usage(used, 0, 0), F.Usage()]

    res = F.fit(info, devices(100), F.server_config("m", n_ctx=4096), margins=0, breakdown=bd)
    exps = "ffn_(up|down|gate_up|gate)_(ch|)exps=CPU"
    assert res.to_flags() == (
        '-c 4096 -ngl 6 -ot "blk\\.4\\.ffn_(gate|up|gate_up|down).*=CPU,'
        + ",".join(f"blk\\.{il}\\.{exps}" for il in (5, 6, 7, 8))
        + '"'
    )
    assert res.n_measured == 10 and [x.n_part for x in res.layers] == [5]
    assert res.projected[0].total == 93 * MiB


# -- (a) recorded llama-fit-params runs ------------------------------------------------------------------------


def _fixture_cases():
    if not FIXTURE.exists():
        return []
    data = json.loads(FIXTURE.read_text())
    return [
        pytest.param(data, c, id=f"{c['shape']}-{c['n_dev']}x{c['device_mib'][0]}MiB-c{c['n_ctx']}")
        for c in data["cases"]
    ]


@pytest.fixture(scope="module")
def shape_files(models, tmp_path_factory):
    """The recorded models: synthetic files (the `models` cache) and sparse oracle shapes (written once)."""
    from tuner.model.synth import synthesize
    from tuner.plan import oracle

    tmp = tmp_path_factory.mktemp("fit-shapes")
    made: dict = {}

    def get(shape: str):
        if shape not in made:
            if shape == "moe":
                path = models / "moe-q8_0.gguf"
            elif shape == "dense":
                path = synthesize(models, "dense", ("q4_0",))[0]
            else:
                path = oracle.model_file(shape, tmp)
            made[shape] = read_model(path)
        return made[shape]

    return get


@pytest.mark.parametrize(("data", "case"), _fixture_cases())
def test_port_prints_what_llama_fit_params_printed(data, case, shape_files):
    """The port on the planner's figures, for the model, devices (RPC servers reporting the host's RAM), margins and
    context of a recorded llama-fit-params run, prints the flags llama-fit-params printed; where the recording says
    the planner's figures led elsewhere, the port still prints what it printed then (re-record with
    `benchmarks/fit_equivalence.py --fixtures` after changing the planner)."""
    info = shape_files(case["shape"])
    made = data["models"][case["shape"]]
    assert (info.arch, info.file_type) == (made["arch"], made["file_type"])
    devs = F.rpc_devices(data["endpoints"][: case["n_dev"]], data["host_ram"])
    res = F.fit(info, devs, F.server_config(info.path, n_ctx=case["n_ctx"]), [m * MiB for m in case["margins_mib"]])
    got = res.to_flags() if res.ok else None
    if case["planner_equal"]:
        assert got == case["llama"]
    else:  # recorded: the planner's compute figures differ enough from llama.cpp's to change the answer
        assert got == case["planner"] != case["llama"]


def _stand_in_cases():
    """The recorded cases where the planner's model alone led the port elsewhere than llama-fit-params: where a
    described rig's fit must come from llama.cpp's own figures (the stand-in devices) to be right."""
    if not FIXTURE.exists():
        return []
    data = json.loads(FIXTURE.read_text())
    return [
        pytest.param(c, id=f"{c['shape']}-{c['n_dev']}x{c['device_mib'][0]}MiB-c{c['n_ctx']}")
        for c in data["cases"]
        if not c["planner_equal"] and "stand_in_llama" in c
    ]


@pytest.mark.parametrize("case", _stand_in_cases())
def test_a_described_rigs_fit_is_what_llama_fit_params_printed_for_it(case, shape_files):
    """The port on llama.cpp's figures from sizing-only servers standing in for GPUs of (size + 1024) MiB at the
    default margin (what `tuner search --gpus ... --dry-run` plans with) prints what llama-fit-params printed for
    those servers, where the planner's model alone did not."""
    from tuner.plan.llama_sizes import LlamaSizes

    info = shape_files(case["shape"])
    totals = [(d + 1024) * MiB for d in case["device_mib"]]
    names = [f"CUDA{i}" for i in range(len(totals))]
    devices = [F.DeviceMemory(free=t, total=t, name=n) for t, n in zip(totals, names)]
    with LlamaSizes.stand_in(totals, names) as sizes:
        res = F.fit(
            info,
            devices,
            F.server_config(info.path, n_ctx=case["n_ctx"]),
            1024 * MiB,
            breakdown=F.planner_breakdown(info, devices, sizes),
        )
    assert (res.to_flags() if res.ok else None) == case["stand_in_llama"]


def test_a_described_rigs_dry_run_fits_on_stand_ins_and_leaves_no_server(models):
    import psutil
    from click.testing import CliRunner

    from tuner.cli import cli

    m = str(models / "moe-q8_0.gguf")
    info = read_model(m)

    def alone(c):  # the port on the planner's model alone, on the described GPUs
        devs = [F.DeviceMemory((d + 1024) * MiB, (d + 1024) * MiB, f"CUDA{i}") for i, d in enumerate(c["device_mib"])]
        return F.fit(info, devs, F.server_config(m, n_ctx=4096, flash_attn="auto", n_batch=2048), 1024 * MiB)

    case = next(
        (
            c
            for c in (p.values[0] for p in _stand_in_cases())
            if c["shape"] == "moe" and c["n_ctx"] == 4096 and alone(c).to_flags() != c["stand_in_llama"]
        ),
        None,
    )
    # a case the model alone gets wrong: the dry run's answer can only be llama-fit-params' through the stand-ins
    assert case is not None, "the fixture records no moe case at -c 4096 that the model alone gets wrong"
    gpus = ",".join(f"{d + 1024}MiB" for d in case["device_mib"])
    res = CliRunner().invoke(
        cli, ["search", "-m", m, "--dry-run", "--json", "--gpus", gpus, "-c", "4096", "-p", "16", "-n", "4"]
    )
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    (fitted,) = [b for b in plan["baselines"] if b["label"] == "llama-server default (--fit)"]
    assert fitted["fit_flags"] == case["stand_in_llama"]
    assert any("sizing-only RPC servers standing in for the described GPUs" in n for n in plan["notes"])
    left = [p for p in psutil.Process().children(recursive=True) if "rpc-server" in " ".join(p.cmdline())]
    assert not left


def test_dry_run_lists_every_baseline_with_fits_placement_from_the_planner(models):
    from click.testing import CliRunner

    from tuner.cli import cli

    m = str(models / "moe-q8_0.gguf")
    res = CliRunner().invoke(
        cli,
        ["search", "-m", m, "--dry-run", "--json", "--gpus", "120MiB,120MiB", "-c", "4096", "-p", "16", "-n", "4"],
    )
    assert res.exit_code == 0, res.output
    rows = {b["label"]: b for b in json.loads(res.output)["baselines"]}
    assert set(rows) >= {"llama.cpp defaults", "llama-server default (--fit)"}
    fitted = rows["llama-server default (--fit)"]
    # the same placement as the port called directly on the described GPUs (CUDA0, CUDA1), at the working context
    devices = [F.DeviceMemory(120 << 20, 120 << 20, f"CUDA{i}") for i in range(2)]
    direct = F.fit(read_model(m), devices, F.server_config(m, n_ctx=4096, flash_attn="auto", n_batch=2048))
    assert fitted["fit_status"] == direct.status and fitted["fit_flags"] == direct.to_flags()
    for b in rows.values():  # every baseline is something llama-server runs: its flags, llama-server's spelling
        assert b["server_flags"].startswith("-ngl ") and " -c 4096 " in b["server_flags"]


def test_a_model_named_by_a_relative_path_gets_its_baselines(models, tmp_path, monkeypatch):
    # the fit's and the recipe's configs name the model as the search does (its table's key), not as read_model
    # resolves it: a relative -m used to end the dry run with a KeyError in the recipe's verdict
    from click.testing import CliRunner

    from tuner.cli import cli

    (tmp_path / "moe.gguf").symlink_to(models / "moe-q8_0.gguf")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(
        cli,
        ["search", "-m", "moe.gguf", "--dry-run", "--json", "--gpus", "24GiB", "-c", "4096", "-p", "16", "-n", "4"],
    )
    assert res.exit_code == 0, res.output
    rows = {b["label"]: b for b in json.loads(res.output)["baselines"]}
    assert {"llama-server default (--fit)", "community recipe (-ngl 99, the fewest --n-cpu-moe that fits)"} <= set(rows)
    assert {b["config"]["model"] for b in rows.values()} == {"moe.gguf"}

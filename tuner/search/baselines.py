"""The configs a search starts with (`starting`): llama.cpp's defaults and the seed script's GPU-layer heuristic,
snapped to the space; on a rig with devices, llama-server's own placement (--fit, on by default: the user's real
alternative) and the community MoE recipe, measured as they are. Each is enqueued as a trial of its own, labelled in
`baseline`; the confirmation races the winner against --fit's placement where there is one."""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass

from tuner.measure import hardware
from tuner.measure.runner import resolve
from tuner.model.meta import EXPS_RE, ModelInfo
from tuner.plan import placement
from tuner.plan.fit import DeviceMemory, FitError, FitResult, fit, planner_breakdown, server_config
from tuner.record import MOE_PART_SHARE, TrialConfig
from tuner.search.confirm import ROLE_BASELINE, ROLE_FIT, ROLE_RECIPE
from tuner.search.feasible import Rig
from tuner.search.recommend import forms
from tuner.search.space import Space

HEURISTIC_MB_PER_LAYER = 3500  # the seed script's guess
HEURISTIC_RESERVE_MB = 2048
DEFAULT_FIT_TARGET = 1024  # MiB: llama-server's --fit-target (common/common.h fit_params_target)


def nearest(space: Space, name: str, want):
    """The space's value of `name` nearest to `want` (the first value for a choice it does not have)."""
    vals = space.dims[name].values if name in space.dims else [want]
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        return min(vals, key=lambda v: (abs(v - want), v))
    return want if want in vals else vals[0]


PLACEMENT = ("n_gpu_layers", "n_cpu_moe", "moe_part")  # measured as the baseline has them, even outside the space


def baseline_params(space: Space, infos: dict[str, ModelInfo], hw, min_ctx: int) -> list[tuple[dict, str, dict]]:
    """The baselines' sampler params with their labels, each value the space's nearest to the baseline's, and
    the placement values the space could not hold (e.g. no expert in host RAM where the hybrid region starts at
    a few layers' worth: llama.cpp's defaults are measured as they are); a baseline the space makes equal to an
    earlier one is left out."""
    n_layer = max(i.n_layer for i in infos.values())
    all_layers = n_layer + 1
    phys = hw.cores_physical
    defaults = {
        "n_gpu_layers": all_layers,
        "n_ctx": max(4096, min_ctx),
        "n_threads": phys,
        "n_threads_batch": phys,
        "n_batch": 2048,
        "n_ubatch": 512,
        "flash_attn": "auto",
        "type_k": "f16",
        "type_v": "f16",
        "use_mmap": True,
        "n_cpu_moe": 0,
        "moe_part": "none",
    }
    vram = sum(g.vram_total for g in hardware.offload_gpus(hw))
    heuristic_ngl = max(0, min(all_layers, int((vram / 2**20 - HEURISTIC_RESERVE_MB) // HEURISTIC_MB_PER_LAYER)))
    out: list[tuple[dict, str, dict]] = []
    for label, overrides in ((ROLE_BASELINE, {}), ("heuristic", {"n_gpu_layers": heuristic_ngl})):
        params, off = {}, {}
        for name, d in space.varying().items():
            want = overrides.get(name, defaults.get(name, d.values[0]))
            params[name] = nearest(space, name, want)
            if name in PLACEMENT and params[name] != want:
                off[name] = want
        if len(space.models) > 1:
            params["model"] = space.models[0]
        if any(params == p and off == o for p, _, o in out):
            continue
        out.append((params, label, off))
    return out


def working_context(space: Space) -> int:
    """The context every trial allocates: the space's (the largest rung of a ladder), else the base's."""
    return max(space.dims["n_ctx"].values) if "n_ctx" in space.dims else space.base.effective_ctx()


def serving(space: Space) -> dict:
    """The sequences every trial serves together (--parallel's count and KV layout: the space's value, the first
    of a list as the defaults baseline takes): the fit and recipe baselines serve the same, or they would be
    one request raced against N."""
    return {k: space.dims[k].values[0] if k in space.dims else getattr(space.base, k) for k in ("n_seq", "kv_unified")}


def fit_device_names(rig: Rig) -> list[str]:
    """Each GPU of the rig by the buffer name llama.cpp gives it (RPC0[host:port], CUDA0, ...)."""
    return [rig.devices[i] if i < len(rig.devices) else f"CUDA{i}" for i in range(rig.n_gpus)]


def fit_margins(text: str | int | None) -> list[int]:
    """--fit-target as llama-server reads it: MiB, one value for every device or one per device → bytes."""
    try:
        vals = [int(x) for x in str(text if text is not None else DEFAULT_FIT_TARGET).split(",")]
    except ValueError:
        raise FitError(f"--fit-target {text!r}: whole MiB expected, e.g. 1024 or 512,2048") from None
    if any(v < 0 for v in vals):
        raise FitError(f"--fit-target {text!r}: a margin cannot be negative")
    return [v * 2**20 for v in vals]


def fit_placement(
    space: Space, info: ModelInfo, rig: Rig, fit_target: str | int | None = None
) -> tuple[TrialConfig, FitResult] | None:
    """What llama-server started with `-m MODEL -c CTX` places (its --fit, on by default: tuner.plan.fit) on this
    rig's devices, from the planner (with llama.cpp's own compute buffers where the devices can be asked:
    `rig.sizes`): the working context is set (the fit leaves a set context alone), everything else at
    llama-server's defaults, the margin `fit_target` (--fit-target: MiB, default 1024) on every device. None
    without a device to fit to."""
    if not rig.gpu_offload or not rig.n_gpus or not all(t > 0 for t in rig.gpu_totals):
        return None
    names = fit_device_names(rig)
    devices = [DeviceMemory(free=f or t, total=t, name=n) for f, t, n in zip(rig.gpu_free, rig.gpu_totals, names)]
    base = dataclasses.replace(space.base, **serving(space))
    model = space.models[0]  # as the space (and the search's model table) names it, not info.path (resolved)
    cfg = server_config(
        model,
        n_ctx=working_context(space),
        n_batch=base.n_batch,
        n_ubatch=base.n_ubatch,
        flash_attn=base.flash_attn,
        type_k=base.type_k,
        type_v=base.type_v,
        use_mmap=base.use_mmap,
        # llama-server -np N fits with every slot's KV cache counted, as the measured config serves them
        n_seq=base.n_seq,
        kv_unified=base.kv_unified,
        rpc=base.rpc,  # llama-server --rpc: the devices fit places on (and asks llama.cpp to size, rig.sizes)
    )
    margins = fit_margins(fit_target)
    if len(margins) not in (1, len(devices)):
        raise FitError(f"--fit-target: {len(margins)} margins for {len(devices)} devices (give one, or one each)")
    # the compute buffers as llama.cpp sizes them where it can be asked (rig.sizes), as llama-server's fit does
    bd = planner_breakdown(info, devices, rig.sizes)
    res = fit(info, devices, cfg, margins if len(margins) > 1 else margins[0], breakdown=bd)
    return res.trial_config(dataclasses.replace(base, model=model)), res


def recipe_config(space: Space, info: ModelInfo, rig: Rig, hw, fits) -> TrialConfig | None:
    """The MoE recipe the community runs on one consumer GPU (DeepSeek-V3, Qwen3-235B): every layer on the GPUs,
    routed experts of the first N layers in host RAM with N the fewest that fits (`fits(cfg)`: the planner's
    verdict), threads = physical cores. None for a dense model, or without a device whose budget is known."""
    if not info.is_moe or not rig.vram_known:  # without each device's budget, "fits" says nothing
        return None
    base = dataclasses.replace(
        space.base,
        **serving(space),
        model=space.models[0],  # the space's name for it (infos' key), as fit_placement
        n_ctx=working_context(space),
        n_gpu_layers=info.n_layer + 1,
        tensor_split="",
        overrides=(),
        cpu_moe=False,
        n_threads=hw.cores_physical,
        n_threads_batch=hw.cores_physical,
    )
    for n in range(info.n_layer + 1):
        cfg = dataclasses.replace(base, n_cpu_moe=n)
        if fits(cfg):
            return cfg
    return None


@dataclass
class Baseline:
    """One config a search starts from: its label, the sampler's params (the space's nearest point: what the
    sampler learns its result as) and, where it is no point of the space (fit's `-ot` placement, the recipe's
    threads), the exact config that is measured."""

    label: str
    params: dict
    config: TrialConfig | None = None
    fit: FitResult | None = None


def experts_in_host(cfg: TrialConfig, info: ModelInfo, rig: Rig) -> float:
    """Layers' worth of routed experts the config leaves in host memory, by the planner's tensor placement (a
    partial layer counts by its share of expert tensors): how any placement maps onto n_cpu_moe + moe_part."""
    where, _ = placement.tensor_devices(cfg, info, rig.gpu_offload, rig.gpu_free or None, tuple(fit_device_names(rig)))
    per_layer: dict[int, list[bool]] = {}
    for t, d in zip(info.tensors, where):
        if t.layer is not None and EXPS_RE.search(t.name):
            per_layer.setdefault(t.layer, []).append(d < 0)
    return sum(sum(v) / len(v) for v in per_layer.values())


def space_point(space: Space, cfg: TrialConfig, info: ModelInfo, rig: Rig) -> dict:
    """The space's nearest point to a config: every dimension its value, the hybrid region by how many layers'
    experts it leaves in host memory (fit's experts of the last layers are the first layers' for --n-cpu-moe)."""
    host = experts_in_host(cfg, info, rig) if info.is_moe else 0.0
    whole = int(host + 1e-9)
    part = min(MOE_PART_SHARE, key=lambda p: abs(MOE_PART_SHARE[p] - (host - whole)))
    params = {}
    for name in space.varying():
        want = {"n_cpu_moe": whole, "moe_part": part}.get(name, getattr(cfg, name, None))
        params[name] = nearest(space, name, want)
    if len(space.models) > 1:
        params["model"] = cfg.model
    return params


def starting(
    space: Space, infos: dict[str, ModelInfo], rig: Rig, hw, min_ctx: int, fits, fit_target: str | int | None = None
) -> list[Baseline]:
    """Every baseline a search starts from, in the order they run: llama.cpp's defaults and the seed heuristic
    snapped to the space, llama-server's own placement (--fit, from the planner: tuner.plan.fit) and the community
    MoE recipe measured as they are (each a trial of its own, labelled in `baseline`). `fits(cfg)`: the planner's
    verdict, for the recipe's fewest --n-cpu-moe."""
    info = infos[space.models[0]]
    out = []
    for params, label, off in baseline_params(space, infos, hw, min_ctx):
        exact = None
        if off:  # outside the space: measured as it is, learned by the sampler as its nearest point
            p = {k: v for k, v in params.items() if k in space.dims}
            exact = space.config(params.get("model", space.models[0]), {**p, **off})
        out.append(Baseline(label, params, exact))
    placed = fit_placement(space, info, rig, fit_target)
    if placed:
        cfg, res = placed
        out.append(Baseline(ROLE_FIT, space_point(space, cfg, info, rig), cfg, res))
    recipe = recipe_config(space, info, rig, hw, fits)
    if recipe is not None:
        out.append(Baseline(ROLE_RECIPE, space_point(space, recipe, info, rig), recipe))
    return out


def config_of(space: Space, b: Baseline) -> TrialConfig:
    """The config a baseline measures: its own, else the space's at its params."""
    if b.config is not None:
        return b.config
    p = dict(b.params)
    model = p.pop("model", space.models[0])
    return space.config(model, {k: v for k, v in p.items() if k in space.dims})


def listed(
    space: Space, infos: dict[str, ModelInfo], rig: Rig, hw, min_ctx: int, fits, fit_target: str | int | None = None
) -> list[dict]:
    """Every baseline a search on this rig starts from (`starting`), as a config and llama-server flags
    (`--dry-run --json`), computed from the planner alone (for described GPUs too)."""
    rows = []
    for b in starting(space, infos, rig, hw, min_ctx, fits, fit_target):
        cfg = resolve(config_of(space, b), infos[b.params.get("model", space.models[0])])
        argv = forms(cfg)["llama_server_argv"]
        row = {"label": b.label, "config": cfg.to_dict(), "server_flags": shlex.join(argv[3:])}
        if b.config is not None:
            row["space_point"] = b.params  # what the sampler learns this measurement as
        if b.fit is not None:  # fit's own status and its flags exactly as llama-fit-params prints them
            row.update(fit_status=b.fit.status, fit_flags=b.fit.to_flags() if b.fit.ok else None)
        rows.append(row)
    return rows

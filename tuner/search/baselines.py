"""The configs a search starts with: llama.cpp's defaults and the seed script's GPU-layer heuristic, snapped to the
space (each is enqueued as a trial of its own, labelled in `baseline`)."""

from __future__ import annotations

import dataclasses
import shlex

from tuner.measure.runner import resolve
from tuner.model.meta import ModelInfo
from tuner.plan.fit import DeviceMemory, FitResult, fit, server_config
from tuner.record import TrialConfig
from tuner.search.feasible import Rig
from tuner.search.recommend import forms
from tuner.search.space import Space

HEURISTIC_MB_PER_LAYER = 3500  # the seed script's guess
HEURISTIC_RESERVE_MB = 2048


def baseline_params(space: Space, infos: dict[str, ModelInfo], hw, min_ctx: int) -> list[tuple[dict, str]]:
    """The baselines' sampler params with their labels, each value the space's nearest to the baseline's; a
    baseline the space makes equal to an earlier one is left out."""
    dims = space.dims
    n_layer = max(i.n_layer for i in infos.values())
    all_layers = n_layer + 1
    phys = hw.cores_physical

    def nearest(name, want):
        vals = dims[name].values if name in dims else [want]
        return (
            min(vals, key=lambda v: (abs(v - want), v))
            if isinstance(want, (int, float)) and not isinstance(want, bool)
            else (want if want in vals else vals[0])
        )

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
    }
    vram = sum(g.vram_total for g in hw.gpus)
    heuristic_ngl = max(0, min(all_layers, int((vram / 2**20 - HEURISTIC_RESERVE_MB) // HEURISTIC_MB_PER_LAYER)))
    out: list[tuple[dict, str]] = []
    for label, overrides in (("llama.cpp defaults", {}), ("heuristic", {"n_gpu_layers": heuristic_ngl})):
        params = {}
        for name, d in space.varying().items():
            params[name] = nearest(name, overrides.get(name, defaults.get(name, d.values[0])))
        if len(space.models) > 1:
            params["model"] = space.models[0]
        if any(params == p for p, _ in out):
            continue
        out.append((params, label))
    return out


FIT_LABEL = "llama-server default (--fit)"
RECIPE_LABEL = "community recipe (-ngl 99, the fewest --n-cpu-moe that fits)"


def working_context(space: Space) -> int:
    """The context every trial allocates: the space's (the largest rung of a ladder), else the base's."""
    return max(space.dims["n_ctx"].values) if "n_ctx" in space.dims else space.base.effective_ctx()


def fit_device_names(rig: Rig) -> list[str]:
    """Each GPU of the rig by the buffer name llama.cpp gives it (RPC0[host:port], CUDA0, ...)."""
    return [rig.devices[i] if i < len(rig.devices) else f"CUDA{i}" for i in range(rig.n_gpus)]


def fit_placement(space: Space, info: ModelInfo, rig: Rig) -> tuple[TrialConfig, FitResult] | None:
    """What llama-server started with `-m MODEL -c CTX` places (its --fit, on by default: tuner.plan.fit) on this
    rig's devices, from the planner alone: the working context is set (the fit leaves a set context alone),
    everything else at llama-server's defaults, its default margin (--fit-target 1024 MiB) on every device.
    None without a device to fit to."""
    if not rig.gpu_offload or not rig.n_gpus or not all(t > 0 for t in rig.gpu_totals):
        return None
    names = fit_device_names(rig)
    devices = [DeviceMemory(free=f or t, total=t, name=n) for f, t, n in zip(rig.gpu_free, rig.gpu_totals, names)]
    base = space.base
    cfg = server_config(
        info.path,
        n_ctx=working_context(space),
        n_batch=base.n_batch,
        n_ubatch=base.n_ubatch,
        flash_attn=base.flash_attn,
        type_k=base.type_k,
        type_v=base.type_v,
        use_mmap=base.use_mmap,
    )
    res = fit(info, devices, cfg)
    return res.trial_config(dataclasses.replace(base, model=info.path)), res


def recipe_config(space: Space, info: ModelInfo, rig: Rig, hw, fits) -> TrialConfig | None:
    """The MoE recipe the community runs on one consumer GPU (DeepSeek-V3, Qwen3-235B): every layer on the GPUs,
    routed experts of the first N layers in host RAM with N the fewest that fits (`fits(cfg)`: the planner's
    verdict), threads = physical cores. None for a dense model, or without a device whose budget is known."""
    if not info.is_moe or not rig.vram_known:  # without each device's budget, "fits" says nothing
        return None
    base = dataclasses.replace(
        space.base,
        model=info.path,
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


def listed(space: Space, infos: dict[str, ModelInfo], rig: Rig, hw, min_ctx: int, fits) -> list[dict]:
    """Every baseline a search on this rig starts from, as a config and llama-server flags (`--dry-run --json`):
    llama.cpp's defaults and the seed heuristic snapped to the space (enqueued as trials), llama-server's own
    placement (--fit) and the community MoE recipe, computed from the planner (for described GPUs too)."""
    info = infos[space.models[0]]
    out = []
    for params, label in baseline_params(space, infos, hw, min_ctx):
        p = dict(params)
        model = p.pop("model", space.models[0])
        out.append((label, space.config(model, {k: v for k, v in p.items() if k in space.dims}), None))
    placed = fit_placement(space, info, rig)
    if placed:
        cfg, res = placed
        out.append((FIT_LABEL, cfg, res))
    recipe = recipe_config(space, info, rig, hw, fits)
    if recipe is not None:
        out.append((RECIPE_LABEL, recipe, None))
    rows = []
    for label, cfg, res in out:
        cfg = resolve(cfg, infos[cfg.model])  # threads as they would run (0: physical cores, batch = generation)
        argv = forms(cfg)["llama_server_argv"]
        row = {"label": label, "config": cfg.to_dict(), "server_flags": shlex.join(argv[3:])}
        if res is not None:  # fit's own status and its flags exactly as llama-fit-params prints them
            row.update(fit_status=res.status, fit_flags=res.to_flags() if res.ok else None)
        rows.append(row)
    return rows

"""What of a search space can fit this rig: the planner's verdicts applied to the space, GPU by GPU.

The planner (tuner.plan.planner) predicts the memory of one config; the space (tuner.search.space) lists configs;
neither
imports the other. This module joins them: the memory a rig offers (`Rig`: host RAM and every GPU on its own,
probed or only described), the verdict on one config (`judge`), the GPU region of the default space (for a MoE
model bigger than VRAM: all layers on the GPU, the experts of the first N layers in host RAM), the tensor split
over several GPUs, the contexts that cannot fit, and the dry-run plan of a whole space (`plan`).

Bounds are computed at the most lenient value of the other dimensions (smallest context and batches, narrowest
KV types, every flash-attention, split and placement value): a value leaves the space only when no config with
it can fit. Configs of the space that still cannot fit are skipped by the search, not run (tuner.search.loop).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from tuner.measure import hardware
from tuner.model.meta import ModelInfo
from tuner.plan import planner
from tuner.record import KV_TYPE_BYTES, MOE_PART_SHARE, MOE_PARTS, TrialConfig
from tuner.search.space import Dimension, Space, SpaceError, ranged
from tuner.units import headroom_bytes

MEMORY_BLIND = ("n_threads", "n_threads_batch")  # dimensions that change speed, never memory
LENIENT_MIN = ("n_ctx", "n_batch", "n_ubatch", "n_seq")  # smaller needs less memory
EVERY_VALUE = ("flash_attn", "tensor_split", "split_mode", "use_mmap", "kv_unified")  # memory goes either way: try each
# --gpus sizes of a described rig are totals; llama.cpp's default split uses free memory, taken as the total
SPLIT_STEPS = (-0.25, -0.125, 0.0, 0.125, 0.25)  # tensor_split ratios tried around the free-memory split


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class Rig:
    """The memory a search may use: host RAM, and each GPU's VRAM on its own (llama.cpp never pools them)."""

    ram_cap: float  # usable host RAM (total minus headroom, or --max-ram if lower)
    gpu_totals: list[int] = field(default_factory=list)
    vram_caps: list[float] = field(default_factory=list)  # usable VRAM per GPU
    gpu_free: list[int] = field(default_factory=list)  # what llama.cpp's default split divides by
    gpu_offload: bool = False
    described: bool = False  # from --gpus (a dry run), not NVML
    devices: list[str] = field(default_factory=list)  # each GPU's name as llama.cpp logs its buffers, if known
    baselines: list[int] | None = None  # each GPU's fixed cost besides buffers (None: the calibrated CUDA context)
    # each device's compute buffer as llama.cpp sizes it (tuner.plan.llama_sizes.LlamaSizes), where it can be asked
    sizes: Callable | None = field(default=None, repr=False, compare=False)

    @property
    def n_gpus(self) -> int:
        return len(self.gpu_totals)

    @property
    def free(self) -> list[int] | None:
        """The planner's `free` argument: None for one GPU (the whole offload goes there)."""
        return list(self.gpu_free) if self.n_gpus > 1 else None

    @property
    def vram_known(self) -> bool:
        return self.gpu_offload and bool(self.vram_caps) and all(c > 0 for c in self.vram_caps)

    def describe(self) -> dict:
        return {
            "ram_usable": int(self.ram_cap),
            "described": self.described,
            "gpu_offload": self.gpu_offload,
            "gpus": [
                {
                    "index": i,
                    "vram_total": t,
                    "vram_usable": int(c),
                    "vram_free": f,
                    **({"device": self.devices[i]} if i < len(self.devices) else {}),
                }
                for i, (t, c, f) in enumerate(zip(self.gpu_totals, self.vram_caps, self.gpu_free))
            ],
        }


def device_caps(totals: list[int], limits) -> list[float]:
    """Usable VRAM per GPU: its total minus the headroom; --max-vram caps all GPUs together, shared among them
    in proportion to their sizes."""
    caps = [float(t - headroom_bytes(limits.headroom, t)) for t in totals]
    if limits.max_vram and totals:
        whole = sum(totals)
        caps = [min(c, limits.max_vram * t / whole) for c, t in zip(caps, totals)]
    return caps


def caps(hw, limits) -> tuple[float, float | None]:
    """RAM and VRAM (all GPUs together) a config may use: the machine's total minus the headroom, or the
    user's limit if lower. Per-GPU budgets: `device_caps`."""
    ram = min(
        x for x in (limits.max_ram, hw.ram_total - headroom_bytes(limits.headroom, hw.ram_total)) if x is not None
    )
    totals = [g.vram_total for g in hardware.offload_gpus(hw) if g.vram_total]
    return ram, (sum(device_caps(totals, limits)) if totals else None)


def rig_from_hardware(hw, limits, gpu_offload: bool, remote: list[dict] | None = None) -> Rig:
    """The rig as probed: the RPC servers' devices (llama.cpp's own list, tuner.measure.hardware.llama_devices)
    first, as llama.cpp orders them ("RPC servers at the front of the list"), then this machine's GPUs in
    llama.cpp's order (tuner.measure.hardware.offload_gpus); free memory for llama.cpp's default split."""
    remote = remote or []
    gpus = hardware.offload_gpus(hw)
    totals = [d["total"] for d in remote] + [g.vram_total for g in gpus]
    free = [d["free"] for d in remote] + [g.vram_free or g.vram_total for g in gpus]
    return Rig(
        ram_cap=caps(hw, limits)[0],
        gpu_totals=totals,
        vram_caps=device_caps(totals, limits),
        gpu_free=free,
        gpu_offload=gpu_offload,
        # named as llama.cpp names their buffers: RPC0[host:port], CUDA0, ROCm0, Vulkan0...
        devices=[hardware.buffer_name(d) for d in remote] + [g.device for g in gpus],
        # an RPC device's memory holds llama.cpp's buffers only (no CUDA context on this side)
        baselines=[0] * len(remote) + [planner.DEFAULT_BASELINE_VRAM] * len(gpus) if remote else None,
    )


def described_rig(gpus: list[int], ram: int | None, hw, limits) -> Rig:
    """A rig to plan for (`--gpus 24GiB,24GiB [--ram 256GiB]`): a GPU build is assumed; RAM defaults to this
    machine's. The GPUs are taken as empty (free = total), as on a rig that runs nothing else."""
    if ram:
        hw = dataclasses.replace(hw, ram_total=ram)
    return Rig(
        ram_cap=caps(hw, limits)[0],
        gpu_totals=list(gpus),
        vram_caps=device_caps(gpus, limits),
        gpu_free=list(gpus),
        gpu_offload=True,
        described=True,
    )


def judge(pred: planner.Prediction, rig: Rig) -> tuple[bool, str]:
    """(fits, one-line reason): every GPU within its own budget, and the resident host memory within RAM (mmap'd
    weight pages are reclaimable: they do not count, see planner.weights_cached)."""
    if rig.gpu_offload and rig.vram_known and not planner.vram_fits(pred, rig.vram_caps):
        by_dev = pred.vram_by_device or [pred.vram_bytes]
        i = next(i for i, (v, cap) in enumerate(zip(by_dev, rig.vram_caps)) if v > cap)
        return False, f"needs {_gib(by_dev[i])} VRAM on GPU {i}, {_gib(rig.vram_caps[i])} usable"
    need = pred.ram_bytes - pred.reclaimable_bytes
    if need > rig.ram_cap:
        return False, f"needs {_gib(need)} host RAM, {_gib(rig.ram_cap)} usable (it would swap)"
    return True, "fits"


def predict(cfg: TrialConfig, info: ModelInfo, rig: Rig, calib=None) -> planner.Prediction:
    devices = dict(free=rig.free, device_baselines=rig.baselines, names=rig.devices, compute_of=rig.sizes)
    return planner.predict(cfg, info, calib, rig.gpu_offload, **devices)


def lenient_configs(space: Space, model: str, fixed: dict) -> list[TrialConfig]:
    """The configs of `model` that need the least memory for these fixed values: the smallest context and
    batches, the narrowest KV types, and every value of the dimensions whose effect on memory goes either way."""
    params: dict = {}
    for k in LENIENT_MIN:
        if k in space.dims:
            params[k] = min(space.dims[k].values)
    for k in ("type_k", "type_v"):
        if k in space.dims:
            params[k] = min(space.dims[k].values, key=lambda t: KV_TYPE_BYTES[t])
    if "moe_part" in space.dims:  # the most of the next layer's FFN in host memory
        params["moe_part"] = max(space.dims["moe_part"].values, key=MOE_PART_SHARE.get)
    either = [k for k in EVERY_VALUE if k in space.dims and len(space.dims[k].values) > 1 and k not in fixed]
    out = []
    for combo in itertools.product(*(space.dims[k].values for k in either)):
        out.append(space.config(model, {**params, **dict(zip(either, combo)), **fixed}))
    return out


def can_fit(space: Space, infos: dict[str, ModelInfo], rig: Rig, calib=None, **fixed) -> bool:
    """Whether any model's most lenient config with these fixed values fits."""
    return any(
        judge(predict(c, infos[m], rig, calib), rig)[0] for m in space.models for c in lenient_configs(space, m, fixed)
    )


def split_dimension(space: Space, rig: Rig) -> None:
    """Two or more GPUs: tensor_split (a share of the layers per GPU) becomes a dimension, a few ratios around
    the free-memory split that llama.cpp uses by default. With experts of the first layers in host RAM the first
    GPU's layers weigh less than the last's, so the best split is rarely the free-memory one."""
    if rig.n_gpus < 2 or not rig.gpu_offload or "tensor_split" in space.dims:
        return
    free = [max(f, 1) for f in rig.gpu_free]
    share = [f / sum(free) for f in free]
    values = []
    for step in SPLIT_STEPS:
        # move `step` of the layers onto the first GPU (from the others in proportion); the rest mirror it
        first = min(max(share[0] + step, 0.05), 0.95)
        rest = [s * (1 - first) / (1 - share[0]) for s in share[1:]] if share[0] < 1 else share[1:]
        pct = [round(100 * x) for x in [first] + rest]
        text = "/".join(str(p) for p in pct)
        if text not in values:
            values.append(text)
    space.dims["tensor_split"] = Dimension("tensor_split", values)
    space.auto["tensor_split"] = (
        f"{rig.n_gpus} GPUs: the share of the layers on each, around the free-memory "
        f"split ({'/'.join(str(round(100 * s)) for s in share)}); checked per GPU"
    )


def gpu_region(space: Space, infos: dict[str, ModelInfo], rig: Rig, calib=None) -> None:
    """Bound n_gpu_layers and n_cpu_moe to what can fit, and for a MoE model in the default space search the
    hybrid region: all layers on the GPU with the routed experts of the first N layers in host RAM, N from the
    fewest that fit up to all. Partial offload (fewer layers on the GPU, all their experts in RAM) only when even
    that does not fit: the non-expert weights, KV cache and buffers are too big for the GPUs."""
    if not rig.gpu_offload or "n_gpu_layers" not in space.dims:
        return
    n_layer = max(i.n_layer for i in infos.values())
    all_layers = n_layer + 1
    moe = any(i.is_moe for i in infos.values())
    if not rig.vram_known:
        if space.varying():
            space.notes.append(
                "GPU memory unknown (NVML reports none): n_gpu_layers and n_cpu_moe are not bounded by the planner"
            )
        return
    where = " and ".join(f"{_gib(c)} usable on GPU {i}" for i, c in enumerate(rig.vram_caps))
    auto_ngl, auto_ncm = "n_gpu_layers" in space.auto, "n_cpu_moe" in space.auto
    if moe and auto_ngl and auto_ncm:
        first = planner.first_true(
            0, n_layer, lambda n: can_fit(space, infos, rig, calib, n_gpu_layers=all_layers, n_cpu_moe=n)
        )
        if first is not None:
            space.dims["n_gpu_layers"] = Dimension("n_gpu_layers", [all_layers])
            lowest = first
            if "moe_part" not in space.dims and first > 0:
                # finer than whole layers, as --fit places them: part of layer N's FFN in RAM too
                space.dims["moe_part"] = Dimension("moe_part", list(MOE_PARTS))
                space.auto["moe_part"] = (
                    "part of the FFN of the layer after the n_cpu_moe block in host RAM too (down, gate+down, "
                    "the whole FFN), the partial layer llama.cpp's --fit makes: the hybrid region by expert "
                    "tensors, not only whole layers"
                )
                # (first - 1, a part) may fit where first - 1 whole layers do not
                if can_fit(space, infos, rig, calib, n_gpu_layers=all_layers, n_cpu_moe=first - 1):
                    lowest = first - 1
            space.dims["n_cpu_moe"] = Dimension("n_cpu_moe", list(range(lowest, n_layer + 1)), 1)
            space.auto["n_gpu_layers"] = (
                f"the hybrid region: all {all_layers} layers on the GPU (attention, shared "
                "experts, KV cache), routed experts of the first n_cpu_moe layers in host "
                "RAM, as llama.cpp's -ngl 99 --n-cpu-moe N"
            )
            space.auto["n_cpu_moe"] = (
                f"{first} is the fewest expert layers in RAM that fit ({where}, planner at the "
                f"leanest context and batches), {n_layer} = every expert in RAM"
            )
            return
        last = planner.last_true(
            0, all_layers, lambda n: can_fit(space, infos, rig, calib, n_gpu_layers=n, n_cpu_moe=n_layer)
        )
        space.dims["n_cpu_moe"] = Dimension("n_cpu_moe", [n_layer])
        space.dims["n_gpu_layers"] = (
            Dimension("n_gpu_layers", list(range(0, last + 1)), 1) if last else Dimension("n_gpu_layers", [0])
        )
        space.auto["n_cpu_moe"] = (
            f"all {n_layer} expert layers in host RAM: even then the other weights, KV cache "
            f"and buffers of all layers do not fit ({where})"
        )
        space.auto["n_gpu_layers"] = (
            f"partial offload: 0 to {last or 0} layers on the GPU (the most that fit with every expert in RAM, planner)"
        )
        return
    # the user's own ranges (or a dense model): drop the values no config can fit, each judged at the most
    # lenient value of the other placement dimension
    ncm = space.dims.get("n_cpu_moe")
    ngl = space.dims["n_gpu_layers"]
    lenient_ncm = max(ncm.values) if ncm else None

    def fits_ngl(v):
        return can_fit(
            space, infos, rig, calib, n_gpu_layers=v, **({"n_cpu_moe": lenient_ncm} if lenient_ncm is not None else {})
        )

    keep = [v for v in ngl.values if fits_ngl(v)]
    if len(keep) < len(ngl.values):
        why = f"the planner predicts more cannot fit ({where})" if keep else f"none fits ({where})"
        keep = keep or [min(ngl.values)]
        space.notes.append(f"n_gpu_layers bounded to {max(keep)}: {why} (--no-plan to search them anyway)")
        space.dims["n_gpu_layers"] = ranged("n_gpu_layers", keep, ngl.step)
        if "n_gpu_layers" in space.auto:
            space.auto["n_gpu_layers"] = f"0 to {max(keep)} layers on the GPU: more cannot fit ({where})"
    if ncm and len(ncm.values) > 1:
        lenient_ngl = min(space.dims["n_gpu_layers"].values)
        kept = [v for v in ncm.values if can_fit(space, infos, rig, calib, n_gpu_layers=lenient_ngl, n_cpu_moe=v)]
        if kept and len(kept) < len(ncm.values):
            space.notes.append(
                f"n_cpu_moe bounded to {min(kept)}..{max(kept)}: fewer experts in RAM cannot fit ({where})"
            )
            space.dims["n_cpu_moe"] = ranged("n_cpu_moe", kept, ncm.step)


def drop_unfit_contexts(space: Space, infos: dict[str, ModelInfo], rig: Rig, calib=None) -> None:
    """Contexts that cannot fit even with the leanest config of the space leave it; when none is left, the
    search would only record failures: that is bad input, not a study."""
    d = space.dims.get("n_ctx")
    if d is None:
        return
    placements = [{}]
    if rig.gpu_offload:
        ngl, ncm = space.dims.get("n_gpu_layers"), space.dims.get("n_cpu_moe")
        placements = [
            {**({"n_gpu_layers": a} if ngl else {}), **({"n_cpu_moe": b} if ncm else {})}
            for a in ({min(ngl.values), max(ngl.values)} if ngl else {None})
            for b in ({min(ncm.values), max(ncm.values)} if ncm else {None})
        ]
    keep, why = [], ""
    for v in d.values:
        verdicts = [
            judge(predict(c, infos[m], rig, calib), rig)
            for m in space.models
            for p in placements
            for c in lenient_configs(space, m, {**p, "n_ctx": v})
        ]
        if any(ok for ok, _ in verdicts):
            keep.append(v)
        elif not why:
            why = f"n_ctx {v} {verdicts[0][1]}"
    if not keep:
        raise SpaceError(f"no context of --ctx {d.spec()} can fit: {why} (lower --ctx, free memory or --no-plan)")
    if len(keep) < len(d.values):
        space.notes.append(f"contexts the planner says cannot fit dropped ({why}); kept {','.join(map(str, keep))}")
        space.dims["n_ctx"] = ranged("n_ctx", keep, d.step)


def apply(space: Space, infos: dict[str, ModelInfo], rig: Rig, calib=None, plan: bool = True) -> None:
    """Everything the rig decides about the space: the split over GPUs, the GPU region, the contexts."""
    split_dimension(space, rig)
    if plan:
        gpu_region(space, infos, rig, calib)
        drop_unfit_contexts(space, infos, rig, calib)


def plan(space: Space, infos: dict[str, ModelInfo], rig: Rig, calib=None) -> dict:
    """The dry run: the space's dimensions, how many of its configs the planner says fit, and the predicted
    memory of the leanest and the hungriest fitting config (by VRAM, then host RAM). Threads never change
    memory, so configs are judged over the other dimensions and counted times the thread combinations."""
    blind = 1
    for k in MEMORY_BLIND:
        if k in space.dims:
            blind *= len(space.dims[k].values)
    names = [k for k in space.dims if k not in MEMORY_BLIND]
    fitting, skipped, why = 0, 0, {}
    low = high = None
    for m in space.models:
        for combo in itertools.product(*(space.dims[k].values for k in names)):
            cfg = space.config(m, dict(zip(names, combo)))
            p = predict(cfg, infos[m], rig, calib)
            ok, reason = judge(p, rig)
            if not ok:
                skipped += blind
                why.setdefault(reason.split(",")[0].split(" VRAM")[0][:40], reason)
                continue
            fitting += blind
            key = (p.vram_bytes, p.ram_bytes - p.reclaimable_bytes)
            if low is None or key < low[0]:
                low = (key, cfg, p)
            if high is None or key > high[0]:
                high = (key, cfg, p)

    def show(x):
        if x is None:
            return None
        _, cfg, p = x
        return {
            "config": cfg.to_dict(),
            "vram_bytes": p.vram_bytes,
            "vram_by_device": p.vram_by_device,
            "host_bytes": p.ram_bytes,
            "resident_bytes": p.ram_bytes - p.reclaimable_bytes,
            "mmap_bytes": p.reclaimable_bytes,
        }

    return {
        "dimensions": {k: list(d.values) for k, d in space.dims.items()},
        "models": list(space.models),
        "configs": fitting,
        "configs_in_space": space.size(),
        "skipped_by_planner": skipped,
        "notes": list(space.notes),
        "reasons": dict(space.auto),
        "rig": rig.describe(),
        "why_skipped": sorted(set(why.values()))[:5],
        "lowest_vram": show(low),
        "highest_vram": show(high),
    }

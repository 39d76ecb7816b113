"""The configs a search starts with: llama.cpp's defaults and the seed script's GPU-layer heuristic, snapped to the
space (each is enqueued as a trial of its own, labelled in `baseline`)."""

from __future__ import annotations

from tuner.model.meta import ModelInfo
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

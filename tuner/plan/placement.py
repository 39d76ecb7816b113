"""Where llama.cpp puts each layer and tensor: the devices of the offloaded layers, the tensor split, the
expert overrides (`-ot`, `--n-cpu-moe`), read from src/llama-model.cpp `load_tensors`. The memory planner
(tuner.plan.planner), the roofline, the speed model and the port of --fit (tuner.plan.fit) place by these rules."""

from __future__ import annotations

import bisect
import re

import numpy as np

from tuner.model.meta import EXPS_RE, ModelInfo
from tuner.record import TrialConfig, moe_part_pattern, parse_tensor_split


def gpu_layer_start(info: ModelInfo, n_gpu_layers: int, gpu_offload: bool) -> tuple[int, bool, int]:
    """(first block on a GPU, output layer on a GPU, effective layer count), as llama.cpp assigns them.

    llama.cpp (src/llama-model.cpp, load_tensors: `i_gpu_start = max(n_layer + 1 - n_gpu_layers, 0)`, and the
    "offloading output layer to GPU" log) offloads the output layer first: n_gpu_layers = k puts the output
    layer and the last k - 1 blocks on the GPU; n_layer + 1 puts everything but the token embeddings there.
    """
    if not gpu_offload:
        return info.n_layer, False, 0
    ngl = info.n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, info.n_layer + 1)
    return (max(info.n_layer + 1 - ngl, 0) if ngl else info.n_layer), ngl > 0, ngl


def split_fractions(tensor_split: str, free: list[int] | None) -> list[float]:
    """Cumulative split points per device, as llama.cpp computes them (float32): `tensor_split` when it has a
    non-zero entry, else each device's free memory ("3,1", "3/1": proportions, padded with zeros)."""
    n = len(free) if free else 1
    parts = parse_tensor_split(tensor_split)
    if parts and any(parts):
        vals = (parts + [0.0] * n)[:n]
    else:
        vals = [float(f) for f in free] if free and any(free) else [1.0] * n
    cum = np.cumsum(np.asarray(vals, dtype=np.float32), dtype=np.float32)
    return [float(np.float32(c) / cum[-1]) for c in cum]


def layer_devices(cfg: TrialConfig, info: ModelInfo, gpu_offload: bool, free: list[int] | None = None) -> list[int]:
    """The device of every layer il in 0..n_layer (n_layer: the output layer): -1 for host memory, else the
    GPU's index. llama.cpp gives device i a contiguous run of the offloaded layers: the layer's position among
    them, (il - first) / n_offloaded, is looked up in the cumulative split points (`std::upper_bound`, float32).
    split_mode none keeps every offloaded layer on main_gpu. `free`: each GPU's free memory (one GPU if None).
    """
    start, _, ngl = gpu_layer_start(info, cfg.n_gpu_layers, gpu_offload)
    n_dev = len(free) if free else 1
    if cfg.split_mode == "none":
        return [-1 if il < start or ngl == 0 else min(cfg.main_gpu, n_dev - 1) for il in range(info.n_layer + 1)]
    splits = [np.float32(s) for s in split_fractions(cfg.tensor_split, free)]
    out = []
    for il in range(info.n_layer + 1):
        if il < start or il - start >= ngl:
            out.append(-1)
        else:
            pos = np.float32(il - start) / np.float32(ngl)
            out.append(min(bisect.bisect_right(splits, pos), n_dev - 1))
    return out


def _override_rules(cfg: TrialConfig) -> list:
    """(matches(tensor), buffer) in llama.cpp's order: raw -ot first, then --cpu-moe / --n-cpu-moe. A buffer is
    "CPU" or a device name (CUDA1, ...); an -ot pattern that is not a valid regex never matches."""
    rules = []
    for item in cfg.overrides:
        pattern, _, buft = item.rpartition("=")
        try:
            rx = re.compile(pattern)
        except re.error:
            continue
        rules.append((lambda t, rx=rx: rx.search(t.name) is not None, buft.upper()))
    if cfg.cpu_moe:
        rules.append((lambda t: EXPS_RE.search(t.name) is not None, "CPU"))
    if cfg.n_cpu_moe:
        # --n-cpu-moe N: one `blk\.i\.ffn_..._exps` pattern per layer i < N, i.e. the experts of layers 0..N-1
        rules.append(
            (lambda t: t.layer is not None and t.layer < cfg.n_cpu_moe and EXPS_RE.search(t.name) is not None, "CPU")
        )
    if cfg.moe_part != "none" and not cfg.cpu_moe:
        rx = re.compile(moe_part_pattern(cfg.n_cpu_moe, cfg.moe_part))
        rules.append((lambda t, rx=rx: rx.search(t.name) is not None, "CPU"))
    return rules


def _device_of_buffer(buft: str, names: tuple[str, ...] = ()) -> int | None:
    """-1 for a host buffer (CPU, CPU_Mapped, ...), the index of a named device (one of `names`, as llama.cpp
    names the devices' buffers: "RPC0[127.0.0.1:50053]"; else CUDA1 → 1), None: unknown."""
    if buft.startswith("CPU"):
        return -1
    upper = [n.upper() for n in names]
    if buft.upper() in upper:
        return upper.index(buft.upper())
    m = re.search(r"(\d+)$", buft)
    return int(m[1]) if m else None


def tensor_devices(
    cfg: TrialConfig, info: ModelInfo, gpu_offload: bool, free: list[int] | None = None, names: tuple[str, ...] = ()
) -> tuple[list[int], int]:
    """Per tensor (in info.tensors order): -1 when it lives in host memory, else its GPU; plus the effective ngl.
    Token embeddings stay on the host (llama.cpp keeps the input layer on the CPU); output tensors go with the
    output layer; an override wins over the layer's device (`names`: the devices' buffer names, for `-ot`)."""
    names = tuple(names)
    key = (
        info.path,
        info.file_size,
        len(info.tensors),
        gpu_offload,
        tuple(free or ()),
        cfg.n_gpu_layers,
        cfg.split_mode,
        cfg.main_gpu,
        cfg.tensor_split,
        cfg.n_cpu_moe,
        cfg.cpu_moe,
        cfg.moe_part,
        cfg.overrides,
        names,
    )
    hit = _PLACEMENT_CACHE.get(key)
    if hit is not None:
        return hit
    _, _, ngl = gpu_layer_start(info, cfg.n_gpu_layers, gpu_offload)
    if not gpu_offload:
        out = ([-1] * len(info.tensors), 0)
    else:
        devs = layer_devices(cfg, info, gpu_offload, free)
        rules = _override_rules(cfg)
        where = []
        for t in info.tensors:
            dev = next((_device_of_buffer(b, names) for match, b in rules if match(t)), None)
            if dev is None:
                if t.layer is not None:
                    dev = devs[min(t.layer, info.n_layer - 1)]
                elif t.group == "embd":
                    dev = -1
                else:
                    dev = devs[info.n_layer]
            where.append(dev)
        out = (where, ngl)
    if len(_PLACEMENT_CACHE) > 4096:  # a dry run over a big space asks for each load key once
        _PLACEMENT_CACHE.clear()
    _PLACEMENT_CACHE[key] = out
    return out


_PLACEMENT_CACHE: dict = {}


def tied_output_copy(info: ModelInfo, where: list[int]) -> tuple[int, int]:
    """(device, bytes) of the copy of the token embeddings a tied output gets on a device, else (-1, 0).

    A model without `output.weight` reads its output through the token embeddings, which stay on the host;
    llama.cpp loads them again into the output layer's buffer (llama-model.cpp: TENSOR_DUPLICATED) when that
    layer is offloaded (Gemma 3 270M: 170 MiB on the last device)."""
    embd, out_dev = 0, -1
    for t, d in zip(info.tensors, where):  # one pass: predict() asks for every config of a dry run
        if t.name == "output.weight":
            return -1, 0
        if t.name == "token_embd.weight":
            embd = t.n_bytes
        elif t.name.startswith("output_norm"):
            out_dev = d
    return (out_dev, embd) if embd and out_dev >= 0 else (-1, 0)


def placement(cfg: TrialConfig, info: ModelInfo, gpu_offload: bool) -> tuple[list[bool], int]:
    """Per tensor (in info.tensors order): True when it lives in host memory; plus the effective ngl."""
    where, ngl = tensor_devices(cfg, info, gpu_offload)
    return [d < 0 for d in where], ngl

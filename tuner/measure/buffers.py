"""llama.cpp's own buffer sizes, read from its log: what each buffer type (CPU, CUDA0, RPC0[host:port]...) holds
of the model, the KV cache, the recurrent state, the output and the compute graph.

The worker records them with every trial (TrialRecord.buffers): the figures llama.cpp allocated on each device,
beside the memory measured from outside (RSS, NVML). The oracle (tuner.plan.oracle) reads the same lines from
no_alloc loads to check the planner.
"""

from __future__ import annotations

import re

MiB = 1 << 20
_MIB = r"([\d.]+) MiB"
LOG_PATTERNS = {
    "model": re.compile(rf"load_tensors:\s+(\S+) model buffer size =\s+{_MIB}"),
    "kv": re.compile(rf"llama_kv_cache:\s+(\S+) KV buffer size =\s+{_MIB}"),
    "rs": re.compile(rf"llama_memory_recurrent:\s+(\S+) RS buffer size =\s+{_MIB}"),
    "output": re.compile(rf"llama_context:\s+(\S+)\s+output buffer size =\s+{_MIB}"),
    "compute": re.compile(rf"sched_reserve:\s+(\S+) compute buffer size =\s+{_MIB}"),
}
KV_SIZE_RE = re.compile(
    r"llama_kv_cache: size =\s*[\d.]+ MiB \(\s*(\d+) cells,\s*(\d+) layers.*?K \((\w+)\):\s*"
    r"([\d.]+) MiB, V \((\w+)\):\s*([\d.]+) MiB"
)
RS_SIZE_RE = re.compile(
    r"llama_memory_recurrent: size =\s*[\d.]+ MiB \(\s*(\d+) cells,\s*(\d+) layers.*?"
    r"R \(\w+\):\s*([\d.]+) MiB, S \(\w+\):\s*([\d.]+) MiB"
)


def parse_log(text: str) -> dict:
    """llama.cpp's own figures from its log: bytes per buffer kind and buffer type, plus the KV/RS breakdown.

    Figures are logged in MiB with two decimals: each is exact to ±0.005 MiB.
    """
    out: dict = {k: {} for k in LOG_PATTERNS}
    for kind, rx in LOG_PATTERNS.items():
        for buft, mib in rx.findall(text):
            out[kind][buft] = out[kind].get(buft, 0) + round(float(mib) * MiB)
    out["kv_caches"] = [
        {
            "cells": int(c),
            "layers": int(n),
            "type_k": tk,
            "k": round(float(k) * MiB),
            "type_v": tv,
            "v": round(float(v) * MiB),
        }
        for c, n, tk, k, tv, v in KV_SIZE_RE.findall(text)
    ]
    out["rs_caches"] = [
        {"cells": int(c), "layers": int(n), "r": round(float(r) * MiB), "s": round(float(s) * MiB)}
        for c, n, r, s in RS_SIZE_RE.findall(text)
    ]
    out["kv_bytes"] = sum(c["k"] + c["v"] for c in out["kv_caches"])
    out["rs_bytes"] = sum(c["r"] + c["s"] for c in out["rs_caches"])
    return out


def per_device(parsed: dict) -> dict[str, dict[str, int]]:
    """{buffer type: {"model": bytes, "kv": ..., "compute": ...}}: one entry per buffer type that holds something
    (llama.cpp's buffer names: "CPU", "CPU_Mapped", "CUDA0", "RPC0[127.0.0.1:50052]"...)."""
    out: dict[str, dict[str, int]] = {}
    for kind in LOG_PATTERNS:
        # a context on a model already loaded logs no model buffers (the oracle's answer then has no "model")
        for buft, n in parsed.get(kind, {}).items():
            out.setdefault(buft, {})[kind] = n
    return out


def is_host(buft: str) -> bool:
    """A buffer type in host memory: the CPU's (CPU, CPU_Mapped, CPU_REPACK...) or a GPU backend's pinned host
    buffer (CUDA_Host, Vulkan_Host...), where llama.cpp puts the CPU backend's compute buffer when the first
    device has one (src/llama-context.cpp)."""
    return buft == "CPU" or buft.startswith("CPU_") or buft.endswith("_Host")


def host_total(by_buft: dict[str, dict[str, int]], kind: str) -> int:
    """Bytes of one kind (model, kv, compute...) in host memory, from `per_device`'s answer."""
    return sum(v.get(kind, 0) for k, v in by_buft.items() if is_host(k))

"""The bandwidth roofline: how fast token generation could be if it only waited on memory.

Generating one token reads every weight it uses once (the embedding row, every block, the output matrix;
for MoE only the experts in use) plus the KV cache filled so far. `tg_bound` divides those bytes by the
memory bandwidth of wherever they live (host or GPU, split as the planner places them), so a trial's
measured tg t/s as a % of the bound says how close to the hardware it ran.

`bandwidth()` measures host copy bandwidth with numpy (one thread per physical core, as llama.cpp runs) and
device bandwidth with a device-to-device copy through the CUDA driver API in a child process (the tuner
parent never holds a CUDA context). Results are cached per machine in ~/.cache/tuner/bandwidth.json.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from tuner import files
from tuner.measure import hardware
from tuner.model.meta import ModelInfo
from tuner.plan import planner
from tuner.plan.placement import gpu_layer_start, placement
from tuner.plan.planner import kv_layer_bytes
from tuner.record import TrialConfig

HOST_BYTES = 256 << 20  # per copy: far beyond any cache
DEVICE_BYTES = 1 << 30


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tuner"


def _machine_key() -> str:
    h = hardware.probe()
    return hardware.digest(
        {
            "cpu": h.cpu,
            "cores": h.cores_physical,
            "ram_gib": round(h.ram_total / 2**30),
            "gpus": [g.name for g in h.gpus],
        }
    )


def host_bandwidth(nbytes: int = HOST_BYTES, threads: int | None = None, repeats: int = 5) -> float:
    """Bytes/s moved by a parallel memcpy (read + write counted), best of `repeats`."""
    threads = threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1
    per = max(nbytes // threads, 1 << 20)
    src = [np.ones(per, dtype=np.uint8) for _ in range(threads)]
    dst = [np.empty(per, dtype=np.uint8) for _ in range(threads)]
    for s, d in zip(src, dst):  # touch every page before timing
        d.fill(0)
    best = 0.0
    for _ in range(repeats):
        barrier = threading.Barrier(threads + 1)

        def work(i):
            barrier.wait()
            np.copyto(dst[i], src[i])  # releases the GIL: the copies run in parallel

        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in ts:
            t.join()
        dt = time.perf_counter() - t0
        best = max(best, 2 * per * threads / dt)
    return best


def _device_bandwidth_child(nbytes: int = DEVICE_BYTES, repeats: int = 10) -> float | None:
    """Device-to-device copy bandwidth of GPU 0 via libcuda (driver API); None without a usable GPU."""
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    ok = lambda rc: rc == 0  # noqa: E731 - CUresult 0 = CUDA_SUCCESS
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    a, b = ctypes.c_uint64(), ctypes.c_uint64()
    if not (
        ok(cu.cuInit(0))
        and ok(cu.cuDeviceGet(ctypes.byref(dev), 0))
        and ok(cu.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev))
    ):
        return None
    try:
        if not (
            ok(cu.cuMemAlloc_v2(ctypes.byref(a), ctypes.c_size_t(nbytes)))
            and ok(cu.cuMemAlloc_v2(ctypes.byref(b), ctypes.c_size_t(nbytes)))
        ):
            return None
        cu.cuMemcpyDtoD_v2(b, a, ctypes.c_size_t(nbytes))
        cu.cuCtxSynchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            cu.cuMemcpyDtoD_v2(b, a, ctypes.c_size_t(nbytes))
        if not ok(cu.cuCtxSynchronize()):
            return None
        return 2 * nbytes * repeats / (time.perf_counter() - t0)
    finally:
        cu.cuCtxDestroy_v2(ctx)


def device_bandwidth(timeout: float = 60.0) -> float | None:
    """Measured in a child process, so this process never creates a CUDA context."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "tuner.plan.roofline", "device"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])["device"]
    except (subprocess.SubprocessError, ValueError, IndexError, KeyError, OSError):
        return None


def bandwidth(cache: bool = True) -> dict:
    """{'host': bytes/s, 'device': bytes/s or None}: measured once per machine, then read from the cache."""
    path = cache_dir() / "bandwidth.json"
    key = _machine_key()
    if cache:
        try:
            data = json.loads(path.read_text())
            if data.get("key") == key and data.get("host"):
                return {"host": float(data["host"]), "device": data.get("device")}
        except (OSError, ValueError):
            pass
    bw = {"host": host_bandwidth(), "device": device_bandwidth() if hardware.probe().gpus else None}
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            files.write_atomic(
                path,
                json.dumps({"key": key, **bw, "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}),
                chmod=files.default_mode(),
            )
        except OSError:
            pass  # an unwritable cache only costs a re-measurement
    return bw


def bytes_per_token(cfg: TrialConfig, info: ModelInfo, gpu_offload: bool) -> tuple[int, int]:
    """(host bytes, device bytes) read to generate one token at the trial's mean tg position."""
    host_flags, _ = placement(cfg, info, gpu_offload)
    tied = not any(t.group == "output" and t.name.startswith("output.weight") for t in info.tensors)
    frac = info.n_expert_used / info.n_expert if info.n_expert else 1.0
    host = dev = 0
    for t, h in zip(info.tensors, host_flags):
        n = t.n_bytes
        if t.group == "embd" and not (tied and t.name == "token_embd.weight"):
            n = n // max(info.n_vocab, 1)  # one row
        elif t.group == "exps":
            n = int(n * frac)
        if h:
            host += n
        else:
            dev += n
    # KV: llama-bench's tg test runs at depth n_depth, generating n_gen tokens: mean fill n_depth + n_gen / 2;
    # --parallel N: each step reads the weights once for N tokens and each sequence's cache, filled after its
    # prompt (the bound is then one sequence's t/s: a step yields one token per sequence)
    cells = cfg.n_depth + cfg.n_gen // 2 + 1 + (cfg.n_prompt if cfg.n_seq else 0)
    kv_reads = cfg.streams()

    start, _, _ = gpu_layer_start(info, cfg.n_gpu_layers, gpu_offload)
    for il in range(info.n_layer):
        b = kv_layer_bytes(cfg, info, il, cells=cells) * kv_reads
        if il < start:
            host += b
        else:
            dev += b
    return host, dev


def tg_bound(cfg: TrialConfig, info: ModelInfo, bw: dict, gpu_offload: bool) -> float | None:
    """Upper bound of tg t/s: one token = host bytes / host bandwidth + device bytes / device bandwidth."""
    host, dev = bytes_per_token(cfg, info, gpu_offload)
    t = 0.0
    if host:
        if not bw.get("host"):
            return None
        t += host / bw["host"]
    if dev:
        if not bw.get("device"):
            return None
        t += dev / bw["device"]
    return 1.0 / t if t > 0 else None


def annotate(rec, info: ModelInfo, calib=None, bw: dict | None = None) -> None:
    """Set a trial record's predicted peak RAM/VRAM and its tg bandwidth bound (tuner bench, tuner search)."""
    gpu = bool((rec.build or {}).get("gpu_offload"))
    pred = planner.predict(rec.config, info, calib, gpu_offload=gpu)
    rec.predicted_ram_bytes = pred.ram_bytes
    rec.predicted_vram_bytes = pred.vram_bytes if gpu else None
    bw = bw if bw is not None else bandwidth()
    rec.tg_roofline_ts = tg_bound(rec.config, info, bw, gpu) if rec.config.n_gen else None


if __name__ == "__main__":  # pragma: no cover - the device probe's child process
    if sys.argv[1:] == ["device"]:
        print(json.dumps({"device": _device_bandwidth_child()}))

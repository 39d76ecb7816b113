"""The rig probe (`tuner probe`): what decides llama.cpp's speed on this machine and build, measured once.

Per ggml type, llama.cpp's matrix-vector kernels (tg) and matrix-matrix kernels (pp) are timed on synthetic
one-type models (`llama-quantize --pure` of a random F16 llama, tuner.model.synth) larger than the caches, through
the same worker `tuner bench` uses, at each thread count. Two small Q8_0 models of 2 and 16 layers, whose weights
are a few MB, measure what a token costs besides reading and multiplying weights (graph, thread barriers, norms,
rope): a line through them (numpy.polyfit) gives a fixed cost per token and one per layer. A Q8_0 model with a
262k vocabulary of 256-wide rows, set against the wide Q8_0 model, gives what a matrix row costs beyond its bytes
(a dot product's setup and reduction; short rows such as Gemma's 640-wide output pay it 262k times a token). Each
type's figure is then its own trial's time less those costs, divided by its bytes (tg) or FLOP (pp), counted by the same
tuner.plan.speed.terms that `speed.predict` adds up for any model. One trial per type decides its figure (a joint
least-squares fit over all trials let a noisy trial zero out another type's figure). A MoE of each type (8
experts, 2 used) then measures what routed experts cost beyond their weights: its time less what the dense
figures predict is, in tg, a cost per MoE layer (top-k, gathers, the weighted sum) and, in pp, a factor on the
experts' matrix products (each gets only its share of the batch's rows, and ggml's expert product, mul_mat_id,
has no tiled GEMM path where a dense product of some types has one). Both are the median over the types: one
short trial per type moved the factor of the same type by up to 2x between two probes minutes apart on this
shared 2-core VM (benchmarks/README.md, speed_accuracy), more than the types differ; each type's own figures are
kept beside them. A numpy copy gives the plain memory bandwidth beside them. Every trial runs in each of
`passes` passes over all the models, and a figure is the median over the passes: on a shared machine a trial moves
more from one minute to the next than between its repetitions.

GPU (only where the installed build can offload, hardware.build_info()['gpu_offload']): the same models fully
offloaded give the device's per-type figures, and a pinned host→device copy through the CUDA driver the link
bandwidth. A CPU-only build records why there are none.

The result is cached as ~/.cache/tuner/probe-<hardware fingerprint>-<build fingerprint>.json; a probe file
whose fingerprints are not this machine's and build's is refused.
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tuner import files
from tuner.errors import TunerError
from tuner.measure import hardware
from tuner.measure.lock import measurement_lock
from tuner.measure.runner import Runner
from tuner.model import synth
from tuner.model.meta import read_model
from tuner.plan import roofline, speed
from tuner.plan.roofline import cache_dir
from tuner.record import TrialConfig

VERSION = 3  # 2: the MoE figures (tg_moe_layer_s, pp_moe_factor); 3: the row cost (tg_s_per_row), passes
# ggml type → the ftype whose --pure quantization is that type everywhere
TYPES = {
    "F16": "f16",
    "Q8_0": "q8_0",
    "Q6_K": "q6_k",
    "Q5_K": "q5_k_m",
    "Q5_0": "q5_0",
    "Q4_K": "q4_k_m",
    "Q4_0": "q4_0",
    "Q3_K": "q3_k_m",
    "Q2_K": "q2_k",
}
# "wide": one model per type (8 × 15 M weights: 40 MB at Q2_K to 240 MB at F16, beyond a 32 MB L3); "overhead":
# 0.5 M weights a layer (0.6 MB at Q8_0), built at OVERHEAD_LAYERS depths, for the costs that are not weights;
# "moe": 8 layers of 8 experts, 2 used, one per type (100 M expert weights, 27 MB of them read per token at Q8_0);
# "rows": short rows, many of them (a 262k vocabulary's 256-wide output: 67 M weights, 71 MB at Q8_0, 4x the rows
# per byte of the wide model), beside the wide Q8_0 model's long ones: what a row costs beyond its bytes.
SHAPES = {
    "wide": dict(n_embd=1024, n_ff=4096, n_head=16, n_head_kv=4, n_layer=8, n_vocab=2048),
    "overhead": dict(n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_layer=2, n_vocab=512),
    "moe": dict(n_embd=1024, n_ff=512, n_head=16, n_head_kv=4, n_layer=8, n_vocab=2048, n_expert=8, n_expert_used=2),
    "rows": dict(n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_layer=2, n_vocab=262144),
}
OVERHEAD_LAYERS = (2, 16)
OVERHEAD_TYPE = "Q8_0"
SHAPE = {"n_prompt": 128, "n_gen": 32}  # the test shape of the probe's trials (pp128, tg32)


class ProbeError(TunerError):
    """A probe file that cannot be used here: one line naming why."""


def fingerprints() -> tuple[str, str]:
    return hardware.probe().fingerprint(), hardware.build_fingerprint(hardware.build_info())


def default_path() -> Path:
    hw, build = fingerprints()
    return cache_dir() / f"probe-{hw}-{build}.json"


def load(path: str | os.PathLike | None = None) -> dict | None:
    """This rig's probe (None when there is none yet). A file measured on another machine or build is refused."""
    p = Path(path) if path else default_path()
    if not p.exists():
        if path:
            raise ProbeError(f"probe file not found: {p}")
        return None
    try:
        data = json.loads(p.read_text())
        hw_fp, build_fp = data["hw_fingerprint"], data["build_fingerprint"]
        data["cpu"]  # noqa: B018 - a probe without its figures is not one
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ProbeError(f"{p}: not a tuner probe file ({type(e).__name__})") from None
    here_hw, here_build = fingerprints()
    if hw_fp != here_hw:
        raise ProbeError(
            f"{p} was measured on another machine (hardware {hw_fp}, this one {here_hw}): run `tuner probe` here"
        )
    if build_fp != here_build:
        raise ProbeError(
            f"{p} was measured with another llama.cpp build ({build_fp}, this one {here_build}): "
            "run `tuner probe` again"
        )
    if data.get("version") != VERSION:
        raise ProbeError(
            f"{p}: probe format {data.get('version')}, this tuner reads {VERSION}: run `tuner probe` again"
        )
    return data


def thread_counts(physical: int) -> list[int]:
    """1, 2, 4, ... and the physical core count: enough to interpolate between."""
    out, t = [], 1
    while t < physical:
        out.append(t)
        t *= 2
    return out + [physical]


def models(folder: Path, types: list[str], defs: dict[str, dict] = SHAPES) -> list[tuple[str, str, Path]]:
    """(type, role, path) of the probe models, made once per folder: the wide one of each type and the overhead
    ones, each an F16 base (tuner.model.synth) quantized by llama.cpp with --pure."""
    from tuner.llama import quantize  # noqa: PLC0415 - loads llama_cpp: only a probe that quantizes its models

    folder.mkdir(parents=True, exist_ok=True)
    ftypes = synth.quant_ftypes()
    plan = [("wide", "wide", defs["wide"], ty) for ty in types]
    plan += [("overhead", f"overhead{n}", dict(defs["overhead"], n_layer=n), OVERHEAD_TYPE) for n in OVERHEAD_LAYERS]
    if "rows" in defs and OVERHEAD_TYPE in types:  # judged against the wide model of its type
        plan.append(("rows", "rows", defs["rows"], OVERHEAD_TYPE))
    if "moe" in defs:
        plan += [("moe", "moe", defs["moe"], ty) for ty in types]
    out = []
    for role, name, dims, ty in plan:
        base = folder / f"{name}-f16.gguf"
        if not base.exists():
            with files.atomic_path(base, tmp=base.with_suffix(".gguf.part")) as part:
                synth.write_base(part, synth.Shape(**dims), f"tuner-probe-{name}", "f16")
        ft = TYPES[ty]
        path = base if ft == "f16" else folder / f"{name}-{ft}-pure.gguf"
        if not path.exists():
            with files.atomic_path(path, tmp=path.with_suffix(".gguf.part")) as part:
                quantize(base, part, ftypes[ft], pure=True)
        out.append((ty, role, path))
    return out


def measure(
    paths: list[tuple[str, str, Path]], threads: list[int], repetitions: int, gpu: bool, echo=None, passes: int = 2
) -> list[dict]:
    """One trial per (model, thread count) and pass through tuner's worker, as `tuner bench -p 128 -n 32` would run
    it; on a GPU build also one fully offloaded trial per model. A row's figures are the median over its passes
    of each trial's median: on a shared machine a trial's speed moves by a fifth from one minute to the next,
    more than its repetitions within the trial do, so the passes go over every model in turn, minutes apart."""
    trials: dict = {}
    with Runner(reuse=True) as runner:
        for n in range(passes):
            for ty, role, path in paths:
                runs = [(t, 0) for t in threads] + ([(threads[-1], -1)] if gpu else [])
                for t, ngl in runs:
                    cfg = TrialConfig(
                        model=str(path),
                        n_threads=t,
                        n_threads_batch=t,
                        n_gpu_layers=ngl,
                        repetitions=repetitions,
                        **SHAPE,
                    )
                    rec = runner.run(cfg)
                    if not rec.ok:
                        raise RuntimeError(f"probe trial failed on {path.name} ({rec.outcome}): {rec.cause}")
                    row = trials.setdefault(
                        (str(path), t, ngl),
                        {
                            "type": ty,
                            "role": role,
                            "model": str(path),
                            "threads": t,
                            "backend": speed.DEVICE if ngl else speed.HOST,
                            "tg_samples": [],
                            "pp_samples": [],
                            "passes": [],
                        },
                    )
                    row["tg_samples"] += rec.tg_samples
                    row["pp_samples"] += rec.pp_samples
                    row["passes"].append(
                        {"tg_tps": statistics.median(rec.tg_samples), "pp_tps": statistics.median(rec.pp_samples)}
                    )
                    if echo:
                        echo(
                            f"  pass {n + 1}/{passes} {path.name:<24} {row['backend']} t={t}: "
                            f"tg {row['passes'][-1]['tg_tps']:7.1f} t/s  pp {row['passes'][-1]['pp_tps']:7.1f} t/s"
                        )
    rows = list(trials.values())
    for row in rows:
        for k in ("tg_tps", "pp_tps"):
            row[k] = statistics.median(p[k] for p in row["passes"])
    return rows


def fit(rows: list[dict], types: list[str], backend: str, threads: int | None = None) -> dict:
    """Figures of one backend (and thread count): fixed costs per token and per layer from the overhead models
    (a line through time per token against layers), then each type's seconds per byte (tg) and per FLOP (pp)
    from its own trial, counted by the terms `speed.predict` uses."""
    sel = [r for r in rows if r["backend"] == backend and (threads is None or r["threads"] == threads)]
    gpu = backend == speed.DEVICE

    terms: dict = {}  # per trial: the fit passes over the wide trials three times (row cost and types agree)

    def counted(r):
        key = (r["model"], r["threads"])
        if key not in terms:
            cfg = TrialConfig(model=r["model"], n_gpu_layers=-1 if gpu else 0, n_threads=r["threads"], **SHAPE)
            terms[key] = speed.terms(read_model(r["model"]), cfg, gpu_offload=gpu)
        return terms[key]

    over = [r for r in sel if r["role"] == "overhead"]
    layers = np.array([sum(counted(r).layers.values()) for r in over], dtype=float)
    tg_layer, tg_fixed = np.polyfit(layers, [1.0 / r["tg_tps"] for r in over], 1)
    pp_layer, pp_fixed = np.polyfit(layers, [1.0 / r["pp_tps"] for r in over], 1)
    # noise can tilt a line through two points below zero: a cost is never negative
    fig = {
        "tg_layer_s": max(float(tg_layer), 0.0),
        "tg_fixed_s": max(float(tg_fixed), 0.0),
        "pp_layer_s": max(float(pp_layer), 0.0),
        "pp_fixed_s": max(float(pp_fixed), 0.0),
        "tg_s_per_row": 0.0,
        "tg_s_per_byte": {},
        "pp_s_per_flop": {},
        "overhead_share": {},
    }

    def per_type() -> None:
        # F16 first: the other models' F32 norms and F16 KV cache are then charged as speed.predict charges them
        for r in sorted((r for r in sel if r["role"] == "wide"), key=lambda r: r["type"] != "F16"):
            tm, ty = counted(r), r["type"]
            n_layer = sum(tm.layers.values())
            t_tg, t_pp = 1.0 / r["tg_tps"], 1.0 / r["pp_tps"]
            fixed_tg = fig["tg_fixed_s"] + n_layer * fig["tg_layer_s"] + sum(tm.rows.values()) * fig["tg_s_per_row"]
            fixed_pp = fig["pp_fixed_s"] + n_layer * fig["pp_layer_s"]
            own_b, rest_b = split(tm.tg_bytes, ty)
            own_f, rest_f = split(tm.pp_flops, ty)
            for t in set(rest_b) | set(rest_f):
                # what speed.predict charges at this type's own rate (nothing measured yet, or the nearest type
                # of an unprobed one such as F32) counts as this type's; the rest at the rates fitted so far
                if not fig["tg_s_per_byte"] or speed.nearest(fig["tg_s_per_byte"], t) == ty:
                    own_b, own_f = own_b + rest_b.pop(t, 0.0), own_f + rest_f.pop(t, 0.0)
            fixed_tg += sum(b * speed.rate(fig, "tg_s_per_byte", t, set()) for t, b in rest_b.items())
            fixed_pp += sum(f * speed.rate(fig, "pp_s_per_flop", t, set()) for t, f in rest_f.items())
            # at least a tenth of the trial's time is the weights' (a noisy overhead trial must not leave them free)
            s_byte = max(t_tg - fixed_tg, 0.1 * t_tg) / own_b
            # the output matrix, once per batch
            out_s = (sum(tm.out_bytes.values()) * s_byte + sum(tm.out_rows.values()) * fig["tg_s_per_row"]) / SHAPE[
                "n_prompt"
            ]
            fig["tg_s_per_byte"][ty] = s_byte
            fig["pp_s_per_flop"][ty] = max(t_pp - fixed_pp - out_s, 0.1 * t_pp) / own_f
            fig["overhead_share"][ty] = {"tg": min(fixed_tg / t_tg, 1.0), "pp": min((fixed_pp + out_s) / t_pp, 1.0)}

    # the row cost and the types' rates depend on each other (each model's norms and KV cache are charged at the
    # other types' rates): the types, then the rows with those charges, twice more; it settles at once since
    # those are a few percent of any model's bytes
    per_type()
    for _ in range(2):
        fig["tg_s_per_row"] = _row_cost(sel, counted, fig)
        per_type()
    dense = dict(fig)  # the MoE trials are judged against the dense figures alone
    routing, factor = {}, {}
    for r in (r for r in sel if r["role"] == "moe"):
        got = _moe_figures(r, dense, counted(r), gpu)
        if got:
            routing[r["type"]], factor[r["type"]] = got
    if routing:
        fig["tg_moe_layer_s_by_type"], fig["pp_moe_factor_by_type"] = routing, factor
        fig["tg_moe_layer_s"] = float(np.median(list(routing.values())))
        fig["pp_moe_factor"] = float(np.median(list(factor.values())))
    # readable beside them: effective GB/s and GFLOP/s per type
    fig["tg_gbps"] = {t: 1e-9 / v for t, v in fig["tg_s_per_byte"].items()}
    fig["pp_gflops"] = {t: 1e-9 / v for t, v in fig["pp_s_per_flop"].items()}
    return fig


def split(work: dict, own: str) -> tuple[float, dict]:
    """(the probed type's share, the rest by type): norms (F32) and the KV cache (F16) are not the type's."""
    rest: dict = {}
    for (_, ty), v in work.items():
        rest[ty] = rest.get(ty, 0.0) + v
    return rest.pop(own, 0.0), rest


def _row_cost(sel: list[dict], counted, fig: dict) -> float:
    """Seconds per matrix row of a generated token: the rows model and the wide model of its type, less the fixed
    costs and their other types' bytes at `fig`'s rates, are two equations in (the type's seconds per byte,
    seconds per row); 0 without a rows model."""
    short = next((r for r in sel if r["role"] == "rows"), None)
    long = next((r for r in sel if short and r["role"] == "wide" and r["type"] == short["type"]), None)
    if long is None:
        return 0.0
    a, b = [], []
    for r in (long, short):
        tm = counted(r)
        own, rest = split(tm.tg_bytes, r["type"])
        a.append([own, sum(tm.rows.values())])
        b.append(
            1.0 / r["tg_tps"]
            - fig["tg_fixed_s"]
            - sum(tm.layers.values()) * fig["tg_layer_s"]
            - sum(v * speed.rate(fig, "tg_s_per_byte", t, set()) for t, v in rest.items())
        )
    try:
        _, s_row = np.linalg.solve(np.array(a), np.array(b))
    except np.linalg.LinAlgError:
        return 0.0
    return max(float(s_row), 0.0)  # noise can make a short row look cheaper than its bytes: never negative


def _moe_figures(r: dict, fig: dict, tm: speed.Terms, gpu: bool) -> tuple[float, float] | None:
    """What the MoE trial `r` took beyond the dense figures' prediction: (seconds per MoE layer and generated
    token: the routing, the factor on its type's pp FLOP time for expert products)."""
    backend = speed.DEVICE if gpu else speed.HOST
    # the figures so far, as speed.predict reads them (the CPU's per thread count)
    probe = {"shape": SHAPE, backend: fig if gpu else {str(r["threads"]): fig}}
    base = speed.predict(
        read_model(r["model"]), probe, r["threads"], n_gpu_layers=-1 if gpu else 0, gpu_offload=gpu, **SHAPE
    )
    n_moe = tm.moe_layers.get(backend, 0)
    exp_s = sum(
        f * speed.rate(fig, "pp_s_per_flop", ty, set()) for (w, ty), f in tm.exp_pp_flops.items() if w == backend
    )
    if not (n_moe and exp_s and base.pred_tg_tps and base.pred_pp_tps):
        return None
    extra_tg = 1.0 / r["tg_tps"] - 1.0 / base.pred_tg_tps
    extra_pp = 1.0 / r["pp_tps"] - 1.0 / base.pred_pp_tps
    # a cost is never negative; a factor below a tenth would say the experts ran for free
    return max(extra_tg / n_moe, 0.0), max(1.0 + extra_pp / exp_s, 0.1)


def link_bandwidth(nbytes: int = 256 << 20, repeats: int = 10) -> float | None:
    """Pinned host → device copy bandwidth of GPU 0 through libcuda (the driver API); None without a GPU.
    Run in a child process (`python -m tuner.plan.probe link`): the caller never holds a CUDA context."""
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev, ctx, host, d = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_uint64()
    if cu.cuInit(0) or cu.cuDeviceGet(ctypes.byref(dev), 0) or cu.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev):
        return None
    try:
        if cu.cuMemAllocHost_v2(ctypes.byref(host), ctypes.c_size_t(nbytes)) or cu.cuMemAlloc_v2(
            ctypes.byref(d), ctypes.c_size_t(nbytes)
        ):
            return None
        cu.cuMemcpyHtoD_v2(d, host, ctypes.c_size_t(nbytes))  # first touch, untimed
        cu.cuCtxSynchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            cu.cuMemcpyHtoD_v2(d, host, ctypes.c_size_t(nbytes))
        if cu.cuCtxSynchronize():
            return None
        return nbytes * repeats / (time.perf_counter() - t0)
    finally:
        cu.cuCtxDestroy_v2(ctx)


def run(
    out: str | os.PathLike | None = None,
    types: list[str] | None = None,
    threads: list[int] | None = None,
    repetitions: int = 2,
    model_dir: str | os.PathLike | None = None,
    echo=None,
    shapes: dict[str, dict] = SHAPES,
    passes: int = 2,
) -> tuple[dict, Path]:
    """Measure this rig (held under the measurement lock) and write the probe file; returns (probe, path).

    `shapes` ({"wide": ..., "overhead": ...} synth.Shape fields) are for tests: smaller models fit in the caches
    and measure the caches, not the rig."""
    types = list(types or TYPES)
    unknown = [t for t in types if t not in TYPES]
    if unknown:
        raise ProbeError(f"unknown probe type(s) {', '.join(unknown)} (known: {', '.join(TYPES)})")
    hw = hardware.probe()
    build = hardware.build_info()
    threads = sorted(set(threads or thread_counts(hw.cores_physical)))
    if threads[0] < 1:
        raise ProbeError("thread counts must be positive")
    gpu = bool(build.get("gpu_offload"))
    folder = Path(model_dir) if model_dir else cache_dir() / "probe-models"
    load0 = os.getloadavg()
    t0 = time.time()
    paths = models(folder, types, shapes)
    with measurement_lock(what="tuner probe"):
        rows = measure(paths, threads, repetitions, gpu, echo, passes)
        host_bw = {str(t): roofline.host_bandwidth(threads=t) for t in threads}
        link = _in_child("link") if gpu else None
        device_bw = roofline.device_bandwidth() if gpu else None
    data = {
        "version": VERSION,
        "hw_fingerprint": hw.fingerprint(),
        "build_fingerprint": hardware.build_fingerprint(build),
        "hardware": hw.fingerprint_dict(),
        "build": {k: build.get(k) for k in ("llama_cpp_python", "system_info", "gpu_offload")},
        "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - t0, 1),
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg(),
        "shape": {**SHAPE, "repetitions": repetitions, "passes": passes},
        "model_shapes": shapes,
        "types": types,
        "threads": threads,
        "host_bandwidth_bytes_per_s": host_bw,
        "cpu": {str(t): fit(rows, types, speed.HOST, t) for t in threads},
        "gpu": None,
        "gpu_note": "" if gpu else "this llama.cpp build cannot offload: no GPU figures",
        "trials": rows,
    }
    if gpu:
        data["gpu"] = {**fit(rows, types, speed.DEVICE), "link_bytes_per_s": link, "vram_bytes_per_s": device_bw}
        if not link:
            data["gpu_note"] = "the host→device link could not be measured (libcuda): hybrid pp predictions are off"
            data["gpu"]["link_bytes_per_s"] = float("inf")
    path = Path(out) if out else default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, json.dumps(data, indent=1), chmod=files.default_mode())
    return data, path


def summary(data: dict) -> str:
    """Per type and thread count: effective GB/s (tg) and GFLOP/s (pp), then the fixed costs."""
    lines = [
        f"rig probe {data['measured_utc']} ({data['seconds']:.0f} s, load {data['loadavg_before'][0]:.1f}): "
        f"pp{data['shape']['n_prompt']} / tg{data['shape']['n_gen']}, -r {data['shape']['repetitions']}, "
        f"{data['shape']['passes']} passes"
    ]
    cols = [("cpu", t, data["cpu"][str(t)]) for t in data["threads"]]
    if data.get("gpu"):
        cols.append(("gpu", "", data["gpu"]))
    head = "type    " + "".join(f"{b}{t:>2} tg GB/s  pp GFLOP/s  " for b, t, _ in cols)
    lines.append(head.rstrip())
    for ty in data["types"]:
        cells = "".join(f"{_num(f['tg_gbps'].get(ty)):>12}{_num(f['pp_gflops'].get(ty)):>12}  " for _, _, f in cols)
        lines.append(f"{ty:<8}{cells}".rstrip())
    for b, t, f in cols:
        lines.append(
            f"{b}{t}: fixed {1e6 * f['tg_fixed_s']:.0f} µs + {1e6 * f['tg_layer_s']:.0f} µs/layer + "
            f"{1e9 * f['tg_s_per_row']:.1f} ns/matrix row per generated token, {1e6 * f['pp_fixed_s']:.0f} µs +"
            f" {1e6 * f['pp_layer_s']:.1f} µs/layer per "
            "prompt token"
        )
    for b, t, f in cols:
        if f.get("pp_moe_factor"):
            factors = ", ".join(f"{ty} x{v:.2f}" for ty, v in f["pp_moe_factor_by_type"].items())
            lines.append(
                f"{b}{t} MoE: routing {1e6 * f['tg_moe_layer_s']:.0f} µs per MoE layer per generated token; "
                f"expert products in pp x{f['pp_moe_factor']:.2f} a dense product's time ({factors})"
            )
    bw = ", ".join(f"{t} threads {v / 1e9:.1f} GB/s" for t, v in data["host_bandwidth_bytes_per_s"].items())
    lines.append(f"memory copy bandwidth (numpy): {bw}")
    if data.get("gpu_note"):
        lines.append(f"note: {data['gpu_note']}")
    return "\n".join(lines)


def _num(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _in_child(what: str, timeout: float = 60.0):
    """A GPU figure measured by `python -m tuner.plan.probe WHAT`; None when the child fails."""
    try:
        out = subprocess.check_output([sys.executable, "-m", "tuner.plan.probe", what], text=True, timeout=timeout)
        return json.loads(out.splitlines()[-1])[what]
    except (subprocess.SubprocessError, ValueError, IndexError, KeyError, OSError):
        return None


if __name__ == "__main__":  # pragma: no cover - the GPU link probe's child process
    if sys.argv[1:] == ["link"]:
        print(json.dumps({"link": link_bandwidth()}))

"""`tuner estimate` as a library: plan memory (and, with the rig probe, speed) for models from GGUF metadata alone.

One call does what the command does, in the same order, and returns data; the command only parses and prints:

    from tuner.plan.estimate import estimate
    est = estimate("models/dense-q4_k_m.gguf", ctx=[4096, 8192], ram=64 * 2**30, vram=24 * 2**30,
                   what_if=["q8_0", "iq2_xxs"])
    m = est.models[0]
    m.contexts[0]["max_gpu_layers"], m.contexts[0]["fits"], m.what_if[1]["size_bytes"]
    est.to_list()  # what `tuner estimate --json` prints

Bad input raises a `TunerError` subclass with the command's one-line message (the model: `ModelError`, a quant
type: `whatif.QuantTypeError`, the probe file: `probe.ProbeError`, the rest: `EstimateError`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import psutil

from tuner.errors import TunerError
from tuner.measure import hardware
from tuner.measure import rpc as rpclib
from tuner.model.meta import ModelInfo, read_model
from tuner.plan import planner, whatif
from tuner.plan.probe import load as load_probe
from tuner.plan.speed import rows as speed_rows
from tuner.record import TrialConfig
from tuner.units import headroom_bytes, physical_cores
from tuner.units import parse_headroom as units_headroom


class EstimateError(TunerError):
    """Bad input to `estimate` (a context list, the headroom, -ngl, --speed without a probe)."""


@dataclass
class ModelEstimate:
    """One model's plan: a row per context (planner.estimate), the what-if quants, the predicted speed."""

    info: ModelInfo
    ram: int
    vram: int
    headroom: float  # the share of memory kept free
    contexts: list[dict]  # one row per context: sizes, the largest -ngl that fits, the split, fits, warning, note
    what_if: list[dict]  # one row per --what-if quant: size, bits per weight, vs this file (+ predicted t/s)
    speed: list[dict] | None = None  # with speed: the file first, then each what-if quant (tuner.plan.speed.rows)
    speed_shape: dict | None = None  # the probe's test shape the speed is predicted at (n_prompt, n_gen)
    devices: list[dict] = field(default_factory=list)  # each device planned for: name (its buffers'), vram

    def to_dict(self) -> dict:
        """One element of `tuner estimate --json`."""
        d = {
            "model": self.info.path,
            "arch": self.info.arch,
            "n_params": self.info.n_params,
            "file_size": self.info.file_size,
            "shards": len(self.info.shards),
            "ram": self.ram,
            "vram": self.vram,
            "devices": self.devices,
            "headroom": self.headroom,
            "contexts": self.contexts,
            "what_if": self.what_if,
        }
        if self.speed is not None:
            d["speed"], d["speed_shape"] = self.speed, self.speed_shape
        return d


@dataclass
class Estimate:
    """The plan for every model, against one machine's memory (given or detected)."""

    ram: int
    vram: int
    headroom: float
    quants: list[str] = field(default_factory=list)  # the what-if quant types, as given
    probe: dict | None = None  # the rig probe the speed was predicted from (None: no speed asked)
    models: list[ModelEstimate] = field(default_factory=list)

    def to_list(self) -> list[dict]:
        """What `tuner estimate --json` prints: one object per model."""
        return [m.to_dict() for m in self.models]

    def to_json(self) -> str:
        return json.dumps(self.to_list(), indent=2)


def parse_ctx_list(text: str | int | Iterable[int]) -> list[int]:
    """'4096,8192' (or an int, or a list of ints) → [4096, 8192]."""
    if isinstance(text, str):
        try:
            vals = [int(x) for x in text.replace(" ", "").split(",") if x]
        except ValueError:
            raise EstimateError(f"--ctx: not a list of context sizes: {text!r} (e.g. 4096,8192)") from None
    else:
        vals = [text] if isinstance(text, int) else list(text)
    if not vals or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals):
        raise EstimateError(f"--ctx: context sizes must be positive integers, got {text!r}")
    return vals


def parse_headroom(text: str | int | float, ram: int) -> float:
    """The shared --headroom spelling ('5%', '0.05' or '1GiB'; a float is a share, an int bytes) as the share of
    memory the planner keeps free."""
    try:
        h = units_headroom(text)
    except ValueError as e:
        raise EstimateError(f"--headroom: {e}") from None
    v = h if isinstance(h, float) else headroom_bytes(h, ram) / ram
    if not 0 <= v < 0.9:
        raise EstimateError(f"--headroom must be between 0 and 90% of memory, got {text!r}")
    return v


def parse_quants(what_if: str | Iterable[str] | None) -> list[str]:
    """'q8_0,q4_k_m' (or a list) → the quant types, each checked (whatif.QuantTypeError names an unknown one)."""
    if not what_if:
        return []
    items = what_if.split(",") if isinstance(what_if, str) else what_if
    quants = [q.strip() for q in items if q.strip()]
    for q in quants:
        whatif.ftype_key(q)
    return quants


def estimate(
    models: str | os.PathLike | ModelInfo | Iterable[str | os.PathLike | ModelInfo],
    ctx: str | int | Iterable[int] = 4096,
    *,
    ram: int | None = None,
    vram: int | list[int] | None = None,
    headroom: str | int | float = "5%",
    base: TrialConfig | None = None,
    n_gpu_layers: int | None = None,
    what_if: str | Iterable[str] | None = None,
    calib: planner.Calibration | Iterable[str | os.PathLike] | None = None,
    speed: bool = False,
    threads: int | None = None,
    probe: str | os.PathLike | dict | None = None,
    rpc: str | Iterable[str] | None = None,
) -> Estimate:
    """Plan memory for `models` (paths or ModelInfo) at each context of `ctx`, as `tuner estimate` does.

    ram: host RAM to plan for (default: this machine's total); vram: GPU memory, one device's or a list of each
    device's (default: the GPUs NVML detects, 0 without one); rpc: llama.cpp RPC servers ("host:port,...") whose
    devices join the GPUs, first, as llama-server --rpc adds them (each as large as it reports itself); headroom:
    kept free, a share or a size ('5%', 0.05, '2GiB'); base: the llama.cpp config
    (batch sizes, KV cache types, flash attention, mmap, n_cpu_moe/cpu_moe; its model and n_ctx are ignored);
    n_gpu_layers: the split for this many layers (-1: all) instead of the largest that fits; what_if: quant
    types to size each model in; calib: a Calibration or Parquet results of this rig to calibrate from;
    speed: predict tg and pp t/s of the file and each what-if quant from the rig probe (`probe`: a probe file or
    its loaded dict; default: this machine's and build's; read only with speed), on `threads` threads (default:
    the physical cores).
    Every input is checked before any model is planned.
    """
    ctxs = parse_ctx_list(ctx)
    if ram is None:
        ram = psutil.virtual_memory().total
    hr = parse_headroom(headroom, ram)
    remote = hardware.rpc_devices(rpclib.reachable(rpc))
    if vram is None:
        gpus = hardware.offload_gpus(hardware.probe())
        local, local_names = [g.vram_total for g in gpus], [g.device for g in gpus]
    else:
        local = [int(v) for v in vram] if isinstance(vram, (list, tuple)) else ([int(vram)] if vram else [])
        local_names = [f"CUDA{i}" for i in range(len(local))]
    totals = [d["total"] for d in remote] + local
    names = tuple(hardware.buffer_name(d) for d in remote) + tuple(local_names)
    # an RPC device's memory holds llama.cpp's buffers only; a GPU also a CUDA context (the planner's default)
    baselines = [0] * len(remote) + [planner.DEFAULT_BASELINE_VRAM] * len(local) if remote else None
    devices = [{"name": n, "vram": v} for n, v in zip(names, totals)]
    quants = parse_quants(what_if)
    if n_gpu_layers is not None and n_gpu_layers < -1:
        raise EstimateError(f"-ngl must be -1 (all layers) or more, got {n_gpu_layers}")
    if calib is not None and not isinstance(calib, planner.Calibration):
        calib = list(calib)
        calib = planner.Calibration.from_store(calib) if calib else None
    items = [models] if isinstance(models, (str, os.PathLike, ModelInfo)) else list(models)
    infos = [m if isinstance(m, ModelInfo) else read_model(m) for m in items]
    probe_data = speed_probe(probe) if speed else None
    base = base or TrialConfig(model="")
    out = Estimate(ram=ram, vram=sum(totals), headroom=hr, quants=quants, probe=probe_data)
    for info in infos:
        m = ModelEstimate(
            info=info,
            ram=ram,
            vram=sum(totals),
            headroom=hr,
            contexts=planner.estimate(info, ctxs, ram, totals or 0, hr, base, calib, n_gpu_layers, names, baselines),
            what_if=whatif.what_if(info, quants) if quants else [],
            devices=devices,
        )
        if probe_data is not None:
            add_speed(m, probe_data, quants, threads, n_gpu_layers, base)
        out.models.append(m)
    return out


# -- speed: predicted t/s from the rig probe (tuner.plan.speed) ----------------------------------------------------


def speed_probe(path: str | os.PathLike | dict | None) -> dict:
    """This rig's probe (a loaded one as it is), or a one-line error: estimate stays instant, so it never runs
    the probe itself."""
    if isinstance(path, dict):
        return path
    data = load_probe(path)
    if data is None:
        raise EstimateError("--speed needs this rig's probe: run `tuner probe` once (a few minutes), then again")
    return data


def add_speed(
    m: ModelEstimate,
    probe_data: dict,
    quants: list[str],
    threads: int | None,
    n_gpu_layers: int | None,
    base: TrialConfig,
) -> None:
    """The speed rows of the file and each what-if quant, at the -ngl asked for or the largest that fits (first
    context) when the probe and this build have a GPU; each what-if row gets its predicted t/s."""
    gpu = bool(probe_data.get("gpu")) and bool(hardware.build_info().get("gpu_offload"))
    ngl = n_gpu_layers if n_gpu_layers is not None else (m.contexts[0]["max_gpu_layers"] if gpu and m.contexts else 0)
    rows = speed_rows(
        m.info,
        probe_data,
        quants,
        threads or physical_cores(),
        n_gpu_layers=ngl or 0,
        n_cpu_moe=base.n_cpu_moe,
        cpu_moe=base.cpu_moe,
        gpu_offload=gpu,
    )
    m.speed = rows
    m.speed_shape = probe_data["shape"]
    for w in m.what_if:
        r = next(r for r in rows if not r["file"] and r["quant"] == w["quant"])
        w["pred_tg_tps"], w["pred_pp_tps"] = r["pred_tg_tps"], r["pred_pp_tps"]

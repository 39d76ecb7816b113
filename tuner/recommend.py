"""The recommendation: the fastest measured config that fits, with its proof and ready-to-use forms.

Derived only from recorded trials, so `tuner recommend STUDY --max-ram ...` can re-derive it under other
constraints without running anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import tempfile
from pathlib import Path

from tuner.record import TrialConfig, TrialRecord, utcnow

RECOMMENDED_FILE = "recommended.json"
SPLIT_MODE_INT = {"none": 0, "layer": 1, "row": 2}
BASELINES = ("llama.cpp defaults", "heuristic")


def caps(hw, limits) -> tuple[float, float | None]:
    """RAM and VRAM a config may use: the machine's total minus the headroom, or the user's limit if lower."""
    from tuner.options import headroom_bytes

    ram = min(x for x in (limits.max_ram, hw.ram_total - headroom_bytes(limits.headroom, hw.ram_total))
              if x is not None)
    vram_total = sum(g.vram_total for g in hw.gpus)
    vram_caps = [x for x in (limits.max_vram, vram_total - headroom_bytes(limits.headroom, vram_total)
                             if vram_total else None) if x is not None]
    return ram, (min(vram_caps) if vram_caps else None)


def fits(r: TrialRecord, hw, limits) -> bool:
    ram, vram = caps(hw, limits)
    if r.config.effective_ctx() < limits.min_ctx:
        return False
    if r.peak_rss_bytes and r.peak_rss_bytes > ram:
        return False
    if vram is not None and r.peak_vram_bytes and r.peak_vram_bytes > vram:
        return False
    return True


def recommend(records: list[TrialRecord], hw, limits, objective: str = "tg", study: str = "",
              pareto: bool = False) -> dict | None:
    """The best ok trial within the limits (trials measured under drift only when nothing else fits)."""
    objective = "tg" if pareto else objective
    ok = [r for r in records if r.ok and r.state != "anchor" and r.objective(objective) is not None]
    fitting = [r for r in ok if fits(r, hw, limits)]
    pool = [r for r in fitting if not r.drift] or fitting
    if not pool:
        return None
    sign = -1 if objective == "ttft" else 1
    best = max(pool, key=lambda r: sign * r.objective(objective))
    ram_cap, vram_cap = caps(hw, limits)
    out = {
        "study": study,
        "created_utc": utcnow(),
        "objective": objective,
        "trial_number": best.trial_number,
        "config": best.config.to_dict(),
        "measured": measured(best),
        "headroom_left": {"ram_bytes": int(ram_cap - (best.peak_rss_bytes or 0)),
                          "vram_bytes": int(vram_cap - (best.peak_vram_bytes or 0)) if vram_cap else None},
        "limits": {"min_ctx": limits.min_ctx, "max_ram": limits.max_ram, "max_vram": limits.max_vram,
                   "headroom": limits.headroom},
        "baselines": baselines(records, best, objective),
        "drift": best.drift,
        "trials": {"total": sum(1 for r in records if r.state != "anchor"), "ok": len(ok),
                   "fitting": len(fitting)},
        "hw_fingerprint": best.hw_fingerprint,
        "build_fingerprint": best.build_fingerprint,
        "model": {"path": best.config.model, "name": best.model_name, "file_type": best.model_file_type,
                  "size_bytes": best.model_size_bytes, "hash": best.model_hash},
        "forms": forms(best.config, best),
    }
    if pareto:
        out["pareto_front"] = pareto_front(fitting)
    return out


def measured(r: TrialRecord) -> dict:
    row = r.to_row()
    keys = ("tg_ts_mean", "tg_ts_sd", "pp_ts_mean", "pp_ts_sd", "ttft_ms_mean", "ttft_ms_sd", "peak_rss_bytes",
            "peak_vram_bytes", "load_ms", "tg_roofline_pct")
    out = {k: row.get(k) for k in keys}
    out.update(tg_samples=r.tg_samples, pp_samples=r.pp_samples, repetitions=r.config.repetitions,
               n_prompt=r.config.n_prompt, n_gen=r.config.n_gen)
    return out


def baselines(records: list[TrialRecord], best: TrialRecord, objective: str) -> dict:
    """How far measurement beats guessing: the enqueued baselines against the recommendation."""
    out = {}
    v_best = best.objective(objective)
    for label in BASELINES:
        r = next((x for x in records if x.baseline == label), None)
        if r is None:
            continue
        v = r.objective(objective) if r.ok else None
        entry = {"trial_number": r.trial_number, "outcome": r.outcome, "cause": r.cause,
                 "n_gpu_layers": r.config.n_gpu_layers, objective: v}
        if v and v_best:
            entry["recommended_vs_baseline"] = (v / v_best) if objective == "ttft" else (v_best / v)
        out[label] = entry
    return out


def pareto_front(recs: list[TrialRecord]) -> list[dict]:
    pts = [(r.metric("tg")[0] or 0.0, (r.peak_rss_bytes or 0) + (r.peak_vram_bytes or 0), r) for r in recs]
    front = [p for p in pts if not any(q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1]) for q in pts)]
    return [{"trial_number": r.trial_number, "tg_ts_mean": tg, "peak_memory_bytes": mem}
            for tg, mem, r in sorted(front, key=lambda p: p[1])]


def forms(cfg: TrialConfig, rec: TrialRecord | None = None) -> dict:
    """The config as llama-cpp-python kwargs, a llama-server command line, an Ollama Modelfile, tuner bench."""
    import gguf

    fa = (rec.flash_attn_resolved if rec and rec.flash_attn_resolved else cfg.flash_attn)
    cfg = dataclasses.replace(cfg, model=os.path.abspath(cfg.model))  # forms must run from any folder
    ctx = cfg.effective_ctx()
    kwargs = {"model_path": cfg.model, "n_gpu_layers": cfg.n_gpu_layers, "n_ctx": ctx, "n_batch": cfg.n_batch,
              "n_ubatch": cfg.n_ubatch, "n_threads": cfg.n_threads, "n_threads_batch": cfg.n_threads_batch,
              # Llama() takes a bool: what llama.cpp resolved `auto` to in the measured trial
              "flash_attn": fa == "on",
              "type_k": int(gguf.GGMLQuantizationType[cfg.type_k.upper()]),
              "type_v": int(gguf.GGMLQuantizationType[cfg.type_v.upper()]),
              "use_mmap": cfg.use_mmap, "use_mlock": cfg.use_mlock,
              "split_mode": SPLIT_MODE_INT[cfg.split_mode], "main_gpu": cfg.main_gpu}
    if cfg.tensor_split:
        kwargs["tensor_split"] = [float(x) for x in cfg.tensor_split.split(",")]
    argv = ["llama-server", "-m", cfg.model, "-ngl", str(cfg.n_gpu_layers), "-c", str(ctx),
            "-t", str(cfg.n_threads), "-tb", str(cfg.n_threads_batch), "-b", str(cfg.n_batch),
            "-ub", str(cfg.n_ubatch), "-fa", cfg.flash_attn, "-ctk", cfg.type_k, "-ctv", cfg.type_v]
    load_mode = {(True, False): None, (False, False): "none", (True, True): "mmap+mlock", (False, True): "mlock"}
    if load_mode[(cfg.use_mmap, cfg.use_mlock)]:
        argv += ["-lm", load_mode[(cfg.use_mmap, cfg.use_mlock)]]
    if cfg.split_mode != "layer":
        argv += ["-sm", cfg.split_mode]
    if cfg.main_gpu:
        argv += ["-mg", str(cfg.main_gpu)]
    if cfg.tensor_split:
        argv += ["-ts", cfg.tensor_split]
    for o in cfg.overrides:
        argv += ["-ot", o]
    if cfg.cpu_moe:
        argv += ["--cpu-moe"]
    if cfg.n_cpu_moe:
        argv += ["--n-cpu-moe", str(cfg.n_cpu_moe)]
    modelfile = "\n".join([f"FROM {cfg.model}", f"PARAMETER num_gpu {cfg.n_gpu_layers}", f"PARAMETER num_ctx {ctx}",
                           f"PARAMETER num_thread {cfg.n_threads}", f"PARAMETER num_batch {cfg.n_batch}"])
    out = {"llama_cpp_python": kwargs, "llama_server": shlex.join(argv), "llama_server_argv": argv,
           "ollama_modelfile": modelfile, "tuner": cfg.to_dict(),
           "tuner_bench": shlex.join(["tuner", "bench", "--config", RECOMMENDED_FILE])}
    if cfg.overrides or cfg.n_cpu_moe or cfg.cpu_moe:
        out["notes"] = ["llama_cpp.Llama() has no tensor-override parameter: the expert placement "
                        "(--n-cpu-moe / -ot) applies in llama-server and `tuner bench --config`; Ollama "
                        "Modelfiles cannot express it either"]
    return out


def write(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)

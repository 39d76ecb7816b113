"""The recommendation: the fastest measured config that fits, with its proof and ready-to-use forms.

Derived only from recorded trials, so `tuner recommend STUDY --max-ram ...` can re-derive it under other
constraints without running anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import statistics
from pathlib import Path

import gguf

from tuner import files, stats
from tuner.measure import hardware
from tuner.record import TrialConfig, TrialRecord, moe_part_pattern, parse_tensor_split, summarize, utcnow
from tuner.search import confirm
from tuner.search.confirm import objective_samples
from tuner.search.feasible import caps, device_caps

RECOMMENDED_FILE = "recommended.json"
VERIFY_FILE = "verify.json"  # `tuner verify`: the recommendation served and measured by a client
SPLIT_MODE_INT = {"none": 0, "layer": 1, "row": 2}
# every baseline a search enqueues (tuner.search.baselines), in the order reports list them
BASELINES = (
    confirm.ROLE_FIT,
    confirm.ROLE_BASELINE,
    "heuristic",
    confirm.ROLE_RECIPE,
)


def fits(r: TrialRecord, hw, limits) -> bool:
    """A measured trial within the limits: its peak RSS within usable RAM, each GPU's peak within that GPU's
    budget (tuner.search.feasible.device_caps), and all GPUs together within --max-vram. VRAM that is unknown (null:
    NVML saw
    neither the process nor the device) cannot be checked and does not exclude the trial."""
    ram, vram = caps(hw, limits)
    if r.config.effective_ctx() < limits.min_ctx:
        return False
    if r.peak_rss_bytes and r.peak_rss_bytes > ram:
        return False
    if vram is not None and r.peak_vram_bytes and r.peak_vram_bytes > vram:
        return False
    # the GPUs llama.cpp places on (a hidden one's figures, last in the record, are not compared)
    per_gpu = device_caps([g.vram_total for g in hardware.offload_gpus(hw)], limits)
    return not any(p > c for p, c in zip(r.peak_vram_by_gpu or [], per_gpu))


def recommend(
    records: list[TrialRecord],
    hw,
    limits,
    objective: str = "mixed",
    study: str = "",
    pareto: bool = False,
    quality=None,
) -> dict | None:
    """The recommended config: decided on the confirmation's samples when there are any, else on the pooled
    estimate of every config (all trials of one config are one estimate, never rivals).

    `quality` (tuner.quality.StudyQuality): only configs whose model file (and KV-cache types) meet its budget
    are recommended; the others stay in the `quality` object, with their best speed, to show what they cost."""

    def allowed(r: TrialRecord) -> bool:
        return quality is None or quality.judge(r)[0]

    objective = "tg" if pareto else objective
    searched = [r for r in records if r.state not in ("anchor", confirm.CONFIRM_STATE)]
    ok = [r for r in searched if r.ok and r.objective(objective) is not None]
    groups = confirm.pool(ok)
    fitting = [g for g in groups if all(fits(r, hw, limits) for r in g.records)]
    within = [g for g in fitting if allowed(g.records[0])]
    pool_ = confirm.prefer_clean(within)
    if not pool_:
        return None
    sign = -1 if objective == "ttft" else 1
    # the working context: the largest the user asked for at which something fits (a list is a ladder)
    asked = max(r.config.effective_ctx() for r in searched)
    working = max(g.config.effective_ctx() for g in pool_)
    at_work = [g for g in pool_ if g.config.effective_ctx() == working]
    by_key = {g.key: g for g in groups}
    every = confirm.candidates_from_records(records)
    cands = [c for c in every if not c.is_rung]
    verdict = None
    if cands:
        verdict = confirm.assess(
            cands,
            objective,
            fits=lambda c: (
                all(fits(r, hw, limits) for r in c.records if r.ok)
                and c.config.effective_ctx() == working
                and all(allowed(r) for r in c.records)
            ),
        )
    winner_c = next(
        (
            c
            for c in cands
            if verdict and verdict.get("winner_key") is not None and list(c.config.key()) == verdict["winner_key"]
        ),
        None,
    )
    if winner_c is not None:
        best_recs = [r for r in winner_c.records if r.ok]
        group = by_key.get(winner_c.config.key())
        trial_number = winner_c.trial_number
    else:
        group = max(at_work, key=lambda g: sign * g.estimate(objective))
        best_recs, trial_number = group.records, group.trial_number
        reason = (
            "no confirmation was run (--no-confirm, or the budget ended first)"
            if not cands
            else "no confirmed candidate meets these limits"
        )
        verdict = {
            "verdict": "unconfirmed",
            "reason": reason + ": the figures are the search's own trials, "
            "where the best of many noisy trials reads high (the winner's curse)",
        }
    best = best_recs[0]
    ram_cap, vram_cap = caps(hw, limits)
    peak_rss = max((r.peak_rss_bytes or 0 for r in best_recs + (group.records if group else [])), default=0)
    peak_vram = max((r.peak_vram_bytes or 0 for r in best_recs + (group.records if group else [])), default=0)
    out = {
        "study": study,
        "created_utc": utcnow(),
        "objective": objective,
        "trial_number": trial_number,
        "config": best.config.to_dict(),
        "working_ctx": working,
        "measured": measured(best_recs),
        "headroom_left": {
            "ram_bytes": int(ram_cap - peak_rss),
            "vram_bytes": int(vram_cap - peak_vram) if vram_cap else None,
        },
        "limits": {
            "min_ctx": limits.min_ctx,
            "max_ram": limits.max_ram,
            "max_vram": limits.max_vram,
            "headroom": limits.headroom,
        },
        "confirmation": verdict,
        "baselines": (bases := baselines(searched, best_recs, objective, verdict)),
        "vs_defaults": headline(bases),
        "drift": any(r.drift for r in best_recs),
        "trials": {
            "total": len(searched),
            "ok": len(ok),
            "configs": len(groups),
            "fitting_configs": len(fitting),
            "confirmation_runs": sum(len(c.records) for c in cands),
        },
        "hw_fingerprint": best.hw_fingerprint,
        "build_fingerprint": best.build_fingerprint,
        "model": {
            "path": best.config.model,
            "name": best.model_name,
            "file_type": best.model_file_type,
            "size_bytes": best.model_size_bytes,
            "hash": best.model_hash,
        },
        "forms": forms(best.config, best),
    }
    if best.config.n_seq:
        out["parallel"] = parallel(best_recs)
    notes = []
    if working < asked:
        notes.append(f"nothing fit within the limits at the largest context asked ({asked}); recommended at {working}")
    if limits.max_vram and any(r.ok and r.vram_by == "none" for r in searched):
        notes.append(
            "--max-vram could not be checked on every trial: NVML reported no VRAM for some workers "
            "(vram_by none); those trials are judged on host memory only"
        )
    if notes:
        out["notes"] = notes
    rungs = [c for c in every if c.is_rung]
    ladder = context_ladder([c for c in rungs if c.ladder == trial_number], objective)
    if ladder:
        out["context_ladder"] = ladder
    elif rungs:
        notes.append(
            "the context ladder was measured for trial(s) "
            + ", ".join(f"#{n}" for n in sorted({c.ladder for c in rungs if c.ladder is not None}))
            + ", not this recommendation (these limits chose another config)"
        )
        out["notes"] = notes
    if pareto:
        out["pareto_front"] = pareto_front([r for g in within for r in g.records])
    if quality is not None:
        out["quality"] = quality_summary(fitting, quality, objective, best)
    return out


def quality_summary(groups, quality, objective: str, best: TrialRecord) -> dict:
    """Per model file (and KV-cache types): its quality figures, within the budget or not, and its best pooled
    speed among the configs that fit, so a faster quant left out shows what it would have cost."""
    sign = -1 if objective == "ttft" else 1
    files = []
    for res in quality.results:
        mine = [
            g
            for g in groups
            if (g.records[0].model_hash, g.config.type_k, g.config.type_v) == (res.model_hash, res.type_k, res.type_v)
        ]
        top = max(mine, key=lambda g: sign * g.estimate(objective), default=None)
        ok, why = quality.budget.judge(res)
        files.append(
            {
                "model": res.model,
                "file_type": res.file_type,
                "type_k": res.type_k,
                "type_v": res.type_v,
                "outcome": res.outcome,
                "kld_mean": res.kld_mean,
                "kld_mean_err": res.kld_mean_err,
                "same_top_pct": res.same_top_pct,
                "ppl_ratio": res.ppl_ratio,
                "is_reference": res.is_reference,
                "within_budget": ok,
                "reason": why,
                "best_objective": top.estimate(objective) if top else None,
                "best_tg_ts": measured(top.records)["tg_ts_mean"] if top else None,
                "best_trial_number": top.trial_number if top else None,
                "peak_rss_bytes": top.peak_rss if top else None,
                "recommended": res.model_hash == best.model_hash
                and (res.type_k, res.type_v) == (best.config.type_k, best.config.type_v),
            }
        )
    r0 = quality.results[0] if quality.results else None
    return {
        "budget": {"max_kld": quality.budget.max_kld, "min_same_top": quality.budget.min_same_top},
        "reference": r0.reference if r0 else None,
        "text": r0.text if r0 else None,
        "ctx": r0.ctx if r0 else None,
        "files": files,
    }


def measured(recs: list[TrialRecord]) -> dict:
    """Figures over every repetition of these runs of one config (pooled), with the worst memory peak."""
    out = {}
    for name, unit in (("tg", "ts"), ("pp", "ts"), ("ttft", "ms")):
        samples = [x for r in recs for x in r.samples(name)]
        out[f"{name}_{unit}_mean"], out[f"{name}_{unit}_sd"] = summarize(samples)
        out[f"{name}_samples"] = samples
    out["peak_rss_bytes"] = max((r.peak_rss_bytes for r in recs if r.peak_rss_bytes), default=None)
    out["peak_vram_bytes"] = max((r.peak_vram_bytes for r in recs if r.peak_vram_bytes is not None), default=None)
    out["load_ms"] = statistics.median([r.load_ms for r in recs if r.load_ms is not None] or [0]) or None
    rows = [r.to_row() for r in recs]
    pct = [x["tg_roofline_pct"] for x in rows if x.get("tg_roofline_pct")]
    out["tg_roofline_pct"] = statistics.median(pct) if pct else None
    c = recs[0].config
    out.update(runs=len(recs), repetitions=c.repetitions, n_prompt=c.n_prompt, n_gen=c.n_gen, n_depth=c.n_depth)
    return out


def parallel(recs: list[TrialRecord]) -> dict:
    """--parallel N: the sequences served together, all N (aggregate, llama-batched-bench's S_TG, S_PP) and one of
    them, over every repetition of these runs of one config."""
    c = recs[0].config

    def mean(name):
        return summarize([x for r in recs for x in r.samples(name)])[0]

    by_stream = [r.ttft_stream_ms for r in recs if r.ttft_stream_ms]
    return {
        "n_seq": c.n_seq,
        "kv_unified": c.kv_unified,
        "n_ctx_per_seq": c.seq_cells(),
        "aggregate_tg_tps": mean("tg"),
        "per_stream_tg_tps": mean("tg_stream"),
        "aggregate_pp_tps": mean("pp"),
        "per_stream_pp_tps": mean("pp_stream"),
        "ttft_ms_per_stream": [statistics.fmean(x) for x in zip(*by_stream)] if by_stream else [],
    }


def baselines(records: list[TrialRecord], best: list[TrialRecord], objective: str, verdict: dict | None) -> dict:
    """How far measurement beats guessing. The llama.cpp-defaults figure comes from the confirmation (winner and
    baseline measured interleaved, with an interval); without one it is the search's best against a single
    trial, which is marked as such."""
    out = {}
    # the figure every ranking uses (tuner.stats.center): the median of the trial values
    v_best = stats.center([v for r in best if (v := stats.trial_value(_obj(r, objective))) is not None])
    for label in BASELINES:
        # at the recommendation's context: a ladder search that stepped down ran its baselines again there
        ctx = best[0].config.effective_ctx() if best else None
        r = next((x for x in records if x.baseline == label and x.config.effective_ctx() == ctx), None) or next(
            (x for x in records if x.baseline == label), None
        )
        if r is None:
            continue
        v = stats.trial_value(_obj(r, objective)) if r.ok else None
        entry = {
            "trial_number": r.trial_number,
            "outcome": r.outcome,
            "cause": r.cause,
            "n_gpu_layers": r.config.n_gpu_layers,
            objective: v,
        }
        vs = (verdict or {}).get({confirm.ROLE_BASELINE: "vs_baseline", confirm.ROLE_FIT: "vs_fit"}.get(label, ""))
        if vs:
            entry.update(
                recommended_vs_baseline=vs["ratio"], ci95=vs["ci95"], verdict=vs["verdict"], source="confirmation"
            )
        elif v and v_best:
            entry.update(
                recommended_vs_baseline=(v / v_best) if objective == "ttft" else (v_best / v),
                source="search trials (unconfirmed: one baseline trial against the best of many)",
            )
        out[label] = entry
    return out


def headline(bases: dict) -> dict | None:
    """The "x the llama.cpp defaults" figure: against llama-server's own placement (--fit, on by default) wherever
    it was measured and ran, else against llama.cpp's all-layers defaults; None when neither ran."""
    for label in confirm.BASELINE_ROLES:
        b = bases.get(label)
        if b and b.get("recommended_vs_baseline"):
            keys = ("recommended_vs_baseline", "ci95", "verdict", "source", "trial_number")
            return {"against": label, **{k: b[k] for k in keys if k in b}}
    return None


def _obj(r: TrialRecord, objective: str) -> list[float]:
    return objective_samples(r, objective)


def context_ladder(rungs: list[confirm.Candidate], objective: str) -> list[dict]:
    """What a filled context costs on this rig: per rung of the ladder (tuner.search.confirm.run_ladder), the
    recommended
    config and the llama.cpp defaults at the same context and depth, measured interleaved, with the paired ratio;
    and each alternative in a context-dependent dimension (or the control) against the recommended config."""
    rows = []
    for f in confirm.rung_figures(rungs, objective):
        rec, base = f["recommended"], f["defaults"]  # base is rec when the recommendation is the defaults
        row = {
            "n_ctx": f["n_ctx"],
            "n_depth": f["n_depth"],
            "trial_number": rec.trial_number,
            "confirmed": True,
            "rounds": f["rounds"],
            "config": confirm.short_config(rec.config),
            **rung_metrics(rec, objective),
        }
        if base is not None:
            row["defaults"] = {
                "trial_number": base.trial_number,
                "config": confirm.short_config(base.config),
                **rung_metrics(base, objective),
            }
        if "vs_defaults" in f:
            row["vs_defaults"] = f["vs_defaults"]
        row["alternatives"] = [
            {
                "trial_number": c.trial_number,
                "kind": "context-dependent" if c.has(confirm.RUNG_ALT) else "control",
                "differs": differs(rec.config, c.config),
                "objective": c.figure(objective),
                "ratio_vs_recommended": vs["ratio"],
                "ci95": vs["ci95"],
                "p": vs["p"],
                "verdict": vs["verdict"],
            }
            for c, vs in f["alternatives"]
        ]
        rows.append(row)
    return rows


def rung_metrics(c: confirm.Candidate, objective: str) -> dict:
    """A rung candidate's figures: the median over its runs of each run's median (tuner.stats.center), and the
    worst memory peak."""
    ok = [r for r in c.records if r.ok]

    def center(name):
        return stats.center([v for r in ok if (v := stats.trial_value(r.samples(name))) is not None])

    return {
        "objective": c.figure(objective),
        "tg_ts": center("tg"),
        "pp_ts": center("pp"),
        "ttft_ms": center("ttft"),
        "failed_runs": sum(not r.ok for r in c.records),
        "peak_rss_bytes": max((r.peak_rss_bytes for r in ok if r.peak_rss_bytes), default=None),
        "peak_vram_bytes": max((r.peak_vram_bytes for r in ok if r.peak_vram_bytes is not None), default=None),
    }


def differs(a: TrialConfig, b: TrialConfig) -> dict:
    """The parameters in which b differs from a, with b's values."""
    da, db = confirm.short_config(a), confirm.short_config(b)
    return {k: db[k] for k in da if da[k] != db[k]}


def pareto_front(recs: list[TrialRecord]) -> list[dict]:
    pts = [(r.metric("tg")[0] or 0.0, (r.peak_rss_bytes or 0) + (r.peak_vram_bytes or 0), r) for r in recs]
    front = [p for p in pts if not any(q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1]) for q in pts)]
    return [
        {"trial_number": r.trial_number, "tg_ts_mean": tg, "peak_memory_bytes": mem}
        for tg, mem, r in sorted(front, key=lambda p: p[1])
    ]


def forms(cfg: TrialConfig, rec: TrialRecord | None = None) -> dict:
    """The config as llama-cpp-python kwargs, a llama-server command line, an Ollama Modelfile, tuner bench."""
    fa = rec.flash_attn_resolved if rec and rec.flash_attn_resolved else cfg.flash_attn
    cfg = dataclasses.replace(cfg, model=os.path.abspath(cfg.model))  # forms must run from any folder
    ctx = cfg.effective_ctx()
    kwargs = {
        "model_path": cfg.model,
        "n_gpu_layers": cfg.n_gpu_layers,
        "n_ctx": ctx,
        "n_batch": cfg.n_batch,
        "n_ubatch": cfg.n_ubatch,
        "n_threads": cfg.n_threads,
        "n_threads_batch": cfg.n_threads_batch,
        # Llama() takes a bool: what llama.cpp resolved `auto` to in the measured trial
        "flash_attn": fa == "on",
        "type_k": int(gguf.GGMLQuantizationType[cfg.type_k.upper()]),
        "type_v": int(gguf.GGMLQuantizationType[cfg.type_v.upper()]),
        "use_mmap": cfg.use_mmap,
        "use_mlock": cfg.use_mlock,
        "split_mode": SPLIT_MODE_INT[cfg.split_mode],
        "main_gpu": cfg.main_gpu,
    }
    if cfg.tensor_split:
        kwargs["tensor_split"] = parse_tensor_split(cfg.tensor_split)
    argv = [
        "llama-server",
        "-m",
        cfg.model,
        "-ngl",
        str(cfg.n_gpu_layers),
        "-c",
        str(ctx),
        "-t",
        str(cfg.n_threads),
        "-tb",
        str(cfg.n_threads_batch),
        "-b",
        str(cfg.n_batch),
        "-ub",
        str(cfg.n_ubatch),
        "-fa",
        cfg.flash_attn,
        "-ctk",
        cfg.type_k,
        "-ctv",
        cfg.type_v,
    ]
    load_mode = {(True, False): None, (False, False): "none", (True, True): "mmap+mlock", (False, True): "mlock"}
    if load_mode[(cfg.use_mmap, cfg.use_mlock)]:
        argv += ["-lm", load_mode[(cfg.use_mmap, cfg.use_mlock)]]
    if cfg.split_mode != "layer":
        argv += ["-sm", cfg.split_mode]
    if cfg.main_gpu:
        argv += ["-mg", str(cfg.main_gpu)]
    if cfg.tensor_split:
        argv += ["-ts", ",".join(f"{x:g}" for x in parse_tensor_split(cfg.tensor_split))]  # llama-server: 3,1
    for o in cfg.overrides:
        argv += ["-ot", o]
    if cfg.cpu_moe:
        argv += ["--cpu-moe"]
    if cfg.n_cpu_moe:
        argv += ["--n-cpu-moe", str(cfg.n_cpu_moe)]
    if cfg.moe_part != "none" and not cfg.cpu_moe:  # after --n-cpu-moe: llama-server keeps the order given
        argv += ["-ot", f"{moe_part_pattern(cfg.n_cpu_moe, cfg.moe_part)}=CPU"]
    if cfg.rpc:
        argv += ["--rpc", cfg.rpc]  # llama-server's spelling: host:port,host:port
    if cfg.n_seq:
        # the slots measured; -kvu or -no-kvu always, since llama-server's auto slot count turns -kvu on
        argv += ["-np", str(cfg.n_seq), "-kvu" if cfg.kv_unified else "-no-kvu"]
    modelfile = "\n".join(
        [
            f"FROM {cfg.model}",
            f"PARAMETER num_gpu {cfg.n_gpu_layers}",
            f"PARAMETER num_ctx {ctx}",
            f"PARAMETER num_thread {cfg.n_threads}",
            f"PARAMETER num_batch {cfg.n_batch}",
            # Ollama mmaps by default (use_mmap is one of its runner options, api/types.go)
            *([] if cfg.use_mmap else ["PARAMETER use_mmap false"]),
        ]
        # Ollama sets the parallel requests per server, not per model (no PARAMETER for it)
        + ([f"# start the server with OLLAMA_NUM_PARALLEL={cfg.n_seq}"] if cfg.n_seq else [])
    )
    out = {
        "llama_cpp_python": kwargs,
        "llama_server": shlex.join(argv),
        "llama_server_argv": argv,
        "ollama_modelfile": modelfile,
        "tuner": cfg.to_dict(),
        "tuner_bench": shlex.join(["tuner", "bench", "--config", RECOMMENDED_FILE]),
    }
    notes = []
    if cfg.overrides or cfg.n_cpu_moe or cfg.cpu_moe or cfg.moe_part != "none":
        notes.append(
            "llama_cpp.Llama() has no tensor-override parameter: the expert placement "
            "(--n-cpu-moe / -ot) applies in llama-server and `tuner bench --config`; Ollama "
            "Modelfiles cannot express it either"
        )
    if cfg.rpc:
        notes.append(
            "llama_cpp.Llama() ignores RPC servers (llama-cpp-python 0.3.36 has no rpc_servers "
            "parameter): the RPC devices apply in llama-server --rpc and `tuner bench --config`"
        )
    if cfg.n_seq:
        out["parallel"] = {"n_seq_max": cfg.n_seq, "kv_unified": cfg.kv_unified}  # llama_context_params' names
        notes.append(
            f"llama_cpp.Llama() decodes one sequence at a time and takes no n_seq_max (its **kwargs would swallow "
            f"it): the {cfg.n_seq} parallel sequences measured apply in llama-server -np {cfg.n_seq} "
            "(llama_context_params n_seq_max / kv_unified for the low-level API) and Ollama's OLLAMA_NUM_PARALLEL"
        )
    if notes:
        out["notes"] = notes
    return out


def write(path: Path, data: dict) -> None:
    with files.atomic_file(path, text=True) as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")


def read_verified(study_dir: str | os.PathLike) -> dict | None:
    """STUDY/verify.json, or None when the study was never verified (or the file cannot be read)."""
    try:
        return json.loads((Path(study_dir) / VERIFY_FILE).read_text())
    except (OSError, ValueError):
        return None

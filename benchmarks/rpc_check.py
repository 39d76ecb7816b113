#!/usr/bin/env python3
"""The rig check on this machine: two llama.cpp RPC devices with memory caps, a MoE whose experts cannot all fit.

Starts two `tuner rpc-server --mem MEM` processes on 127.0.0.1 (each this CPU served as a device of MEM), then:

1. **search**: `tuner search` of the synthetic MoE (76.5 MiB of experts) over them, with the confirmation. Shown:
   the winner is in the hybrid region (every layer on the devices, experts of some layers, or of part of one, in
   host RAM); llama-server's own placement (--fit, its margin scaled to the devices with --fit-target) and the
   community recipe were measured; device OOMs are failed trials; the winner's ratio to --fit with its 95 %
   interval (the confirmation races them interleaved).
2. **verdicts and buffers**: every point of the hybrid region (n_cpu_moe x moe_part, all layers offloaded, the
   default split) measured once without the planner, and the planner's verdict on it (fits or not, per device)
   against what llama.cpp did (ran, or failed for memory on a device); for each config that ran, every buffer
   llama.cpp logged per device (model, KV, compute) against the planner's (tuner.plan.fit.device_usage: the same
   figures --fit plans with), as the search plans on RPC devices (the compute buffers sized by llama.cpp's own
   no_alloc load: tuner.plan.llama_sizes) and from the planner's model alone (`model_only_*`: what a described
   rig gets). Target: every buffer within 2 %.

    python benchmarks/rpc_check.py                   # ~1 min on 2 cores
    python benchmarks/rpc_check.py --mem 48MiB --trials 8

Writes benchmarks/results/rpc-check-*.json; exits 1 when a check fails (the winner outside the hybrid region, a
baseline not measured, a wrong planner verdict, a buffer off by more than 2 %).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import MODEL_CACHE as CACHE  # noqa: E402
from benchmarks._results import model_facts, save  # noqa: E402
from tuner.measure import hardware, rpc, store  # noqa: E402
from tuner.measure.runner import Runner, resolve  # noqa: E402
from tuner.model.meta import read_model  # noqa: E402
from tuner.model.synth import synthesize  # noqa: E402
from tuner.plan import fit as F  # noqa: E402
from tuner.plan.llama_sizes import LlamaSizes  # noqa: E402
from tuner.record import MOE_PARTS, TrialConfig  # noqa: E402
from tuner.search import feasible  # noqa: E402
from tuner.search.confirm import ROLE_BASELINE, ROLE_FIT, ROLE_RECIPE  # noqa: E402
from tuner.search.options import SearchOptions  # noqa: E402
from tuner.search.run import run_search  # noqa: E402
from tuner.units import parse_headroom, parse_size  # noqa: E402

MiB = 1 << 20
TOLERANCE = 0.02
SHAPE = {"n_prompt": 16, "n_gen": 4, "repetitions": 1}
FIXED = {"n_ctx": 512, "n_ubatch": 512, "flash_attn": "on", "n_threads": 1, "n_threads_batch": 1}


def search(model: Path, endpoints: str, out: Path, trials: int, headroom: str) -> dict:
    opts = SearchOptions(
        rpc=endpoints,
        results=str(out),
        study="rig",
        n_trials=trials,
        headroom=headroom,
        fit_target="2",
        confirm=3,
        confirm_rounds=5,
        quality=False,
        **{k: v for k, v in SHAPE.items()},
    ).replace(**{k: str(v) for k, v in FIXED.items()})
    t0 = time.monotonic()
    res = run_search([str(model)], opts)
    wall = time.monotonic() - t0
    rec = res.recommendation or {}
    recs = store.records(res.study_dir)
    info = read_model(str(model))
    cfg = rec.get("config") or {}
    hybrid = cfg.get("n_gpu_layers") == info.n_layer + 1 and (
        cfg.get("n_cpu_moe", 0) > 0 or cfg.get("moe_part", "none") != "none" or bool(cfg.get("overrides"))
    )
    searched = [r for r in recs if r.searched]
    by_label = {}
    for r in searched:
        if r.baseline:
            by_label.setdefault(r.baseline, r)
    device_oom = [r for r in searched if r.outcome == "oom" and "RPC0[" in r.cause]
    return {
        "wall_s": round(wall, 1),
        "trials": len(searched),
        "outcomes": {o: sum(1 for r in searched if r.outcome == o) for o in sorted({r.outcome for r in searched})},
        "winner": {k: cfg.get(k) for k in ("n_gpu_layers", "n_cpu_moe", "moe_part", "overrides", "tensor_split")},
        "winner_in_hybrid_region": hybrid,
        "baselines": {
            label: {
                "outcome": r.outcome,
                "cause": r.cause[:200],
                "config": {k: getattr(r.config, k) for k in ("n_gpu_layers", "n_cpu_moe", "moe_part", "overrides")},
            }
            for label, r in by_label.items()
        },
        "device_oom_trials": len(device_oom),
        "vs_fit": (rec.get("confirmation") or {}).get("vs_fit"),
        "vs_defaults": rec.get("vs_defaults"),
        "recommended_file": str(res.study_dir / "recommended.json"),
    }


def sweep(model: Path, endpoints: tuple[str, ...], mem: int, headroom: str) -> dict:
    """Every hybrid-region point measured once (no planner in the way) against the planner's verdict and buffers."""
    info = read_model(str(model))
    hw = hardware.probe()
    remote = hardware.rpc_devices(endpoints)
    limits = SearchOptions(headroom=headroom).limits
    rig = feasible.rig_from_hardware(hw, limits, True, remote)  # each device as it reports itself: --mem
    names, free = tuple(rig.devices), list(rig.gpu_free)
    rig.sizes = LlamaSizes(names)  # as `tuner search` plans on RPC devices: llama.cpp sizes the compute buffers
    model_rig = dataclasses.replace(rig, sizes=None)  # the planner's model alone: what a described rig gets
    rows = []
    with rig.sizes, Runner(timeout=120, reuse=False, hw=hw, build=hardware.build_info()) as runner:
        for n in range(info.n_layer + 1):
            for part in MOE_PARTS:
                cfg = resolve(
                    TrialConfig(
                        model=str(model),
                        n_gpu_layers=99,
                        n_cpu_moe=n,
                        moe_part=part,
                        rpc=",".join(endpoints),
                        **FIXED,
                        **SHAPE,
                    ),
                    info,
                )
                if cfg.moe_part != part:
                    continue  # a partial layer past the last one: the same as "none"
                pred = feasible.predict(cfg, info, rig)
                fits, why = feasible.judge(pred, rig)
                fits_alone = feasible.judge(feasible.predict(cfg, info, model_rig), model_rig)[0]
                rec = runner.run(cfg)
                device_oom = rec.outcome == "oom"
                row = {
                    "n_cpu_moe": n,
                    "moe_part": part,
                    "planner_fits": fits,
                    "planner_why": why,
                    "planner_vram_by_device_mib": [round(v / MiB, 2) for v in pred.vram_by_device],
                    "outcome": rec.outcome,
                    "cause": rec.cause[:200],
                    "verdict_right": fits == rec.ok and (rec.ok or device_oom),
                    "model_only_fits": fits_alone,
                    "model_only_verdict_right": fits_alone == rec.ok and (rec.ok or device_oom),
                }
                if rec.ok:
                    # what the search plans with (the compute buffers from llama.cpp's no_alloc sizing) and the
                    # planner's model alone (what a described rig gets)
                    used = F.device_usage(cfg, info, free, names, compute_of=rig.sizes)
                    model_only = F.device_usage(cfg, info, free, names)
                    errs = {}
                    for i, name in enumerate(names):
                        theirs = rec.buffers.get(name, {})
                        for kind, planned, alone in (
                            ("model", used[i].model, model_only[i].model),
                            ("kv", used[i].context, model_only[i].context),
                            ("compute", used[i].compute, model_only[i].compute),
                        ):
                            got = theirs.get(kind, 0)
                            if got or planned:
                                errs[f"{name}:{kind}"] = {
                                    "llama_mib": round(got / MiB, 2),
                                    "planner_mib": round(planned / MiB, 2),
                                    "error": round(planned / got - 1, 4) if got else None,
                                    "model_only_mib": round(alone / MiB, 2),
                                    "model_only_error": round(alone / got - 1, 4) if got else None,
                                }
                    row["buffers"] = errs
                rows.append(row)
                print(
                    f"n_cpu_moe {n} moe_part {part:9s}: planner {'fits' if fits else 'no  '}, llama.cpp "
                    f"{rec.outcome}{'' if row['verdict_right'] else '   <- verdict wrong'}",
                    file=sys.stderr,
                )
    errors = [
        abs(e["error"]) if e["error"] is not None else float("inf")
        for r in rows
        for e in (r.get("buffers") or {}).values()
    ]
    by_kind = {}
    for kind in ("model", "kv", "compute"):
        vals = [
            abs(e["error"]) if e["error"] is not None else float("inf")
            for r in rows
            for k, e in (r.get("buffers") or {}).items()
            if k.endswith(":" + kind)
        ]
        alone = [
            abs(e["model_only_error"]) if e["model_only_error"] is not None else float("inf")
            for r in rows
            for k, e in (r.get("buffers") or {}).items()
            if k.endswith(":" + kind)
        ]
        by_kind[kind] = {
            "n": len(vals),
            "max_abs_error": max(vals) if vals else None,
            "model_only_within_2pct": sum(1 for e in alone if e <= TOLERANCE),
            "model_only_max_abs_error": max(alone) if alone else None,
        }
    return {
        "device_mib": mem / MiB,
        "configs": len(rows),
        "ran": sum(1 for r in rows if r["outcome"] == "ok"),
        "device_oom": sum(1 for r in rows if r["outcome"] == "oom"),
        "planner_predicted_oom": sum(1 for r in rows if not r["planner_fits"]),
        "verdicts_right": sum(1 for r in rows if r["verdict_right"]),
        "model_only_verdicts_right": sum(1 for r in rows if r["model_only_verdict_right"]),
        "buffers_compared": len(errors),
        "buffers_within_2pct": sum(1 for e in errors if e <= TOLERANCE),
        "max_abs_error_by_kind": by_kind,
        "rows": rows,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mem", default="40MiB", help="each device's size (tuner rpc-server --mem)")
    ap.add_argument("--trials", type=int, default=10, help="search trials (the baselines included)")
    ap.add_argument("--headroom", default="2MiB")
    ap.add_argument("--no-sweep", action="store_true", help="the search only")
    args = ap.parse_args()
    mem = parse_size(args.mem)
    parse_headroom(args.headroom)
    model = synthesize(CACHE, "moe", ("q8_0",))[0]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rpc-check-") as tmp:
        with rpc.LocalServer(mem, tmp) as a, rpc.LocalServer(mem, tmp) as b:
            endpoints = (a.endpoint, b.endpoint)
            found = search(model, ",".join(endpoints), Path(tmp) / "results", args.trials, args.headroom)
            print(json.dumps({k: v for k, v in found.items() if k != "recommended_file"}, indent=1), file=sys.stderr)
            swept = None if args.no_sweep else sweep(model, endpoints, mem, args.headroom)
    result = {
        "model": model_facts(model),
        "devices": {"count": 2, "mem": mem},
        "wall_s": round(time.monotonic() - t0, 1),
        "search": found,
        "sweep": swept,
    }
    failures = []
    if not found["winner_in_hybrid_region"]:
        failures.append("the winner is not in the hybrid region")
    for label in (ROLE_FIT, ROLE_BASELINE, ROLE_RECIPE):
        if label not in found["baselines"]:
            failures.append(f"baseline not measured: {label}")
    if swept:
        if swept["verdicts_right"] < swept["configs"]:
            failures.append(f"planner verdicts right {swept['verdicts_right']}/{swept['configs']}")
        if swept["buffers_within_2pct"] < swept["buffers_compared"]:
            failures.append(f"buffers within 2 %: {swept['buffers_within_2pct']}/{swept['buffers_compared']}")
    result["failures"] = failures
    path = save("rpc-check", result)
    vs = found.get("vs_fit") or {}
    print(
        f"rig check: {result['wall_s']:.0f} s; winner {found['winner']} "
        f"(hybrid: {found['winner_in_hybrid_region']}); vs --fit {vs.get('ratio')} (95 % {vs.get('ci95')}, "
        f"{vs.get('verdict')})"
        + (
            f"; verdicts right {swept['verdicts_right']}/{swept['configs']}, buffers within 2 % "
            f"{swept['buffers_within_2pct']}/{swept['buffers_compared']}"
            if swept
            else ""
        )
        + f"\n{path}"
        + ("".join(f"\nFAIL: {f}" for f in failures)),
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

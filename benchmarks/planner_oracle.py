#!/usr/bin/env python3
"""Planner vs llama.cpp itself: every buffer llama.cpp sizes, for the architectures people run big.

Models: the seven oracle shapes (tuner.plan.oracle.SHAPES: DeepSeek-V3, Qwen3-235B-A22B, gpt-oss-120b, Gemma 3 27B,
Llama 3 70B, GLM-4.5-Air, LFM2-1.2B), other published sizes of each (oracle.HELD_OUT: never looked at while the
formulas were written) and, when it is in the cache, the real Gemma 3 270M. Each is a sparse GGUF (real
header, no weights) that llama.cpp loads in a worker process with `no_alloc` ("sim": buffers sized, nothing
allocated, so 128k contexts of a 400 GB model cost nothing); files under 1 GiB are also loaded for real (mmap,
use_extra_bufts off, buffers allocated) at 4k to show that both modes report the same figures.

Grid: n_ctx 4k/32k/128k × KV f16/q8_0 × flash attention on/off × n_ubatch 512/2048 (q8_0 without flash
attention is K q8_0 + V f16: llama.cpp refuses a quantized V without it). Buffers: model, KV (K + V over all
caches), recurrent state, output, compute. Targets (uncalibrated planner): KV, recurrent state and output exact
to llama.cpp's log resolution (±0.005 MiB per logged figure), model within 2 %, compute within 10 %; a config
llama.cpp refuses
must be one the planner says it refuses. Then cold-start peak RSS of real trials (tuner.measure.runner, the real
Gemma 3 270M and the synthetic models) against the uncalibrated prediction: within 10 %.

    python benchmarks/planner_oracle.py                 # everything (~3 min on 2 cores)
    python benchmarks/planner_oracle.py --no-rss        # llama.cpp's buffers only (~1 min)
    python benchmarks/planner_oracle.py --arch deepseek2 --arch gemma3 --ctx 4096

Exits 1 when any target is missed. Results: benchmarks/results/planner-oracle-*.json.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import RESULTS, save  # noqa: E402
from tuner.model.meta import read_model  # noqa: E402
from tuner.plan import oracle, planner  # noqa: E402
from tuner.record import TrialConfig  # noqa: E402

MiB = 1 << 20
CACHE = Path(os.environ.get("TUNER_TEST_MODELS", Path.home() / ".cache" / "tuner-test-models"))
GEMMA = CACHE / "gemma-3-270m-q4_k_m.gguf"
HALF = 0.005 * MiB + 1  # llama.cpp logs MiB with two decimals: each logged figure is exact to half a step
TARGET = {
    "kv": ("abs", HALF),
    "rs": ("abs", HALF),
    "output": ("abs", HALF),
    "model": ("rel", 0.02),
    "compute": ("rel", 0.10),
}


def models(out: Path, archs: list[str]) -> list[dict]:
    found = []
    for arch in archs:
        found.append({"tag": arch, "set": "flagship", "path": str(oracle.model_file(arch, out))})
        for tag, (a, dims) in oracle.HELD_OUT.items():
            if a == arch:
                found.append(
                    {
                        "tag": tag,
                        "set": "held-out",
                        "path": str(oracle.model_file(a, out, tag=tag.split("/")[1], **dims)),
                    }
                )
    if GEMMA.exists() and "gemma3" in archs:
        found.append({"tag": "gemma3/270M (real file)", "set": "real", "path": str(GEMMA)})
    for m in found:
        m["file_size"] = Path(m["path"]).stat().st_size
    return found


def jobs_for(m: dict, ctxs, kvs, fas, ubs) -> list[oracle.Job]:
    jobs = [
        oracle.Job(
            model=m["path"],
            n_ctx=c,
            type_k=kv,
            type_v=kv if fa == "on" else "f16",
            flash_attn=fa,
            n_ubatch=ub,
            mode="sim",
        )
        for c, kv, fa, ub in itertools.product(ctxs, kvs, fas, ubs)
    ]
    if m["file_size"] <= oracle.REAL_LOAD_MAX:
        jobs += [oracle.Job(model=m["path"], n_ctx=4096, flash_attn=fa, mode="real") for fa in fas]
    return jobs


def compare(job: oracle.Job, res: dict, info) -> list[dict]:
    cfg = job.config()
    base = {
        "n_ctx": job.n_ctx,
        "kv_type": f"{job.type_k}/{job.type_v}",
        "fa": job.flash_attn,
        "n_ubatch": job.n_ubatch,
        "mode": job.mode,
    }
    refused = planner.refusal(cfg, info)
    if res["outcome"] != "ok":
        return [
            dict(
                base,
                buffer="context",
                llama_cpp=f"refused: {res.get('cause', '')}",
                planner=f"refused: {refused}" if refused else "would create it",
                ok=bool(refused),
            )
        ]
    pred = planner.buffers(cfg, info)
    seen = {
        "kv": res["kv_bytes"],
        "rs": res["rs_bytes"],
        "output": sum(res["output"].values()),
        "compute": sum(res["compute"].values()),
    }
    if "model" in res:
        # sim: llama.cpp's model size (tensor bytes); real: the mmap'd range of the file
        seen["model"] = res["model_size"] if job.mode == "sim" else sum(res["model"].values())
    # kv and rs are sums of two logged figures (K and V, R and S) per cache: the tolerance adds up
    figures = {"kv": 2 * len(res["kv_caches"]), "rs": 2 * len(res["rs_caches"]), "output": len(res["output"])}
    rows = []
    for buf, got in seen.items():
        want = pred[buf]
        kind, tol = TARGET[buf]
        tol *= max(figures.get(buf, 1), 1) if kind == "abs" else 1
        err = float(want - got) if kind == "abs" else (want / got - 1 if got else float(want != 0))
        rows.append(dict(base, buffer=buf, llama_cpp=got, planner=want, error=err, error_kind=kind, ok=abs(err) <= tol))
    if refused:  # llama.cpp created a context the planner says it refuses
        rows.append(dict(base, buffer="context", llama_cpp="created", planner=f"refused: {refused}", ok=False))
    return rows


def rss_trials(n_threads: int) -> list[dict]:
    """Cold-start peak RSS of real trials vs the uncalibrated prediction (Runner without reuse: every trial
    starts in a fresh worker process)."""
    from tuner.measure.runner import Runner
    from tuner.model.synth import synthesize

    files = [
        synthesize(CACHE, "tiny", ("q8_0",))[0],
        synthesize(CACHE, "moe", ("q8_0",))[0],
        synthesize(CACHE, "dense", ("q4_0",))[0],
    ] + ([GEMMA] if GEMMA.exists() else [])
    grid = [(4096, 512, "f16", True, "on"), (8192, 128, "q8_0", False, "off"), (2048, 512, "f16", True, "off")]
    out = []
    with Runner(timeout=300) as runner:
        for m, (ctx, ub, kv, mm, fa) in itertools.product(files, grid):
            cfg = TrialConfig(
                model=str(m),
                n_ctx=ctx,
                n_ubatch=ub,
                type_k=kv,
                type_v=kv if fa == "on" else "f16",
                use_mmap=mm,
                flash_attn=fa,
                n_prompt=512,
                n_gen=16,
                repetitions=1,
                n_threads=n_threads,
            )
            rec = runner.run(cfg)
            p = planner.predict(cfg, read_model(m))
            row = {
                "model": Path(m).name,
                "n_ctx": ctx,
                "n_ubatch": ub,
                "kv_type": kv,
                "mmap": mm,
                "fa": fa,
                "outcome": rec.outcome,
                "measured": rec.peak_rss_bytes,
                "predicted": p.ram_bytes,
                "resident": p.resident_bytes,
                "file_pages": p.file_bytes,
            }
            row["error"] = p.ram_bytes / rec.peak_rss_bytes - 1 if rec.peak_rss_bytes else None
            row["ok"] = rec.outcome == "ok" and abs(row["error"]) <= 0.10
            out.append(row)
            print(
                f"rss {row['model']:<26} ctx {ctx:>6} ub {ub:>4} {kv:<5} mmap {mm!s:<5} fa {fa:<3} measured "
                f"{(rec.peak_rss_bytes or 0) / MiB:8.1f} MiB  predicted {p.ram_bytes / MiB:8.1f} MiB  "
                f"{100 * (row['error'] or 0):+6.1f} %{'' if row['ok'] else '  MISS'}",
                flush=True,
            )
    return out


def fmt(v) -> str:
    return f"{v / MiB:.2f} MiB" if isinstance(v, int) else str(v).split(":")[0]  # "refused" (the cause: JSON)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", choices=list(oracle.SHAPES), help="only these (repeatable)")
    ap.add_argument("--ctx", default="4096,32768,131072")
    ap.add_argument("--no-rss", action="store_true", help="skip the real-trial peak RSS part")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    archs = args.arch or list(oracle.SHAPES)
    ctxs = [int(c) for c in args.ctx.split(",")]
    with tempfile.TemporaryDirectory(prefix="planner-oracle-") as tmp:
        ms = models(Path(tmp), archs)
        jobs, owners = [], []
        for m in ms:
            js = jobs_for(m, ctxs, ("f16", "q8_0"), ("on", "off"), (512, 2048))
            jobs += js
            owners += [m] * len(js)
        results = oracle.measure(jobs, timeout=900)
        rows = []
        for m, job, res in zip(owners, jobs, results):
            info = read_model(m["path"])
            m.update(arch=info.arch, n_layer=info.n_layer, weights=sum(t.n_bytes for t in info.tensors))
            for r in compare(job, res, info):
                rows.append(dict(model=m["tag"], set=m["set"], **r))
    print(
        f"{'model':<24}{'set':<9}{'n_ctx':>7} {'kv':<10}{'fa':<4}{'ub':>5} {'mode':<5}{'buffer':<8}"
        f"{'llama.cpp':>16}{'planner':>16}{'error':>10}"
    )
    for r in rows:
        if isinstance(r.get("error"), float):
            e = f"{100 * r['error']:+.2f}%" if r["error_kind"] == "rel" else f"{r['error'] / MiB:+.3f}Mi"
        else:
            e = "-"
        print(
            f"{r['model']:<24}{r['set']:<9}{r['n_ctx']:>7} {r['kv_type']:<10}{r['fa']:<4}{r['n_ubatch']:>5} "
            f"{r['mode']:<5}{r['buffer']:<8}{fmt(r['llama_cpp']):>16}{fmt(r['planner']):>16}{e:>10}"
            f"{'' if r['ok'] else '  MISS'}"
        )
    rss = [] if args.no_rss else rss_trials(args.threads)
    worst: dict[str, dict[str, float]] = {}
    for r in rows:
        if isinstance(r.get("error"), float):
            w = worst.setdefault(r["model"], {})
            w[r["buffer"]] = max(w.get(r["buffer"], 0.0), abs(r["error"]))
    misses = [r for r in rows if not r["ok"]] + [r for r in rss if not r["ok"]]
    print("\nworst |error| per model: compute/model as %, kv/rs/output in MiB")
    for name, w in worst.items():
        print(
            f"  {name:<24}"
            + "  ".join(f"{b} {100 * v:.1f}%" if TARGET[b][0] == "rel" else f"{b} {v / MiB:.3f}" for b, v in w.items())
        )
    if rss:
        print(
            f"  cold-start peak RSS: worst {100 * max(abs(r['error'] or 1) for r in rss):.1f} % over {len(rss)} trials"
        )
    print(f"{len(misses)} of {len(rows) + len(rss)} checks missed their target")
    import llama_cpp

    result = {
        "settings": {
            "archs": archs,
            "ctx": ctxs,
            "kv": ["f16", "q8_0"],
            "fa": ["on", "off"],
            "n_ubatch": [512, 2048],
            "targets": {k: list(v) for k, v in TARGET.items()},
            "rss": not args.no_rss,
            "threads": args.threads,
            "real_loads": f"files up to {oracle.REAL_LOAD_MAX} B at n_ctx 4096 only: llama.cpp maps with "
            "MAP_POPULATE, which pages a sparse file's holes through the page cache of this "
            "shared 24 GB machine; every figure is also sized without allocating (sim)",
        },
        "build": {
            "llama_cpp_python": llama_cpp.__version__,
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "models": ms,
        "rows": rows,
        "rss": rss,
        "worst": worst,
        "misses": len(misses),
        "ok": not misses,
    }
    # echo=False: the whole JSON is thousands of rows
    save("planner-oracle", result, Path(args.out) if args.out else RESULTS, echo=False)
    return 0 if not misses else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A tabular replay benchmark of `tuner search`: measure a grid once, thoroughly; replay the real search on it.

    measure  every config of a small space for R interleaved rounds (fresh worker per trial, so every trial
             records its load time; the order of the load-key groups alternates between rounds, A B B A),
             saved as benchmarks/results/replay-grid-NAME-*.json with provenance.
    run      the real `tuner.study.Search` (its sampler, baselines, constraints, duplicate handling, the
             confirmation race and the recommendation) on that table for many seeds, with only the runner
             replaced: each run draws one recorded trial of its config (a random round, not reused within a
             seed while unused ones are left) and advances a clock by that trial's recorded cost, its load
             counted only when the load key changes from the previous run (as a reused worker does). The
             recommendation's "true" objective is the config's median over all recorded rounds; no drift
             enters, and 100 seeds take minutes instead of nights.

Tabular HPO benchmarks (NAS-Bench-201, HPOBench's tabular set) work this way; see ../shared/README.md. The
table's costs are this machine's, measured with the same worker the search uses.

Examples:
  benchmarks/replay.py measure --grid quant-kv --rounds 9
  benchmarks/replay.py run benchmarks/results/replay-grid-quant-kv-*.json --seeds 100 --n-trials 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import model_facts, save  # noqa: E402

from tuner.record import TrialConfig, TrialRecord  # noqa: E402

MODEL_CACHE = Path.home() / ".cache" / "tuner-test-models"
# Grids: small spaces where llama.cpp's defaults (the first model file, f16 KV, every core) are not the best.
GRIDS = {
    # quant files × K-cache type × flash attention × threads (24 configs); the defaults run the first file (f16), which reads the most bytes
    "quant-kv": {"preset": "dense", "quants": ["f16", "q8_0", "q4_0"],
                 "specs": {"n_threads": "1,2", "type_k": "f16,q8_0", "flash_attn": "on,off"},
                 "shape": {"n_prompt": 64, "n_gen": 16, "repetitions": 2}},
    # 18 configs, mmap off: every change of file reloads it from the page cache into anonymous memory, a large part of a
    # short trial's cost; the batch size matters for the prompt
    "nommap-batch": {"preset": "dense", "quants": ["f32", "q8_0", "q4_k_m"],
                     "specs": {"n_threads": "1,2", "n_ubatch": "8,32,64", "use_mmap": "false"},
                     "shape": {"n_prompt": 64, "n_gen": 8, "repetitions": 2}},
    # for tests: loads in milliseconds
    "tiny": {"preset": "tiny", "quants": ["q8_0", "q4_k_m"], "specs": {"n_threads": "1,2"},
             "shape": {"n_prompt": 16, "n_gen": 4, "repetitions": 2}},
}
OBJECTIVE = "mixed"


class ReplayError(ValueError):
    """Bad input for the replay (a table of another space, a missing model): one line, exit 2."""


# -- the space, as `tuner search` builds it ----------------------------------------------------------------------
def build(models: list[str], specs: dict, shape: dict):
    """The Space and model infos `tuner search -m ... --<specs>` would search (no default dimensions added)."""
    from tuner import hardware
    from tuner import space as spacelib
    from tuner.ggufmeta import read_model

    infos = {m: read_model(m) for m in models}
    hw = hardware.probe()
    base = TrialConfig(model=models[0], n_threads=hw.cores_physical, n_threads_batch=0, **shape)
    space = spacelib.build_space(models, infos, dict(specs), base, False, hw.cores_physical, hw.cores_logical,
                                 objective=OBJECTIVE, auto=False, ram_total=hw.ram_total)
    if "n_threads_batch" not in space.dims:  # as run_search: threads_batch follows threads
        space.base = dataclasses.replace(space.base, n_threads_batch=0)
    return space, infos, hw


def grid_configs(space, infos) -> list[TrialConfig]:
    """Every config of the space as the search resolves it (what its trials record)."""
    from tuner.bench import resolve

    return [resolve(c, infos[c.model]) for c in space.configs()]


def grid_models(grid: dict) -> list[str]:
    from tuner.synth import synthesize

    return [str(p) for p in synthesize(MODEL_CACHE, grid["preset"], tuple(grid["quants"]))]


# -- measure ----------------------------------------------------------------------------------------------------
def measure(name: str, rounds: int, out=None, log=print) -> Path:
    from tuner.confirm import config_key, run_order
    from tuner.lock import measurement_lock
    from tuner.runner import Runner

    grid = GRIDS[name]
    models = grid_models(grid)
    space, infos, hw = build(models, grid["specs"], grid["shape"])
    cfgs = grid_configs(space, infos)
    table = {config_key(c): {"config": c.to_dict(), "trials": []} for c in cfgs}
    log(f"{name}: {len(cfgs)} configs x {rounds} rounds")
    t0 = time.monotonic()
    with measurement_lock(wait=True, what="benchmarks/replay.py measure"), Runner(timeout=300, reuse=False) as runner:
        for rnd in range(rounds):
            for cfg in run_order(cfgs, rnd):
                r = runner.run(cfg)
                table[config_key(cfg)]["trials"].append(
                    {"round": rnd, "outcome": r.outcome, "cause": r.cause[:200], "tg": r.tg_samples,
                     "pp": r.pp_samples, "ttft_ms": r.ttft_samples_ms, "load_ms": r.load_ms, "wall_s": r.wall_s,
                     "peak_rss_bytes": r.peak_rss_bytes, "started_utc": r.started_utc})
            log(f"round {rnd + 1}/{rounds} done, {time.monotonic() - t0:.0f} s")
    result = {"grid": name, "recipe": grid, "rounds": rounds, "objective": OBJECTIVE,
              "models": [model_facts(m) for m in models], "space": space.describe(),
              "configs": list(table.values()), "wall_s": round(time.monotonic() - t0, 1)}
    return save(f"replay-grid-{name}", result, out or Path(__file__).resolve().parent / "results", echo=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__[__doc__.index("Examples:"):])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="measure a grid's table")
    m.add_argument("--grid", choices=sorted(GRIDS), required=True)
    m.add_argument("--rounds", type=int, default=9)
    m.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.cmd == "measure":
        if a.rounds < 1:
            ap.error("--rounds must be at least 1")
        measure(a.grid, a.rounds, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

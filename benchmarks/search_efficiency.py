"""Search efficiency: does the default sampler find (nearly) the grid's best tg with a fraction of the trials?

1. Measures the exhaustive grid once for real (`tuner search --sampler grid`, every config a real trial on the
   dense synthetic model).
2. Replays the default search (TPE, with its baselines, constraints and dominance skips) for several seeds
   against that measured table: each config the sampler asks for gets the tg the grid measured for it. This
   isolates the sampler's efficiency from run-to-run noise.
3. Reports, per seed, the best tg found within 25 % of the grid's trial count as a share of the grid's best,
   and the median over seeds (target: >= 97 %).

    .venv/bin/python benchmarks/search_efficiency.py --seeds 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import optuna
from _results import save  # noqa: E402

from tuner.cli import cli  # noqa: F401 - the same code path the CLI uses
from tuner.measure import store
from tuner.record import TrialConfig

ROOT = Path(__file__).resolve().parents[1]
TUNER = str(Path(sys.executable).with_name("tuner"))
SPACE = ["--threads", "1:2", "-ub", "64,128,256,512", "-fa", "on,off", "-ctk", "f16,q8_0", "-ctv", "f16,q8_0"]
# tg128 × 5 repetitions as llama-bench: the grid's best must be a config, not one lucky sample
SHAPE = ["-p", "64", "-n", "128", "-r", "5"]


def tuner_search(results: Path, study: str, model: str, extra: list[str]) -> None:
    cmd = [
        TUNER,
        "search",
        "-m",
        model,
        *SPACE,
        *SHAPE,
        "--results",
        str(results),
        "--study",
        study,
        "--drift-every",
        "0",
        *extra,
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def key(cfg: dict) -> tuple:
    return tuple(cfg[k] for k in ("n_threads", "n_ubatch", "flash_attn", "type_k", "type_v"))


class Replay:
    """Stands in for the runner in the replay: returns the grid's real measurement of the same config."""

    loaded_key = None  # no worker keeps a model loaded: the search steers repeats to any unmeasured config
    loaded_keys: list = []
    reuse = False

    def __init__(self, table: dict):
        self.table = table
        self.last_log = ""

    def run(self, cfg: TrialConfig, need_bytes: int | None = None):
        return self.table[key(cfg.to_dict())]


def replay(grid_records, seed: int, budget: int, model: str) -> float:
    from tuner.measure import hardware
    from tuner.model.meta import read_model
    from tuner.search.loop import Search
    from tuner.search.options import SearchOptions
    from tuner.search.space import build_space

    table = {key(r.config.to_dict()): r for r in grid_records}
    infos = {model: read_model(model)}
    hw = hardware.Hardware(**{k: v for k, v in grid_records[0].hw.items() if k != "gpus"}, gpus=[])
    base = grid_records[0].config
    specs = {
        "n_threads": "1:2",
        "n_ubatch": "64,128,256,512",
        "flash_attn": "on,off",
        "type_k": "f16,q8_0",
        "type_v": "f16,q8_0",
    }
    space = build_space(
        [model],
        infos,
        specs,
        TrialConfig(model=model, n_prompt=base.n_prompt, n_gen=base.n_gen, repetitions=base.repetitions),
        False,
        hw.cores_physical,
        hw.cores_logical,
    )
    with tempfile.TemporaryDirectory() as d:
        opts = SearchOptions(results=Path(d), study="s", seed=seed, n_trials=budget, drift_every=0)
        s = Search(space, opts, infos, hw, grid_records[0].build, runner=Replay(table))
        s.prepare()
        s.run()
        best = [r.metric("tg")[0] for r in s.records if r.ok]
    return max(best) if best else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the dense synthetic model (q4_0)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--grid", default=None, help="reuse a measured grid study folder")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.model is None:
        from tuner.model.synth import synthesize

        args.model = str(synthesize(Path.home() / ".cache" / "tuner-test-models", "dense", ("q4_0",))[0])
    work = Path(tempfile.mkdtemp(prefix="tuner-eff-"))
    grid_dir = Path(args.grid) if args.grid else work / "grid"
    if not args.grid:
        t0 = time.monotonic()
        tuner_search(work, "grid", args.model, ["--sampler", "grid", "--no-baselines"])
        print(f"grid measured in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    recs = store.records(grid_dir)
    ran = [r for r in recs if r.state != "anchor"]
    ok = [r for r in ran if r.ok]
    grid_best = max(r.metric("tg")[0] for r in ok)
    n_grid = len(ran)
    budget = max(1, math.floor(0.25 * n_grid))
    shares = []
    for seed in range(args.seeds):
        found = replay(recs, seed, budget, args.model)
        shares.append(found / grid_best)
        print(
            f"seed {seed}: best tg in {budget} trials = {found:.2f} t/s = {100 * found / grid_best:.1f} % "
            f"of the grid's best",
            file=sys.stderr,
        )
    result = {
        "grid_configs": n_grid,
        "grid_ok": len(ok),
        "grid_best_tg": grid_best,
        "budget_trials": budget,
        "shares": shares,
        "median_share": statistics.median(shares),
        "model": args.model,
        "grid_dir": str(grid_dir),
    }
    save("search-efficiency", result, args.out)
    print(
        f"median over {args.seeds} seeds: {100 * result['median_share']:.1f} % of the grid's best tg "
        f"within {budget}/{n_grid} trials (target >= 97 %)"
    )


if __name__ == "__main__":
    main()

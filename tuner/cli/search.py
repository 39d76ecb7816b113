"""`tuner search`: an Optuna study over llama.cpp configs (library: tuner.search.run.run_search)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from tuner.cli.common import Progress, describe_plan, limits_options, log, print_recommendation
from tuner.cli.options import (
    DURATION,
    SIZE,
    SIZES,
    config_option,
    prior_params,
    quality_params,
    rpc_option,
    run_params,
    shape_params,
    space_params,
)
from tuner.errors import TunerError
from tuner.search.confirm import MIN_ROUNDS
from tuner.search.options import DEFAULTS, OBJECTIVES, SAMPLERS, SearchOptions
from tuner.search.run import run_search


@click.command()
@config_option("an experiment file (TOML): any option below; the command line wins over the file")
@click.option(
    "-m",
    "--model",
    "models",
    multiple=True,
    help="GGUF file (repeat for several quants); split models: the first shard",
)
@click.option(
    "--synthetic",
    type=click.Choice(["tiny", "dense", "moe"]),
    default=None,
    help="no model at hand: make this synthetic preset (into RESULTS/models) and search it",
)
@click.option("--quants", default=DEFAULTS.quants, show_default=True, help="quants made with --synthetic")
@click.option("--study", "study", default=None, help="study name (default: from the model file name)")
@click.option(
    "--results",
    default=DEFAULTS.results,
    show_default=True,
    type=click.Path(file_okay=False),
    help="where the study folder goes: RESULTS/<study>/",
)
@click.option(
    "--storage",
    default=None,
    help="Optuna storage URL (default: sqlite in the study folder); a shared "
    "one (postgresql://user:pw@host/db) makes a fleet: run the same command on every host",
)
@click.option(
    "--allow-mixed",
    is_flag=True,
    help="fleet: a host of another hardware/build fingerprint joins as a "
    "separate group (own trials and recommendation) instead of being refused",
)
@click.option(
    "--heartbeat",
    "heartbeat_s",
    type=click.IntRange(min=1),
    default=DEFAULTS.heartbeat_s,
    show_default=True,
    help="fleet: seconds between a running trial's heartbeats; a host silent for 3x this long is dead "
    "and its trial is run again by another host",
)
@click.option("--sampler", type=click.Choice(SAMPLERS), default=DEFAULTS.sampler, show_default=True)
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True)
@click.option(
    "--n-trials",
    type=click.IntRange(min=1),
    default=None,
    help="trials in the study in total (a fleet: "
    "over all hosts): a resumed study runs the rest (default: 20; grid: the whole grid)",
)
@click.option(
    "--timeout",
    "timeout",
    type=DURATION,
    default=None,
    help="wall-time budget of this host, e.g. 8h (the confirmation included)",
)
@click.option("--resume", is_flag=True, help="continue an existing study (re-running the same command does too)")
@click.option(
    "--objective",
    type=click.Choice(OBJECTIVES),
    default=DEFAULTS.objective,
    show_default=True,
    help="mixed: end-to-end t/s of one request of the test shape (prompt + generation); tg/pp t/s; TTFT",
)
@click.option("--pareto", is_flag=True, help="two objectives: tg t/s against peak memory (Optuna's Pareto front)")
@limits_options
@space_params
@click.option("--mmap", "use_mmap", default=None, help="true, false or true,false")
@shape_params
@run_params("--trial-timeout")
@click.option(
    "--drift-every",
    type=click.IntRange(min=0),
    default=DEFAULTS.drift_every,
    show_default=True,
    help="re-measure an anchor config every K trials (0: never)",
)
@click.option("--drift-tolerance", type=float, default=DEFAULTS.drift_tolerance, show_default=True)
@click.option(
    "--baselines/--no-baselines",
    default=DEFAULTS.baselines,
    help="start with llama.cpp's defaults and the 3500 MB/layer heuristic",
)
@prior_params
@click.option(
    "--plan/--no-plan",
    default=DEFAULTS.plan,
    help="skip configs the memory planner predicts cannot fit (recorded as skipped with the prediction)",
)
@click.option(
    "--reuse-workers/--fresh-workers",
    default=DEFAULTS.reuse_workers,
    help="keep a worker's model loaded for the next trial with the same load parameters "
    "(never with --mem-limit: each trial then starts from a fresh worker)",
)
@click.option(
    "--auto-space/--no-auto-space",
    default=DEFAULTS.auto_space,
    show_default=True,
    help="search the default range of every parameter you leave unset that matters for the objective "
    "(threads, batch sizes, flash attention; GPU layers and experts on a GPU build)",
)
@click.option(
    "--confirm",
    "confirm",
    type=click.IntRange(min=1),
    default=DEFAULTS.confirm,
    show_default=True,
    help="re-measure the top K configs and the llama.cpp defaults, interleaved, before recommending",
)
@click.option("--no-confirm", is_flag=True, help="recommend the best pooled estimate of the search as it is")
@click.option(
    "--confirm-rounds",
    type=int,
    default=DEFAULTS.confirm_rounds,
    show_default=True,
    help=f"the confirmation race's round limit, at least its minimum ({MIN_ROUNDS}: the fewest rounds at "
    "which the paired test can put a candidate behind); it ends earlier when one candidate remains",
)
@click.option(
    "--quality/--no-quality",
    default=DEFAULTS.quality,
    show_default=True,
    help="measure each model file's KL divergence from the reference before the trials (with two or "
    "more files, or --reference); files beyond the budget are searched but never recommended",
)
@quality_params(" (default 0.05); files beyond it are never recommended", text_flag="--quality-text")
@click.option("--quality-ctx", type=int, default=None, help="tokens per quality chunk (llama-perplexity -c) [512]")
@click.option(
    "--per-load",
    type=click.IntRange(min=1),
    default=DEFAULTS.per_load,
    show_default=True,
    help="configs measured in a row per model load (same model, GPU layers, experts in RAM, split, mmap), "
    "the rest of each config chosen by the sampler; 1: the sampler's order, a reload at every change",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="build the space and the planner's verdicts, measure nothing, write "
    "nothing: the region searched, how many configs fit, the leanest and hungriest in memory",
)
@click.option("--json", "as_json", is_flag=True, help="with --dry-run: print the plan as JSON")
@click.option(
    "--gpus",
    type=SIZES,
    default=None,
    help="with --dry-run: plan for these GPUs instead of this "
    "machine's, e.g. 24GiB or 24GiB,24GiB (a GPU build is assumed; llama.cpp sizes their buffers on sizing-only "
    "RPC servers it starts on 127.0.0.1, as `tuner rpc-server --sizing-only`)",
)
@click.option("--ram", "ram", type=SIZE, default=None, help="with --dry-run: plan for this much host RAM")
@rpc_option
@click.option(
    "-fitt",
    "--fit-target",
    "fit_target",
    default="1024",
    show_default=True,
    metavar="MiB[,MiB...]",
    help="the margin llama-server's --fit leaves free per device, for the --fit baseline (llama-server's spelling; "
    "one value for all devices or one per device)",
)
def search(config, models, as_json, no_confirm, text, **params):
    """Search for the fastest config that fits: an Optuna study, every trial crash-isolated.

    Each dimension is a value, a list or a range: --ngl 0:61, --ctx 4096,8192, --threads 4:16:2. With only
    --model, the default space searches what matters on this machine (printed with the reasons); every trial
    allocates the working context (--ctx, default 4096 capped by the model's trained context). A list of
    contexts is a ladder: searched at the largest, filled, then every rung measured filled, with the defaults.
    Before recommending, the top --confirm configs and llama.cpp's defaults are re-measured interleaved; the
    winner is decided on those samples.
    Out-of-memory, crashed and timed-out trials are recorded with their cause and steer the sampler
    away (Optuna constraints); configs a known OOM dominates are skipped. Results go to
    RESULTS/<study>/: trials.parquet, study.db (Optuna), logs/, recommended.json. Re-running the same
    command resumes the study. Ctrl-C stops after the current trial (twice: at once).

    \b
    Examples:
      tuner search --model Q4_K_M.gguf --model Q8_0.gguf --ngl 0:61 --ctx 4096,8192 --threads 4:16:2 --timeout 8h
      tuner search --config experiments/cpu-only.toml
      tuner search --synthetic dense --n-trials 10
      tuner search -m Q8_0.gguf -m Q4_K_M.gguf -m Q2_K.gguf --reference BF16.gguf --max-kld 0.03
      tuner search --model gemma-3-270m-q4_k_m.gguf --ctx 4096,16384,32768
      tuner search -m DeepSeek-V3-Q4_K_M-00001-of-00009.gguf --dry-run --gpus 24GiB,24GiB --ram 512GiB
    """
    if as_json and not params["dry_run"]:
        raise TunerError("--json prints a dry run's plan: add --dry-run")
    opts = SearchOptions.from_params({**params, "quality_text": text, **({"confirm": 0} if no_confirm else {})})
    res = run_search(
        models, opts, on_trial=Progress(), on_confirm=Progress().confirmed, log=(lambda line: None) if as_json else log
    )
    if res.plan is not None:
        click.echo(json.dumps(res.plan, indent=1) if as_json else "\n".join(describe_plan(res.plan)))
        return 0
    # the command as typed, when it was typed as `tuner ...`
    resume_hint = (
        shlex.join(["tuner"] + sys.argv[1:])
        if sys.argv and "tuner" in Path(sys.argv[0]).name
        else f"tuner search --study {res.study_dir.name} --results {opts.results} --resume (same options)"
    )
    if res.interrupted:
        click.echo(f"\ninterrupted: everything so far is in {res.study_dir}/; resume with:\n  {resume_hint}", err=True)
        return 130
    if res.stopped:
        click.echo(f"stopped: resume with:\n  {resume_hint}", err=True)
    if res.finished:
        click.echo(f"search finished: {res.finished}", err=True)
    print_recommendation(res.recommendation, res.study_dir)
    return 0

"""The `tuner` command line: thin Click commands over the library modules."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path

import click

from tuner import bench as benchlib
from tuner import hardware, store
from tuner.ggufmeta import ModelError, read_model
from tuner.lock import LockBusy, measurement_lock
from tuner.options import (DURATION, HEADROOM, SIZE, TunerError, bench_params, config_option, run_params, shape_params,
                           space_params)
from tuner.study import OBJECTIVES, SAMPLERS
from tuner.record import TrialConfig
from tuner.runner import TrialInterrupted

EXIT_BUSY = 75  # EX_TEMPFAIL: another measurement holds the rig


class TunerGroup(click.Group):
    """Every error is one line on stderr: bad input exits 2, never with a traceback.

    Commands with heavy imports (scipy, matplotlib) load only when they run: `tuner search` starts in a
    fraction of the time, which matters when every trial is a fresh process and CI runs many commands.
    """

    LAZY = {"compare": "tuner.cli_compare:compare", "estimate": "tuner.cli_estimate:estimate_cmd",
            "report": "tuner.cli_report:report_cmd", "selftest": "tuner.selftest:selftest_cmd"}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.LAZY))

    def get_command(self, ctx, name):
        if name in self.LAZY and name not in self.commands:
            import importlib

            module, attr = self.LAZY[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except (ModelError, store.StoreError) as e:
            click.echo(f"tuner: error: {e}", err=True)
            sys.exit(2)
        except LockBusy as e:
            click.echo(f"tuner: {e}", err=True)
            sys.exit(EXIT_BUSY)
        except click.ClickException as e:
            msg = " ".join(e.format_message().split())
            click.echo(f"tuner: error: {msg}", err=True)
            sys.exit(2 if isinstance(e, (click.UsageError, TunerError)) else e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=TunerGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="tuner")
def cli():
    """Measure and auto-tune llama.cpp configs for big GGUF models, one crash-isolated trial at a time.

    \b
      tuner hw                           what this machine has
      tuner synth models --preset dense  make synthetic GGUF models (no download)
      tuner bench MODEL -t 4 -p 512      measure one config, llama-bench style
      tuner search --model A.gguf        an Optuna study overnight
      tuner report results/<study>       charts and a report
      tuner compare BASE CURRENT         CI regression gate
    """


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def hw(as_json):
    """Show CPU, memory, swap, GPUs (via NVML) and whether llama-cpp-python can offload.

    Example: tuner hw --json
    """
    h = hardware.probe(with_llama=True)
    if as_json:
        click.echo(json.dumps(h.to_dict(), indent=2))
        return
    gib = 2**30
    rows = [("CPU", h.cpu), ("cores", f"{h.cores_physical} physical, {h.cores_logical} logical"),
            ("RAM", f"{h.ram_total / gib:.1f} GiB total, {h.ram_available / gib:.1f} GiB available"),
            ("swap", f"{h.swap_total / gib:.1f} GiB total, {h.swap_free / gib:.1f} GiB free"),
            ("OS", h.os), ("GPU offload", "yes" if h.gpu_offload else "no (this llama-cpp-python build is CPU-only)")]
    for g in h.gpus:
        rows.append((f"GPU {g.index}", f"{g.name}, {g.vram_total / gib:.1f} GiB ({g.vram_free / gib:.1f} free), "
                                       f"driver {g.driver}, CUDA {g.cuda}"))
    if not h.gpus:
        rows.append(("GPUs", f"none ({h.nvml or 'NVML found no device'})"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k.ljust(w)}  {v}")


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--preset", type=click.Choice(["tiny", "dense", "moe"]), default="tiny", show_default=True,
              help="tiny: unit tests; dense: ~130 M params; moe: Mixtral-style experts")
@click.option("--quants", default="f16", show_default=True, help="comma-separated: f16,q8_0,q4_k_m,...")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="rewrite files that exist")
@click.option("--n-embd", type=int)
@click.option("--n-layer", type=int)
@click.option("--n-head", type=int)
@click.option("--n-head-kv", type=int)
@click.option("--n-ff", type=int)
@click.option("--n-vocab", type=int)
@click.option("--n-expert", type=int)
@click.option("--n-expert-used", type=int)
def synth(out_dir, preset, quants, seed, force, **sizes):
    """Write synthetic GGUF models (random weights, llama architecture) and quantize them with llama.cpp.

    Example: tuner synth models --preset dense --quants q8_0,q4_k_m
    """
    from tuner.synth import synthesize

    try:
        paths = synthesize(out_dir, preset, tuple(q.strip() for q in quants.split(",") if q.strip()), seed,
                           force, **sizes)
    except ValueError as e:
        raise TunerError(str(e)) from None
    except OSError as e:
        raise TunerError(f"cannot write models to {out_dir}: {e.strerror or e}") from None
    for p in paths:
        click.echo(f"{p}  {benchlib.fmt_size(p.stat().st_size)}")


def model_info(model: str):
    try:
        return read_model(model)
    except ModelError as e:
        raise TunerError(str(e)) from None


@cli.command()
@config_option("a saved config to re-measure: recommended.json or a `tuner bench --json` record")
@click.argument("model", required=False)
@bench_params
@click.option("--mmap/--no-mmap", "use_mmap", default=None, help="memory-map the model (llama.cpp default: on)")
@click.option("--mlock", "use_mlock", is_flag=True, default=None, help="lock the model in RAM")
@click.option("--cpu-moe", "cpu_moe", is_flag=True, default=None, help="all routed experts in host RAM")
@click.option("-ot", "--override-tensor", "overrides", multiple=True,
              help="PATTERN=BUFFER, as llama.cpp -ot (e.g. 'exps=CPU'); repeatable")
@click.option("-ts", "--tensor-split", "tensor_split", default=None, help="proportions per GPU, e.g. 3,1")
@click.option("--warmup/--no-warmup", "warmup", default=None, help="one untimed run first (as llama-bench)")
@shape_params
@run_params()
@click.option("-o", "--out", type=click.Path(dir_okay=False), default="results/bench.parquet", show_default=True,
              help="Parquet file the trial row is appended to")
@click.option("--json", "as_json", is_flag=True, help="print the trial record as JSON")
def bench(config, model, timeout, mem_limit, no_wait, lock_file, out, as_json, **params):
    """Measure one config the way llama-bench does, in a crash-isolated worker process.

    Prints pp/tg t/s (mean ± sd over the repetitions), TTFT and peak memory, and appends the trial to a
    Parquet file. The trial's outcome (ok, oom, crash, timeout, ...) is recorded either way; the exit code
    is 1 when the trial failed.

    \b
    Examples:
      tuner bench models/dense-q4_k_m.gguf -t 2 -p 512 -n 128 -r 5
      tuner bench --config results/my-study/recommended.json -r 10
    """
    from tuner.runner import Runner

    if not model:
        raise TunerError("no model given (pass MODEL or --config FILE)")
    info = model_info(model)
    given = {k: v for k, v in params.items() if v is not None and v != ()}
    if "overrides" in given:
        given["overrides"] = tuple(given["overrides"])
    for item in given.get("overrides", ()):
        if "=" not in item or not item.split("=", 1)[0]:
            raise TunerError(f"bad --override-tensor {item!r}: expected PATTERN=BUFFER")
    if given.get("tensor_split"):
        try:  # caught here, not as a failed trial inside the worker
            ok = all(float(x) >= 0 for x in given["tensor_split"].split(","))
        except ValueError:
            ok = False
        if not ok:
            raise TunerError(f"bad --tensor-split {given['tensor_split']!r}: expected proportions like 3,1")
    cfg = benchlib.resolve(TrialConfig(model=model, **given), info)
    from tuner.space import invalid_reason

    if invalid_reason(cfg):
        raise TunerError(invalid_reason(cfg))
    out = store.check_writable(out)
    with measurement_lock(wait=not no_wait, what=f"tuner bench {Path(model).name}", path=lock_file):
        with Runner(timeout=timeout, mem_limit=mem_limit) as runner:
            try:
                rec = runner.run(cfg)
            except TrialInterrupted as e:
                store.append(out, [e.record])
                click.echo(f"interrupted: the trial was stopped and recorded as such in {out}", err=True)
                return 130
        # planner prediction (calibrated on this rig's earlier trials in `out`) and the bandwidth bound
        from tuner import planner, roofline
        roofline.annotate(rec, info, planner.Calibration.from_store([out], rec.hw_fingerprint))
    store.append(out, [rec])
    if as_json:
        click.echo(rec.to_json())
    else:
        click.echo(benchlib.table([rec]))
        click.echo(benchlib.summary(rec))
        if not rec.ok and rec.stderr_tail:
            click.echo("--- worker stderr (tail) ---\n" + rec.stderr_tail, err=True)
        click.echo(f"appended to {out}", err=True)
    return 0 if rec.ok else 1


def main():  # pragma: no cover - console script entry
    cli()


def _limits_options(f):
    """Constraints a recommendation must meet; shared by search and recommend."""
    opts = [
        click.option("--min-ctx", type=int, default=0, help="the context you need: smaller n_ctx never qualifies"),
        click.option("--max-vram", type=SIZE, default=None, help="VRAM a config may use, e.g. 20GiB"),
        click.option("--max-ram", type=SIZE, default=None, help="host RAM a config may use, e.g. 200GiB"),
        click.option("--headroom", type=HEADROOM, default="1GiB", show_default=True,
                     help="memory left free for the OS and the display (Windows/WDDM reserves VRAM): "
                          "a size or a share, e.g. 2GiB or 5%"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _check_limits(hwinfo, max_ram, max_vram, headroom) -> None:
    """Limits that leave no memory at all are a typo, not a search."""
    from tuner.options import headroom_bytes

    if headroom_bytes(headroom, hwinfo.ram_total) >= hwinfo.ram_total:
        raise TunerError(f"--headroom {headroom} is all of this machine's RAM "
                         f"({benchlib.fmt_size(hwinfo.ram_total)})")
    for name, v in (("--max-ram", max_ram), ("--max-vram", max_vram)):
        if v is not None and v <= 0:
            raise TunerError(f"{name} must be more than 0")


def _study_name(models: list[str]) -> str:
    import re

    stem = Path(models[0]).name.removesuffix(".gguf")
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", stem)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem) + (f"+{len(models) - 1}" if len(models) > 1 else "")


@cli.command()
@config_option("an experiment file (TOML): any option below; the command line wins over the file")
@click.option("-m", "--model", "models", multiple=True, help="GGUF file (repeat for several quants); split "
              "models: the first shard")
@click.option("--synthetic", type=click.Choice(["tiny", "dense", "moe"]), default=None,
              help="no model at hand: make this synthetic preset (into RESULTS/models) and search it")
@click.option("--quants", default="q8_0,q4_k_m", show_default=True, help="quants made with --synthetic")
@click.option("--study", "study", default=None, help="study name (default: from the model file name)")
@click.option("--results", default="results", show_default=True, type=click.Path(file_okay=False),
              help="where the study folder goes: RESULTS/<study>/")
@click.option("--storage", default=None, help="Optuna storage URL (default: sqlite in the study folder); a shared "
              "one (postgresql://user:pw@host/db) makes a fleet: run the same command on every host")
@click.option("--allow-mixed", is_flag=True, help="fleet: a host of another hardware/build fingerprint joins as a "
              "separate group (own trials and recommendation) instead of being refused")
@click.option("--heartbeat", "heartbeat_s", type=click.IntRange(min=1), default=10, show_default=True,
              help="fleet: seconds between a running trial's heartbeats; a host silent for 3x this long is dead "
                   "and its trial is run again by another host")
@click.option("--sampler", type=click.Choice(SAMPLERS), default="tpe", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--n-trials", type=click.IntRange(min=1), default=None, help="trials in the study in total (a fleet: "
              "over all hosts): a resumed study runs the rest (default: 20; grid: the whole grid)")
@click.option("--timeout", "timeout", type=DURATION, default=None, help="wall-time budget of this host, e.g. 8h")
@click.option("--resume", is_flag=True, help="continue an existing study (re-running the same command does too)")
@click.option("--objective", type=click.Choice(OBJECTIVES), default="tg", show_default=True,
              help="tg/pp t/s, TTFT, or mixed (end-to-end t/s of one request)")
@click.option("--pareto", is_flag=True, help="two objectives: tg t/s against peak memory (Optuna's Pareto front)")
@_limits_options
@space_params
@click.option("--mmap", "use_mmap", default=None, help="true, false or true,false")
@shape_params
@run_params("--trial-timeout")
@click.option("--drift-every", type=click.IntRange(min=0), default=10, show_default=True,
              help="re-measure an anchor config every K trials (0: never)")
@click.option("--drift-tolerance", type=float, default=0.05, show_default=True)
@click.option("--no-confirm", is_flag=True, help="recommend without re-measuring the top configs after the search")
@click.option("--baselines/--no-baselines", default=True, help="start with llama.cpp's defaults and the "
              "3500 MB/layer heuristic")
@click.option("--plan/--no-plan", default=True, help="skip configs the memory planner predicts cannot fit "
              "(recorded as skipped with the prediction)")
@click.option("--reuse-workers/--fresh-workers", default=True,
              help="keep a worker's model loaded for the next trial with the same load parameters")
def search(config, models, synthetic, quants, study, results, storage, sampler, seed, n_trials, timeout,
           resume, objective, pareto, min_ctx, max_vram, max_ram, headroom, trial_timeout, mem_limit, no_wait,
           lock_file, allow_mixed, heartbeat_s, no_confirm,
           drift_every, drift_tolerance, baselines, plan, reuse_workers, **params):
    """Search for the fastest config that fits: an Optuna study, every trial crash-isolated.

    Each dimension is a value, a list or a range: --ngl 0:61, --ctx 4096,8192, --threads 4:16:2.
    Out-of-memory, crashed and timed-out trials are recorded with their cause and steer the sampler
    away (Optuna constraints); configs a known OOM dominates are skipped. Results go to
    RESULTS/<study>/: trials.parquet, study.db (Optuna), logs/, recommended.json. Re-running the same
    command resumes the study. Ctrl-C stops after the current trial (twice: at once).

    \b
    Examples:
      tuner search --model Q4_K_M.gguf --model Q8_0.gguf --ngl 0:61 --ctx 4096,8192 --threads 4:16:2 --timeout 8h
      tuner search --config experiments/cpu-only.toml
      tuner search --synthetic dense --n-trials 10
    """
    from tuner import space as spacelib
    from tuner import study as studylib
    from tuner.runner import Runner

    models = list(models)
    if synthetic:
        from tuner.synth import synthesize

        try:
            models += [str(p) for p in synthesize(Path(results) / "models", synthetic,
                                                  tuple(q.strip() for q in quants.split(",") if q.strip()))]
        except ValueError as e:
            raise TunerError(str(e)) from None
        except OSError as e:
            raise TunerError(f"cannot write models to {Path(results) / 'models'}: {e.strerror or e}") from None
    if not models:
        raise TunerError("no model: pass --model FILE.gguf (repeatable) or --synthetic tiny|dense|moe")
    models = list(dict.fromkeys(models))
    infos = {m: model_info(m) for m in models}
    hwinfo = hardware.probe()
    build = hardware.build_info()
    shape = {k: params.pop(k) for k in ("n_prompt", "n_gen", "n_depth", "repetitions")}
    base = TrialConfig(model=models[0], n_threads=hwinfo.cores_physical, n_threads_batch=0,
                       **{k: v for k, v in shape.items() if v is not None})
    _check_limits(hwinfo, max_ram, max_vram, headroom)
    needs = {"tg": base.n_gen, "pp": base.n_prompt, "ttft": base.n_prompt, "mixed": base.n_prompt + base.n_gen}
    if not needs["tg" if pareto else objective]:
        raise TunerError(f"--objective {'tg' if pareto else objective} measures nothing with this test shape "
                         f"(-p {base.n_prompt} -n {base.n_gen})")
    try:
        space = spacelib.build_space(models, infos, params, base, bool(build.get("gpu_offload")),
                                     hwinfo.cores_physical, hwinfo.cores_logical)
    except spacelib.SpaceError as e:
        raise TunerError(str(e)) from None
    if "n_threads_batch" not in space.dims:
        # threads_batch follows threads unless searched on its own
        space.base = dataclasses.replace(space.base, n_threads_batch=0)
    try:
        spacelib.require_ctx(space, min_ctx)
    except spacelib.SpaceError as e:
        raise TunerError(str(e)) from None
    if plan and hwinfo.gpus:
        from tuner.planner import bound_gpu_layers
        from tuner.recommend import caps

        bound_gpu_layers(space, infos, caps(hwinfo, studylib.Limits(max_vram=max_vram, headroom=headroom))[1])
    name = study or _study_name(models)
    study_dir = Path(results) / name
    if n_trials is None and timeout is None and sampler != "grid":
        n_trials = 20
    opts = studylib.SearchOptions(
        study_dir=study_dir, study_name=name, storage=storage, sampler=sampler, seed=seed, n_trials=n_trials,
        timeout_s=timeout, objective=objective, pareto=pareto,
        limits=studylib.Limits(min_ctx=min_ctx, max_vram=max_vram, max_ram=max_ram, headroom=headroom),
        trial_timeout=trial_timeout, mem_limit=mem_limit, reuse_workers=reuse_workers,
        drift_every=drift_every, drift_tolerance=drift_tolerance, baselines=baselines, resume=resume,
        plan=plan, allow_mixed=allow_mixed, heartbeat_s=heartbeat_s, **({"confirm": 0} if no_confirm else {}))
    from tuner import fleet

    try:
        srch = fleet.new_search(space, opts, infos, hwinfo, build, on_trial=Progress(opts, space.size()))
    except studylib.StudyError as e:
        raise TunerError(str(e)) from None
    resume_hint = shlex.join(["tuner"] + sys.argv[1:]) if sys.argv and "tuner" in Path(sys.argv[0]).name else \
        f"tuner search --study {name} --results {results} --resume (same options)"
    # the lock comes first: resuming marks trials left RUNNING as interrupted, which must never touch a study
    # that another process is measuring right now
    with measurement_lock(wait=not no_wait, what=f"tuner search {name}", path=lock_file):
        try:
            srch.prepare()
        except studylib.StudyError as e:
            raise TunerError(str(e)) from None
        for note in space.notes:
            click.echo(f"note: {note}", err=True)
        varying = ", ".join(f"{k}={d.spec()}" for k, d in space.varying().items()) or "nothing varies"
        click.echo(f"study {name}: {len(models)} model(s), {space.size()} configs ({varying}); "
                   f"storage {studylib.redact(opts.storage_url)}", err=True)
        done = srch.done_trials()
        if done:
            click.echo(f"resuming study {name}: {done} trial(s) already done", err=True)
        with Runner(timeout=trial_timeout, mem_limit=mem_limit, reuse=reuse_workers, hw=hwinfo,
                    build=build) as runner:
            srch.runner = runner
            try:
                with studylib.StopOnSignal(srch):
                    rec = srch.run()
            except (KeyboardInterrupt, studylib.TrialInterrupted):
                srch.write_recommendation()
                click.echo(f"\ninterrupted: everything so far is in {study_dir}/; resume with:\n  {resume_hint}",
                           err=True)
                return 130
            finally:
                srch.close()
    if srch.stop_requested:
        click.echo(f"stopped: resume with:\n  {resume_hint}", err=True)
    _print_recommendation(rec, study_dir)
    return 0


class Progress:
    """One line per trial: count, elapsed, ETA against the budget, best so far, the last outcome."""

    def __init__(self, opts, space_size: int):
        self.opts = opts
        self.total = opts.n_trials or (space_size if opts.sampler == "grid" else None)

    def __call__(self, srch, rec) -> None:
        import time

        n = srch.done_trials()
        elapsed = time.monotonic() - srch.started
        eta = None
        if self.total:
            eta = elapsed / max(srch.n_run, 1) * max(self.total - n, 0)  # this session's pace
        if self.opts.timeout_s:
            left = max(0.0, self.opts.timeout_s - elapsed)
            eta = min(eta, left) if eta is not None else left
        best = srch.best_so_far()
        tg = rec.metric("tg")
        last = (f"#{rec.trial_number} ok tg {tg[0]:.2f}±{tg[1]:.2f} t/s" if rec.ok and tg[0] is not None
                else f"#{rec.trial_number} {rec.outcome}: {rec.cause[:70]}")
        unit = "ms" if self.opts.objective == "ttft" and not self.opts.pareto else "t/s"
        label = "tg" if self.opts.pareto else self.opts.objective
        click.echo(f"[{n}/{self.total or '?'}] {_hms(elapsed)} elapsed"
                   + (f", ETA {_hms(eta)}" if eta is not None else "")
                   + (f" | best {label} {best[1]:.2f} {unit} (#{best[0]})" if best else " | no ok trial yet")
                   + f" | {last}", err=True)


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _print_recommendation(rec: dict | None, study_dir: Path) -> None:
    if rec is None:
        click.echo(f"no config completed within the limits; see {study_dir / store.TRIALS_FILE} for the causes")
        return
    m = rec["measured"]
    click.echo(f"recommended (trial #{rec['trial_number']}): tg {m['tg_ts_mean']:.2f} ± {m['tg_ts_sd']:.2f} t/s, "
               f"pp {m['pp_ts_mean'] or 0:.2f} t/s, peak RSS {benchlib.fmt_size(m['peak_rss_bytes'])}"
               + (f", peak VRAM {benchlib.fmt_size(m['peak_vram_bytes'])}" if m.get("peak_vram_bytes") else ""))
    for label, b in rec["baselines"].items():
        if b.get("recommended_vs_baseline"):
            click.echo(f"  {b['recommended_vs_baseline']:.2f}x the {label} baseline (trial #{b['trial_number']})")
        else:
            click.echo(f"  {label} baseline: {b['outcome']}")
    click.echo(f"  llama-server: {rec['forms']['llama_server']}")
    click.echo(f"  written: {study_dir / 'recommended.json'}")


@cli.command("recommend")
@click.argument("study_dir", type=click.Path(file_okay=False), required=False)
@click.option("--storage", default=None, help="read the study from this shared storage (a fleet) instead of "
              "STUDY_DIR, which then receives a snapshot (optional)")
@click.option("--study", "study_name", default=None, help="with --storage: the study's name")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=None, help="default: the study's")
@_limits_options
@click.option("--json", "as_json", is_flag=True, help="print recommended.json instead of a summary")
@click.option("--write/--no-write", default=True, help="rewrite STUDY_DIR/recommended.json")
def recommend_cmd(study_dir, storage, study_name, objective, min_ctx, max_vram, max_ram, headroom, as_json, write):
    """Re-derive the recommendation from a study's trials under other constraints (nothing is re-run).

    \b
    Examples:
      tuner recommend results/my-study --max-vram 20GiB --min-ctx 8192
      tuner recommend --storage postgresql://tuner:PW@db-host/tuner --study my-study   (a fleet, from any host)
    """
    from tuner import recommend as recommendlib
    from tuner import study as studylib

    if storage or study_name:
        from tuner import fleet

        folders = fleet.snapshot_for_cli(storage, study_name, study_dir)
        for folder in folders:  # one recommendation per fingerprint group
            click.get_current_context().invoke(recommend_cmd, study_dir=str(folder), objective=objective,
                                               min_ctx=min_ctx, max_vram=max_vram, max_ram=max_ram,
                                               headroom=headroom, as_json=as_json, write=write)
        return
    if study_dir is None:
        raise TunerError("no study: pass STUDY_DIR, or --storage URL --study NAME")
    if not Path(study_dir).is_dir():
        raise TunerError(f"Directory '{study_dir}' does not exist.")

    recs = store.records(Path(study_dir))
    if not recs:
        raise TunerError(f"{study_dir} holds no trials")
    hwinfo = hardware.from_dict(recs[0].hw)
    old = {}
    path = Path(study_dir) / recommendlib.RECOMMENDED_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError as e:
            raise TunerError(f"{path} is not valid JSON ({e}); remove it or pass --no-write") from None
    objective = objective or old.get("objective", "tg")
    limits = studylib.Limits(min_ctx=min_ctx, max_vram=max_vram, max_ram=max_ram, headroom=headroom)
    rec = recommendlib.recommend(recs, hwinfo, limits, objective, study=recs[0].study,
                                 pareto="pareto_front" in old)
    if rec is None:
        raise TunerError(f"no completed trial in {study_dir} meets these limits")
    if write:
        recommendlib.write(path, rec)
    if as_json:
        click.echo(json.dumps(rec, indent=2, default=str))
    else:
        _print_recommendation(rec, Path(study_dir))

"""The `tuner` command line: thin Click commands over the library modules."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tuner import bench as benchlib
from tuner import hardware, store
from tuner.ggufmeta import ModelError, read_model
from tuner.lock import LockBusy, measurement_lock
from tuner.options import (TunerError, bench_params, config_option, run_params, shape_params)
from tuner.record import TrialConfig

EXIT_BUSY = 75  # EX_TEMPFAIL: another measurement holds the rig


class TunerGroup(click.Group):
    """Every error is one line on stderr: bad input exits 2, never with a traceback."""

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
@run_params
@click.option("-o", "--out", type=click.Path(dir_okay=False), default="results/bench.parquet", show_default=True,
              help="Parquet file the trial row is appended to")
@click.option("--json", "as_json", is_flag=True, help="print the trial record as JSON")
def bench(config, model, trial_timeout, mem_limit, no_wait, out, as_json, **params):
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
    cfg = benchlib.resolve(TrialConfig(model=model, **given), info)
    out = store.check_writable(out)
    with measurement_lock(wait=not no_wait, what=f"tuner bench {Path(model).name}"):
        with Runner(timeout=trial_timeout, mem_limit=mem_limit) as runner:
            rec = runner.run(cfg)
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

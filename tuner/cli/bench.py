"""`tuner bench`: one config measured llama-bench style (library: tuner.search.bench.measure)."""

from __future__ import annotations

import click

from tuner.cli.options import bench_params, config_option, rpc_option, run_params, shape_params
from tuner.errors import TunerError
from tuner.search import bench as benchlib


@click.command()
@config_option("a saved config to re-measure: recommended.json or a `tuner bench --json` record")
@click.argument("model", required=False)
@bench_params
@click.option("--mmap/--no-mmap", "use_mmap", default=None, help="memory-map the model (llama.cpp default: on)")
@click.option("--mlock", "use_mlock", is_flag=True, default=None, help="lock the model in RAM")
@click.option("--cpu-moe", "cpu_moe", is_flag=True, default=None, help="all routed experts in host RAM")
@click.option(
    "-ot",
    "--override-tensor",
    "overrides",
    multiple=True,
    help="PATTERN=BUFFER, as llama.cpp -ot (e.g. 'exps=CPU'); repeatable",
)
@rpc_option
@click.option("--warmup/--no-warmup", "warmup", default=None, help="one untimed run first (as llama-bench)")
@shape_params
@run_params()
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False),
    default="results/bench.parquet",
    show_default=True,
    help="Parquet file the trial row is appended to",
)
@click.option("--json", "as_json", is_flag=True, help="print the trial record as JSON")
def bench(config, model, timeout, load_timeout, mem_limit, no_wait, lock_file, out, as_json, **params):
    """Measure one config the way llama-bench does, in a crash-isolated worker process.

    Prints pp/tg t/s (mean ± sd over the repetitions), TTFT and peak memory, and appends the trial to a
    Parquet file. --parallel N (or a list, one trial each): N sequences of the test shape decoded together as
    llama-batched-bench does, in one context of n_ctx / N cells per sequence (--kv-unified: one shared cache),
    as llama-server -np N serves them: aggregate and per-stream t/s, TTFT per stream. The trial's outcome (ok,
    oom, crash, timeout, ...) is recorded either way; the exit code is 1 when a trial failed.

    \b
    Examples:
      tuner bench models/dense-q4_k_m.gguf -t 2 -p 512 -n 128 -r 5
      tuner bench --config results/my-study/recommended.json -r 10
      tuner bench models/moe-q8_0.gguf -ngl 99 -ts 1/1 --rpc 127.0.0.1:50052,127.0.0.1:50053
      tuner bench gemma-3-270m-q4_k_m.gguf --parallel 1,2,4 -c 4096 -p 512 -n 128
    """
    if not model:
        raise TunerError("no model given (pass MODEL or --config FILE)")
    run = {"timeout": timeout, "mem_limit": mem_limit, "no_wait": no_wait, "lock_file": lock_file}
    counts = params.pop("n_seq")
    results = (
        benchlib.measure_parallel(model, counts, out, load_timeout=load_timeout, **run, **params)
        if counts
        else [benchlib.measure(model, out, load_timeout=load_timeout, **run, **params)]
    )
    if results[-1].interrupted:
        click.echo(f"interrupted: the trial was stopped and recorded as such in {results[-1].out}", err=True)
        return 130
    recs = [res.record for res in results]
    if as_json:
        for rec in recs:
            click.echo(rec.to_json())
    else:
        click.echo(benchlib.table(recs))
        for rec in recs:
            click.echo(benchlib.summary(rec))
            if not rec.ok and rec.stderr_tail:
                click.echo("--- worker stderr (tail) ---\n" + rec.stderr_tail, err=True)
        click.echo(f"appended to {results[-1].out}", err=True)
    return 0 if all(rec.ok for rec in recs) else 1

"""`tuner quality`: what each quant file costs in output quality (KL divergence from a reference)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tuner.cli.options import check_count, quality_params, rpc_option, run_params
from tuner.measure import rpc as rpclib
from tuner.measure.lock import measurement_lock
from tuner.measure.runner import Runner
from tuner.quality.logits import QualityError
from tuner.quality.measure import DEFAULT_TOP_K, Budget, Settings, qualifying
from tuner.quality.measure import measure as measure_quality
from tuner.quality.results import Cache
from tuner.record import PARAMS
from tuner.search import bench as benchlib
from tuner.tables import text_table


def _llama_params(*names):
    """The llama.cpp options this command shares with `tuner bench` (same flags, same checks)."""

    def deco(f):
        for p in reversed([p for p in PARAMS if p.name in names]):
            f = click.option(
                *p.flags,
                p.name,
                type=click.Choice(p.type) if isinstance(p.type, tuple) else p.type,
                default=None,
                callback=check_count,
                help=p.help,
            )(f)
        return f

    return deco


@click.command("quality")
@click.option("-m", "--model", "models", multiple=True, help="GGUF file to measure (repeat for several quants)")
@click.option(
    "--save-reference-logits",
    type=click.Path(dir_okay=False),
    default=None,
    help="write the reference's summary here, for --reference-logits on another machine",
)
@quality_params(" (exit 1 beyond)")
@click.option(
    "-c",
    "--ctx",
    type=int,
    default=None,
    help="tokens per chunk, as llama-perplexity -c [512; with --reference-logits: the file's]",
)
@click.option(
    "--top-k",
    type=click.IntRange(min=0),
    default=None,
    help="reference tokens kept per position (0: the whole vocabulary) [1024]",
)
@_llama_params("n_gpu_layers", "n_threads", "type_k", "type_v")
@click.option(
    "--results",
    default="results",
    show_default=True,
    type=click.Path(file_okay=False),
    help="the cache lives in RESULTS/quality/",
)
@click.option(
    "--cache/--no-cache",
    "use_cache",
    default=True,
    show_default=True,
    help="reuse (and keep) results for the same model, reference, text, ctx and KV types",
)
@run_params()
@rpc_option
@click.option("--json", "as_json", is_flag=True, help="print a JSON list, one object per model")
def quality_cmd(
    models,
    save_reference_logits,
    reference,
    reference_logits,
    text,
    max_kld,
    min_same_top,
    ctx,
    top_k,
    n_gpu_layers,
    n_threads,
    type_k,
    type_v,
    results,
    use_cache,
    timeout,
    load_timeout,
    mem_limit,
    no_wait,
    lock_file,
    rpc,
    as_json,
):
    """Measure what each quant costs in quality: KL divergence of its next-token distributions from a reference.

    Computed as llama-perplexity --kl-divergence does (chunks of --ctx tokens, the second half of each scored):
    mean KLD ± standard error, median, 99th percentile, same-top %, PPL and PPL ratio to the reference. Each
    pass runs in a crash-isolated worker; results are cached in RESULTS/quality/. Exit 1 when a pass failed
    or a file misses --max-kld / --min-same-top.

    \b
    Examples:
      tuner quality -m model-Q8_0.gguf -m model-Q4_K_M.gguf -m model-Q2_K.gguf
      tuner quality -m model-BF16.gguf --save-reference-logits ref.npz     # on the big machine
      tuner quality -m model-IQ2_XXS.gguf --reference-logits ref.npz --json  # anywhere
      tuner quality -m model-Q4_K_M.gguf -m model-Q8_0.gguf --rpc 10.0.0.2:50052  # layers on another host
    """
    try:
        endpoints = rpclib.reachable(rpc)
        budget = Budget(max_kld, min_same_top) if max_kld is not None or min_same_top is not None else None
        settings = Settings(
            ctx=ctx,
            top_k=DEFAULT_TOP_K if top_k is None else top_k,
            n_threads=n_threads or 0,
            n_gpu_layers=99 if n_gpu_layers is None else n_gpu_layers,
            type_k=type_k or "f16",
            type_v=type_v or "f16",
            rpc=",".join(endpoints),
        )
        if reference_logits and top_k is not None:
            raise QualityError("--top-k is fixed by the --reference-logits file")
        cache = Cache(results) if use_cache else None
        with measurement_lock(wait=not no_wait, what="tuner quality", path=lock_file):
            with Runner(timeout=timeout, mem_limit=mem_limit, load_timeout=load_timeout) as runner:
                res = measure_quality(
                    list(models),
                    runner,
                    reference=reference,
                    reference_logits=reference_logits,
                    text=text,
                    settings=settings,
                    cache=cache,
                    save_reference=save_reference_logits,
                )
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was cached for the pass that was running", err=True)
        return 130
    verdicts = qualifying(res, budget) if budget else {}
    if as_json:
        rows = [dict(r.to_dict(), **({"within_budget": verdicts[r.model][0]} if budget else {})) for r in res]
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(table(res, verdicts))
        for r in res:
            if not r.ok and r.stderr_tail:
                click.echo(f"--- {Path(r.model).name}: worker stderr (tail) ---\n{r.stderr_tail}", err=True)
    if save_reference_logits:
        click.echo(f"reference logits written: {save_reference_logits}", err=True)
    failed = any(not r.ok for r in res) or any(not ok for ok, _ in verdicts.values())
    return 1 if failed else 0


def table(res, verdicts: dict) -> str:
    head = ["model", "type", "size", "KLD mean", "median", "p99", "same top", "PPL", "PPL ratio", "tokens"]
    if verdicts:
        head.append("budget")
    rows = []
    for r in res:
        name = Path(r.model).name + (" (ref)" if r.is_reference else "") + (" (cached)" if r.cached else "")
        size = benchlib.fmt_size(r.model_size_bytes) if r.model_size_bytes else ""
        if r.ok:
            row = [
                name,
                r.file_type,
                size,
                f"{r.kld_mean:.5f} ± {r.kld_mean_err:.5f}",
                f"{r.kld_median:.5f}",
                f"{r.kld_p99:.4f}",
                f"{r.same_top_pct:.2f} %",
                f"{r.ppl:.3f}",
                f"{r.ppl_ratio:.4f}",
                str(r.n_tokens),
            ]
        else:
            row = [name, r.file_type, size, f"{r.outcome}: {r.cause[:80]}"] + [""] * 6
        if verdicts:
            ok, why = verdicts[r.model]
            row.append("ok" if ok else why)
        rows.append(row)
    lines = text_table(head, [[str(x) for x in r] for r in rows], rule=False).splitlines()
    if res and res[0].reference:
        lines.append(f"reference: {res[0].reference}; text: {res[0].text}; ctx {res[0].ctx}; top-k {res[0].top_k}")
    return "\n".join(lines)

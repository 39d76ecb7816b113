"""`tuner synth`: synthetic GGUF models, no download."""

from __future__ import annotations

import click

from tuner.errors import TunerError
from tuner.model.synth import synthesize
from tuner.units import fmt_size


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--preset",
    type=click.Choice(["tiny", "dense", "dense-xl", "moe"]),
    default="tiny",
    show_default=True,
    help="tiny: unit tests; dense: ~130 M params; dense-xl: ~575 M; moe: Mixtral-style experts",
)
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
    try:
        paths = synthesize(
            out_dir, preset, tuple(q.strip() for q in quants.split(",") if q.strip()), seed, force, **sizes
        )
    except OSError as e:
        raise TunerError(f"cannot write models to {out_dir}: {e.strerror or e}") from None
    for p in paths:
        click.echo(f"{p}  {fmt_size(p.stat().st_size)}")

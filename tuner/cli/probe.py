"""`tuner probe`: measure this rig's per-type kernel speeds once (library: tuner.plan.probe)."""

from __future__ import annotations

import json

import click

from tuner.errors import TunerError
from tuner.plan import probe


@click.command("probe")
@click.option(
    "-t",
    "--threads",
    "threads",
    default=None,
    help="thread counts to measure, comma-separated (default: 1, 2, 4, ... and the physical cores)",
)
@click.option(
    "--types",
    "types",
    default=None,
    help="ggml types to measure, comma-separated (default: F16,Q8_0,Q6_K,Q5_K,Q5_0,Q4_K,Q4_0,Q3_K,Q2_K)",
)
@click.option(
    "-r",
    "--repetitions",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="repetitions within each trial",
)
@click.option(
    "--passes",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="passes over every model; a figure is the median over its passes (a shared machine drifts "
    "between minutes more than within a trial)",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="probe file (default: ~/.cache/tuner/probe-<hardware>-<build>.json, which estimate --speed reads)",
)
@click.option(
    "--models",
    "model_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="folder for the probe's synthetic models (default: ~/.cache/tuner/probe-models)",
)
@click.option("--show", is_flag=True, help="print this rig's probe without measuring")
@click.option("--json", "as_json", is_flag=True, help="print the probe as JSON")
def probe_cmd(threads, types, repetitions, passes, out, model_dir, show, as_json):
    """Measure what decides llama.cpp's speed here, for `tuner estimate --speed`.

    Times llama.cpp's tg (matrix-vector) and pp (matrix-matrix) kernels per quant type on synthetic one-type
    models beyond the caches, at each thread count, plus memory copy bandwidth (and, on a GPU build, the
    device's figures and the host→device link). Cached per hardware and build fingerprint; the models are made
    once (~1 GB in ~/.cache/tuner/probe-models). A few minutes on 2 cores.

    \b
    Examples:
      tuner probe                 # then: tuner estimate model.gguf --speed --what-if q8_0,q4_k_m,q2_k
      tuner probe -t 1,2 -r 3 --passes 3
      tuner probe --show
    """
    if show:
        data = probe.load(out)
        if data is None:
            raise TunerError("no probe for this machine and build yet: run `tuner probe`")
    else:
        ts = _ints(threads, "--threads") if threads else None
        ty = [t.strip().upper() for t in types.split(",") if t.strip()] if types else None
        data, path = probe.run(
            out,
            ty,
            ts,
            repetitions,
            model_dir=model_dir,
            passes=passes,
            echo=None if as_json else lambda s: click.echo(s, err=True),
        )
        click.echo(f"wrote {path}", err=True)
    if as_json:
        click.echo(json.dumps(data, indent=1))
    else:
        click.echo(probe.summary(data))


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TunerError(f"{what}: not a list of integers: {text!r}") from None
    if not vals or min(vals) < 1:
        raise TunerError(f"{what}: values must be positive integers, got {text!r}")
    return vals

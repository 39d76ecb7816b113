"""`tuner estimate`: plan memory for models before running anything (metadata only, never the tensor data)."""

from __future__ import annotations

import click

from tuner.cli.options import SIZE, VRAM, rpc_option
from tuner.plan.estimate import ModelEstimate, estimate
from tuner.record import FLASH_ATTN, KV_TYPES, TrialConfig
from tuner.tables import text_table
from tuner.units import fmt_size


def table(rows: list[dict], headers: list[tuple[str, str]]) -> str:
    return text_table(
        [h for _, h in headers], [[_cell(r.get(k)) for k, _ in headers] for r in rows], set(range(1, len(headers)))
    )


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return str(v)


@click.command("estimate")
@click.argument("models", nargs=-1, required=True)
@click.option("--ctx", "ctx", default="4096", show_default=True, help="context sizes, comma-separated")
@click.option(
    "--vram",
    type=VRAM,
    default=None,
    help="GPU memory to plan for, one device's or each device's: 24GiB or 24GiB,24GiB (default: detected, 0 without "
    "GPU)",
)
@click.option("--ram", type=SIZE, default=None, help="host RAM to plan for (default: this machine's total)")
@click.option(
    "--headroom", default="5%", show_default=True, help="memory kept free: a share or a size, e.g. 5% or 2GiB"
)
@click.option("-ctk", "--cache-type-k", "type_k", type=click.Choice(KV_TYPES), default="f16", show_default=True)
@click.option("-ctv", "--cache-type-v", "type_v", type=click.Choice(KV_TYPES), default="f16", show_default=True)
@click.option(
    "-fa",
    "--flash-attn",
    "flash_attn",
    type=click.Choice(FLASH_ATTN),
    default="auto",
    show_default=True,
    help="flash attention (off: KQ scores n_ctx wide per head, a transposed V cache)",
)
@click.option(
    "-ngl",
    "--n-gpu-layers",
    "n_gpu_layers",
    type=int,
    default=None,
    help="show the split for this many GPU layers instead of the largest that fits",
)
@click.option("-b", "--batch-size", "n_batch", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("-ub", "--ubatch-size", "n_ubatch", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--mmap/--no-mmap", "use_mmap", default=True, show_default=True)
@click.option("-ncmoe", "--n-cpu-moe", "n_cpu_moe", type=click.IntRange(min=0), default=0)
@click.option("--cpu-moe", is_flag=True, help="all routed experts in host RAM")
@click.option("--what-if", "what_if", default=None, help="quant types to size this model in, e.g. q8_0,q4_k_m,iq2_xxs")
@click.option(
    "--calib",
    "calib_paths",
    multiple=True,
    type=click.Path(),
    help="Parquet results of this rig to calibrate the compute term from (repeatable)",
)
@click.option(
    "--speed",
    is_flag=True,
    help="predict tg and pp t/s of the file and each --what-if quant on this rig (needs `tuner probe`)",
)
@click.option(
    "-t",
    "--threads",
    "threads",
    type=click.IntRange(min=1),
    default=None,
    help="threads for --speed (default: the physical cores)",
)
@click.option(
    "--probe",
    "probe_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="probe file for --speed (default: this machine's and build's, from `tuner probe`)",
)
@rpc_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def estimate_cmd(
    models,
    ctx,
    vram,
    ram,
    headroom,
    type_k,
    type_v,
    flash_attn,
    n_gpu_layers,
    n_batch,
    n_ubatch,
    use_mmap,
    n_cpu_moe,
    cpu_moe,
    what_if,
    calib_paths,
    speed,
    threads,
    probe_path,
    rpc,
    as_json,
):
    """Plan memory from GGUF metadata alone: sizes, KV cache, GPU/host split, the largest -ngl that fits.

    Reads only the header (a 400 GB split model plans in well under a second). Host RAM comes in two parts:
    what must stay resident (KV cache, compute and output buffers, repacked weights, the process) and the
    mmap'd weight pages, which the kernel can drop and re-read. "fits" is judged on the resident part (short:
    it would swap); when the mmap'd pages do not fit beside it the model still runs, re-reading weights from
    disk. --what-if sizes the model in other quant types the way llama.cpp's quantizer would write it.
    --speed predicts tg and pp t/s (as `tuner bench` measures them, at the probe's pp128/tg32 shape) of the
    file and of each --what-if quant from this rig's probe: run `tuner probe` once first.

    \b
    Examples:
      tuner estimate models/dense-q4_k_m.gguf --ctx 4096,32768 --vram 24GiB --ram 64GiB
      tuner estimate DeepSeek-V3-Q4_K_M-00001-of-00009.gguf --vram 80GiB -ctk q8_0 --json
      tuner estimate models/dense-f16.gguf --what-if q8_0,q4_k_m,iq2_xxs
      tuner estimate gemma-3-270m-q4_k_m.gguf --speed --what-if q8_0,q3_k_m,q2_k -t 2
      tuner estimate models/moe-q8_0.gguf --rpc 127.0.0.1:50052,127.0.0.1:50053   # the servers' devices
    """
    base = TrialConfig(
        model="",
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        type_k=type_k,
        type_v=type_v,
        flash_attn=flash_attn,
        use_mmap=use_mmap,
        n_cpu_moe=n_cpu_moe,
        cpu_moe=cpu_moe,
    )
    est = estimate(
        models,
        ctx,
        ram=ram,
        vram=vram,
        headroom=headroom,
        base=base,
        n_gpu_layers=n_gpu_layers,
        what_if=what_if,
        calib=calib_paths,
        speed=speed,
        threads=threads,
        probe=probe_path,
        rpc=rpc,
    )
    if as_json:
        click.echo(est.to_json())
        return
    for m in est.models:
        _echo_model(m)
        click.echo("")


def _echo_model(m: ModelEstimate) -> None:
    info = m.info
    click.echo(
        f"{info.name} ({info.arch}, {info.file_type}, {info.n_layer} layers"
        f"{f', {info.n_expert} experts ({info.n_expert_used} used)' if info.is_moe else ''}"
        f"{f', {len(info.shards)} shards' if len(info.shards) > 1 else ''}): "
        f"{fmt_size(info.file_size)} on disk; planning for "
        + (
            " + ".join(f"{d['name']} {fmt_size(d['vram'])}" for d in m.devices)
            if len(m.devices) > 1 or any(d["name"].startswith("RPC") for d in m.devices)
            else fmt_size(m.vram)
        )
        + " VRAM, "
        f"{fmt_size(m.ram)} RAM, {m.headroom:.0%} headroom"
    )
    rows = [
        dict(
            r,
            size=fmt_size(r["size_bytes"]),
            kv="-" if r["note"] else fmt_size(r["kv_bytes"]),
            gpu=fmt_size(r["gpu_bytes"]),
            resident=fmt_size(r["resident_bytes"]),
            mmap=fmt_size(r["mmap_bytes"]),
            ngl=f"{r['max_gpu_layers']}/{info.n_layer + 1}",
        )
        for r in m.contexts
    ]
    # host RAM in two parts: what must stay resident (fits is judged on it) and the mmap'd file pages
    headers = [
        ("n_ctx", "n_ctx"),
        ("size", "weights"),
        ("kv", "KV cache"),
        ("ngl", "max ngl"),
        ("gpu", "GPU"),
        ("resident", "host resident"),
        ("mmap", "+ mmap'd"),
        ("fits", "fits"),
        ("weights_cached", "cached"),
    ]
    if info.is_moe and m.vram:
        headers.insert(4, ("min_n_cpu_moe", "n_cpu_moe@all"))
    click.echo(table(rows, headers))
    if m.contexts and m.contexts[0]["note"]:
        click.echo(f"note: {m.contexts[0]['note']}")
    for r in m.contexts:
        if r["warning"]:
            click.echo(f"warning: n_ctx {r['n_ctx']}: {r['warning']}")
    if m.what_if:
        click.echo(f"\nwhat if {info.name} were quantized as (llama.cpp's type choices, from tensor shapes):")
        wrows = [
            dict(
                w,
                size=fmt_size(w["size_bytes"]),
                bpw=f"{w['bpw']:.2f}",
                rel=f"{100 * w['vs_current']:.0f}%" if w["vs_current"] else "-",
                tg=_tps(w.get("pred_tg_tps")),
                pp=_tps(w.get("pred_pp_tps")),
            )
            for w in m.what_if
        ]
        click.echo(
            table(
                wrows,
                [("quant", "quant"), ("size", "size"), ("bpw", "bits/weight"), ("rel", "vs this file")]
                + ([("tg", "pred tg t/s"), ("pp", "pred pp t/s")] if m.speed is not None else []),
            )
        )
    if m.speed is not None:
        _echo_speed(m)


# -- --speed: predicted t/s from the rig probe (tuner.plan.estimate, tuner.plan.speed) -------------------------------


def _tps(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _echo_speed(m: ModelEstimate) -> None:
    rows = m.speed
    r0 = rows[0]
    if r0["note"]:
        click.echo(f"speed: {r0['note']}")
        return
    shape = m.speed_shape
    click.echo(
        f"predicted speed of this file ({r0['quant']}), {r0['threads']} threads, ngl {r0['n_gpu_layers']}: "
        f"tg{shape['n_gen']} {_tps(r0['pred_tg_tps'])} t/s, pp{shape['n_prompt']} {_tps(r0['pred_pp_tps'])} t/s "
        "(from `tuner probe`; a prediction of `tuner bench`, not a bound)"
    )
    odd = sorted({t for r in rows for t in r["unprobed_types"]})
    if odd:
        click.echo(f"note: types the probe did not measure ({', '.join(odd)}) use the nearest probed type's figures")

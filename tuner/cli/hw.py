"""`tuner hw`: what this machine has."""

from __future__ import annotations

import json

import click

from tuner.measure import hardware


@click.command()
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

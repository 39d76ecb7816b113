"""`tuner hw`: what this machine has."""

from __future__ import annotations

import json

import click

from tuner.cli.options import rpc_option
from tuner.measure import hardware
from tuner.measure import rpc as rpclib
from tuner.units import fmt_size


@click.command()
@rpc_option
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def hw(rpc, as_json):
    """Show CPU, memory, swap, GPUs, whether llama-cpp-python can offload, and llama.cpp's devices.

    The GPUs are what the installed llama.cpp enumerates (every backend it was built with), in its order (the
    order of --tensor-split and --main-gpu), each NVIDIA one matched to NVML by PCI bus id; the devices add
    those of --rpc servers as llama-server adds them.

    \b
    Examples:
      tuner hw --json
      tuner hw --rpc 127.0.0.1:50052,127.0.0.1:50053
    """
    endpoints = rpclib.reachable(rpc)
    h = hardware.probe(with_llama=True)
    try:
        devices = hardware.llama_devices(endpoints)
    except RuntimeError as e:
        devices, error = [], str(e)
    else:
        error = ""
    if as_json:
        click.echo(
            json.dumps({**h.to_dict(), "devices": devices, **({"devices_error": error} if error else {})}, indent=2)
        )
        return
    gib = 2**30
    rows = [
        ("CPU", h.cpu),
        ("cores", f"{h.cores_physical} physical, {h.cores_logical} logical"),
        ("RAM", f"{h.ram_total / gib:.1f} GiB total, {h.ram_available / gib:.1f} GiB available"),
        ("swap", f"{h.swap_total / gib:.1f} GiB total, {h.swap_free / gib:.1f} GiB free"),
        ("OS", h.os),
        ("GPU offload", "yes" if h.gpu_offload else "no (no GPU or RPC device to offload to)"),
    ]
    for i, g in enumerate(h.gpus):
        nvml = f"NVML GPU {g.index}, driver {g.driver}, CUDA {g.cuda}" if g.index >= 0 else "not known to NVML"
        placed = f"llama.cpp's {g.llama}" if g.llama else "not used by this llama.cpp build"
        rows.append(
            (
                f"GPU {i}",
                f"{g.name}, {g.vram_total / gib:.1f} GiB ({g.vram_free / gib:.1f} free), {placed}, {nvml}"
                + (f", PCI {g.pci}" if g.pci else ""),
            )
        )
    if not h.gpus:
        rows.append(("GPUs", f"none ({h.nvml or 'NVML found no device'})"))
    for d in devices:  # llama.cpp's own list: what n_gpu_layers and tensor_split place layers on
        rows.append(
            (
                f"device {d['name']}",
                f"{d['description']} ({d['backend']}, {d['type']}), "
                f"{fmt_size(d['total'])} ({fmt_size(d['free'])} free)",
            )
        )
    if error:
        rows.append(("devices", error))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k.ljust(w)}  {v}")

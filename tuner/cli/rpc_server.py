"""`tuner rpc-server`: this host's CPU as a llama.cpp RPC device (llama.cpp's ggml-rpc-server, in-process)."""

from __future__ import annotations

import os
import threading

import click
import psutil

from tuner import ports
from tuner.cli.options import SIZE
from tuner.measure import rpc
from tuner.units import fmt_size, physical_cores


@click.command("rpc-server")
@click.option(
    "-H",
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="address to listen on; anything but loopback exposes an unauthenticated protocol",
)
@click.option("-p", "--port", type=click.IntRange(1, 65535), default=rpc.DEFAULT_PORT, show_default=True)
@click.option(
    "--mem",
    type=SIZE,
    default=None,
    help="make it a device of this size: the size clients are told and the limit its buffers meet "
    "(default: the host's RAM, reported, not enforced, as llama.cpp's server does)",
)
@click.option(
    "--sizing-only",
    is_flag=True,
    help="a device of --mem that holds nothing: llama.cpp's no_alloc loads (--fit, llama-fit-params, tuner's "
    "planner) size a GPU that is not here, and any real buffer is refused; --mem may exceed this host's RAM",
)
@click.option("-t", "--threads", type=click.IntRange(1), default=None, help="compute threads (default: physical cores)")
def rpc_server_cmd(host, port, mem, sizing_only, threads):
    """Serve this host's CPU to llama.cpp RPC clients until stopped (Ctrl-C).

    Clients list it with --rpc HOST:PORT (tuner bench/search/hw, llama-server --rpc); its device then joins
    their GPUs. With --mem the device has that size for real: an allocation past it fails on the client as a
    too-small GPU's would (a model share that does not fit, a compute buffer), and the server goes on.
    The RPC protocol has no authentication: keep servers on 127.0.0.1 or a private network.

    With --sizing-only the device only sizes: an 80 GiB GPU that is not here, for `llama-fit-params --rpc` or
    `tuner search --gpus ... --dry-run` (which starts such servers itself) to plan on.

    \b
    Examples:
      tuner rpc-server --port 50052 --mem 4GiB
      tuner rpc-server --host 10.0.0.5 --port 50052     # another host of a private cluster
      tuner rpc-server --port 50060 --mem 80GiB --sizing-only
    """
    ram = psutil.virtual_memory().total
    if mem is not None and mem <= 0:
        raise rpc.RpcError(f"--mem must be more than 0 bytes, got {mem}")
    if sizing_only and mem is None:
        raise rpc.RpcError("--sizing-only needs --mem: the size of the device it stands in for")
    if mem is not None and mem > ram and not sizing_only:
        raise rpc.RpcError(f"--mem {fmt_size(mem)} is more than this host's RAM ({fmt_size(ram)})")
    ports.check_port(host, port)
    if not rpc.is_loopback(host):
        click.echo(
            f"warning: serving on {host}: llama.cpp's RPC protocol has no authentication; anyone who can "
            "reach this port can use this machine's memory and compute",
            err=True,
        )
    from tuner import llama  # noqa: PLC0415 - loads llama.cpp: only the server process, after its checks

    log = lambda line: click.echo(f"rpc-server: {line}", err=True)  # noqa: E731
    cap = llama.DeviceCap(mem, log=log, holds=not sizing_only) if mem else None
    endpoint = f"{host}:{port}"
    # the server blocks in accept() inside llama.cpp: it runs in a thread so that Ctrl-C and SIGTERM end the process
    n = threads or physical_cores()
    server = threading.Thread(target=llama.rpc_serve, args=(endpoint, n), daemon=True)
    server.start()
    click.echo(
        f"tuner rpc-server: serving {'a ' + fmt_size(cap.size) + ' device' if cap else 'the CPU'}"
        f"{' (sizing only)' if sizing_only else ''} on "
        f"{endpoint} (pid {os.getpid()})",
        err=True,
    )
    try:
        while server.is_alive():
            server.join(0.5)
    except KeyboardInterrupt:
        click.echo("tuner rpc-server: stopped", err=True)
        os._exit(0)  # the server thread waits in llama.cpp's accept(): nothing to join
    raise rpc.RpcError(f"the RPC server on {endpoint} could not start or stopped (llama.cpp's message above)")

"""llama.cpp's RPC backend: devices on other hosts (and on this one), added as llama-server's `--rpc` adds them.

A server (`tuner rpc-server`, or llama.cpp's own `ggml-rpc-server`) exposes a host's device; the measuring host
lists servers with `--rpc host:port,host:port`, and their devices join its GPUs: n_gpu_layers, tensor_split,
the expert overrides and llama.cpp's buffer placement treat each as one. The protocol has no authentication:
a server belongs on 127.0.0.1 or a private network, never an open one.

Only a worker process registers servers (tuner.llama.rpc_add_servers): llama.cpp aborts the process that finds
a server unreachable or loses one mid-run, and that must be a failed trial, not the end of the search. The
parent checks each endpoint before anything runs (bad input: one line, exit 2).

    from tuner.measure import rpc
    rpc.parse_endpoints("127.0.0.1:50052,127.0.0.1:50053")   # ('127.0.0.1:50052', '127.0.0.1:50053')
    rpc.check_reachable(("127.0.0.1:50052",))               # RpcError when nothing listens there
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tuner import ports
from tuner.errors import TunerError

DEFAULT_PORT = 50052  # ggml-rpc-server's
ENV = "TUNER_RPC"  # the endpoints a worker registers at start (the Runner sets it)


class RpcError(TunerError):
    """An RPC endpoint that is malformed, unreachable, or a server that cannot start: one line."""


def parse_endpoints(text: str | list | tuple | None) -> tuple[str, ...]:
    """'host:port[,host:port...]' → a tuple of 'host:port' (llama-server's --rpc spelling); '' → ()."""
    if not text:
        return ()
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    out = []
    for item in (str(x).strip() for x in items):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RpcError(f"--rpc {item!r}: expected HOST:PORT (e.g. 127.0.0.1:{DEFAULT_PORT})")
        if item in out:
            raise RpcError(f"--rpc {item}: listed twice")
        out.append(item)
    return tuple(out)


def split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def check_reachable(endpoints: tuple[str, ...], timeout: float = 3.0) -> None:
    """Every server accepts a connection (checked by this process, which never talks the protocol: an
    unreachable endpoint here is bad input, not an abort)."""
    for endpoint in endpoints:
        try:
            with socket.create_connection(split(endpoint), timeout=timeout):
                pass
        except OSError as e:
            raise RpcError(f"--rpc {endpoint}: no RPC server reachable there ({e.strerror or e})") from None


def reachable(text: str | list | tuple | None) -> tuple[str, ...]:
    """`--rpc` as every command takes it: parsed (`parse_endpoints`) and each server reachable now
    (`check_reachable`), since llama.cpp aborts the process that adds an unreachable one: bad input, before
    anything runs."""
    endpoints = parse_endpoints(text)
    check_reachable(endpoints)
    return endpoints


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LocalServer:
    """A `tuner rpc-server` process on this host: this CPU as a device of `mem` bytes (None: the host's RAM),
    reachable when the constructor returns; stopped with SIGINT, as a user stops it (`stop`, or a `with` block).
    For rig checks and notebooks: two of them make a two-device rig on a CPU-only machine.

        with LocalServer(40 << 20, log_dir) as a, LocalServer(40 << 20, log_dir) as b:
            run_search([model], SearchOptions(rpc=f"{a.endpoint},{b.endpoint}"))

    `sizing_only`: a device of `mem` that holds nothing (`tuner rpc-server --sizing-only`), a GPU that is not here
    for llama.cpp's no_alloc loads to size.
    """

    def __init__(
        self, mem: int | None, log_dir: str | os.PathLike, threads: int = 1, start_s: float = 60, sizing_only=False
    ):
        self.port = ports.free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log = Path(log_dir) / f"rpc-{self.port}.log"
        args = [sys.executable, "-c", "from tuner.cli import cli; cli()", "rpc-server", "--port", str(self.port)]
        args += ["-t", str(threads)] + (["--mem", str(mem)] if mem else []) + (["--sizing-only"] if sizing_only else [])
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")  # servers and client share the cores: no spinning
        from tuner.measure.worker import set_pdeathsig  # noqa: PLC0415 - the worker's imports, only when serving

        with open(self.log, "wb") as f:
            # it dies with its owner (a search killed mid-plan leaves no server holding a port)
            self.proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env, preexec_fn=set_pdeathsig)
        deadline = time.monotonic() + start_s
        while True:
            try:
                check_reachable((self.endpoint,), timeout=1)
                return
            except RpcError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RpcError(f"rpc-server did not start: {self.log.read_text()[-300:]}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

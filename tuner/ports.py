"""Local TCP ports: one free for a local server, and whether a server can listen on one.

A server started on a port in use fails late: ggml's RPC server inside llama.cpp, uvicorn or llama-server after
loading a model. So `tuner rpc-server` and `tuner verify` check the port first, binding as those servers do.

Example:
    port = check_port("127.0.0.1", 0)  # a free port (0: any), else PortError
"""

from __future__ import annotations

import socket

from tuner.errors import TunerError


class PortError(TunerError):
    """A port no server can listen on here (in use, or the address is not this host's)."""


def check_port(host: str, port: int) -> int:
    """`port` if a server can listen on host:port (bound and released here; 0: a free one the kernel picks), else
    PortError."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the servers bind (ggml-rpc's transport.cpp, uvicorn, llama-server): a port a closed connection left in
        # TIME_WAIT is free, one a process listens on is not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PortError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
        return s.getsockname()[1]


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel has just handed out on `host` (for a local server)."""
    return check_port(host, 0)

"""A real PostgreSQL server for the fleet tests: initdb in a temp folder, a free loopback port, stopped at the end.

PostgreSQL refuses to run as root: as root the server runs as the `postgres` OS user (created when missing, as on
a fresh CI machine); otherwise as the current user. Clients connect over TCP with a password (scram-sha-256), so
wrong credentials are refused as on a real deployment.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tuner import ports

USER = "tuner"


@dataclass
class Server:
    port: int
    password: str
    folder: Path

    def url(self, db: str = "tuner", password: str | None = None) -> str:
        return f"postgresql://{USER}:{password or self.password}@127.0.0.1:{self.port}/{db}"


def _bin(name: str) -> str:
    path = shutil.which(name) or next((str(p) for p in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if path is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (the fleet tests need a real server)")
    return path


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam("postgres")
    except KeyError:  # a fresh machine with the binaries but no service account
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"], check=True
        )
    return ["runuser", "-u", "postgres", "--", *cmd]


def start() -> Server:
    folder = Path(tempfile.mkdtemp(prefix="tuner-pg-"))
    data, sock = folder / "data", folder / "sock"
    sock.mkdir()
    password = secrets.token_hex(12)
    pwfile = folder / "pw"
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        _as_server_user(["true"])  # creates the account when missing
        shutil.chown(folder, "postgres")
        shutil.chown(sock, "postgres")
        shutil.chown(pwfile, "postgres")
    subprocess.run(
        _as_server_user(
            [
                _bin("initdb"),
                "-D",
                str(data),
                "-U",
                USER,
                "--pwfile",
                str(pwfile),
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        ),
        check=True,
        capture_output=True,
    )
    port = ports.free_port()
    opts = f"-h 127.0.0.1 -p {port} -k {sock} -c fsync=off -c max_connections=200"
    subprocess.run(
        _as_server_user(
            [_bin("pg_ctl"), "-D", str(data), "-o", opts, "-l", str(folder / "log"), "-w", "-t", "60", "start"]
        ),
        check=True,
        capture_output=True,
    )
    srv = Server(port, password, folder)
    import psycopg

    with psycopg.connect(
        f"host=127.0.0.1 port={port} user={USER} password={password} dbname=postgres", autocommit=True
    ) as conn:
        conn.execute("CREATE DATABASE tuner")
    return srv


def create_db(srv: Server, name: str) -> str:
    import psycopg

    with psycopg.connect(
        f"host=127.0.0.1 port={srv.port} user={USER} password={srv.password} dbname=postgres", autocommit=True
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return srv.url(name)


def stop(srv: Server) -> None:
    subprocess.run(
        _as_server_user([_bin("pg_ctl"), "-D", str(srv.folder / "data"), "-m", "immediate", "-w", "stop"]),
        capture_output=True,
    )
    shutil.rmtree(srv.folder, ignore_errors=True)

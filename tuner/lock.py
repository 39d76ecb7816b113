"""One rig, one measurement at a time: a host-wide lock held while trials run.

The lock is an fcntl lock (via filelock), so the kernel releases it when its holder dies, SIGKILL included.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import click
from filelock import FileLock, Timeout

DEFAULT_LOCK = Path(tempfile.gettempdir()) / "tuner-measure.lock"


class LockBusy(RuntimeError):
    pass


def lock_path(path: str | os.PathLike | None = None) -> Path:
    """--lock-file, else TUNER_LOCK_FILE, else one lock per machine. One machine can stand in for several hosts of a
    fleet (tests, a demo) with a lock file each."""
    return Path(path or os.environ.get("TUNER_LOCK_FILE", DEFAULT_LOCK))


@contextlib.contextmanager
def measurement_lock(wait: bool = True, what: str = "tuner", path: str | os.PathLike | None = None):
    path = lock_path(path)
    owner = path.with_suffix(".owner")
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = owner.read_text().strip() if owner.exists() else "another process"
        if not wait:
            raise LockBusy(f"another measurement is running ({holder}); lock {path}") from None
        click.echo(f"waiting for the measurement lock: {holder} is measuring on this machine...", err=True)
        lock.acquire()
    try:
        owner.write_text(f"{what} (pid {os.getpid()})")
        yield
    finally:
        lock.release()

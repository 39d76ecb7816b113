"""One rig, one measurement at a time: a host-wide lock held while trials run.

The lock is an fcntl lock (via filelock), so the kernel releases it when its holder dies, SIGKILL included.

Where it lives: `tuner/measure.lock` under /run/lock (or /var/lock), the FHS place for locks shared by every
user of the host, else under /tmp. Never under tempfile.gettempdir(): TMPDIR is often per user (pam_tmpdir,
a service's PrivateTmp), and two users with two locks would measure at once. The folder is made
world-writable without the sticky bit and the files readable and writable by all, so another user can open
and take the same lock (Linux's fs.protected_regular refuses opening another user's file in a sticky folder).
TUNER_LOCK_FILE or --lock-file chooses another file.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from filelock import FileLock, Timeout

from tuner.errors import TunerError

SHARED_DIRS = ("/run/lock", "/var/lock", "/tmp")  # first writable one wins
LOCK_DIR = "tuner"
LOCK_NAME = "measure.lock"
FILE_MODE = 0o666
DIR_MODE = 0o777


class LockBusy(TunerError):
    """Another measurement holds the rig and --no-wait was given (exit 75, EX_TEMPFAIL: try again later)."""

    exit_code = 75


def default_lock(dirs: tuple[str, ...] | None = None) -> Path:
    """The host's lock file, in the first of `dirs` (SHARED_DIRS) that is a writable folder."""
    dirs = dirs or SHARED_DIRS
    base = next((Path(d) for d in dirs if os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK)), Path(dirs[-1]))
    return base / LOCK_DIR / LOCK_NAME


def lock_path(path: str | os.PathLike | None = None) -> Path:
    """--lock-file, else TUNER_LOCK_FILE, else one lock per machine. One machine can stand in for several hosts of a
    fleet (tests, a demo) with a lock file each."""
    return Path(path or os.environ.get("TUNER_LOCK_FILE") or default_lock())


def _shared_dir(folder: Path) -> None:
    if folder.is_dir():
        return
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):  # made by another user a moment ago: theirs to set
        os.chmod(folder, DIR_MODE)  # chmod, not mkdir's mode: the umask would narrow that


def _write_owner(owner: Path, text: str) -> None:
    """Who holds the lock, for the one waiting; a file another user wrote last may refuse us: then say nothing."""
    try:
        fd = os.open(owner, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    except PermissionError:
        return
    with os.fdopen(fd, "w") as f:
        with contextlib.suppress(PermissionError):
            os.fchmod(fd, FILE_MODE)
        f.write(text)


@contextlib.contextmanager
def measurement_lock(wait: bool = True, what: str = "tuner", path: str | os.PathLike | None = None):
    chosen = path or os.environ.get("TUNER_LOCK_FILE")
    path = lock_path(path)
    if not chosen:
        _shared_dir(path.parent)
    owner = path.with_suffix(".owner")
    lock = FileLock(str(path), mode=FILE_MODE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = owner.read_text().strip() if owner.exists() else "another process"
        if not wait:
            raise LockBusy(f"another measurement is running ({holder}); lock {path}") from None
        print(f"waiting for the measurement lock: {holder} is measuring on this machine...", file=sys.stderr)
        lock.acquire()
    try:
        _write_owner(owner, f"{what} (pid {os.getpid()})")
        yield
    finally:
        lock.release()

"""The host-wide measurement lock lives where every user of the host finds the same file, and any user can take it."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tuner.measure import lock
from tuner.measure.lock import LockBusy, measurement_lock

# Another user's view of the lock, with the system Python and the same flock filelock uses: the test's own
# interpreter may sit in a folder that user cannot enter.
OTHER_USER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("busy")
else:
    print("took", flush=True)
    sys.stdin.read()  # hold it until the test closes our stdin
"""


def test_default_lock_ignores_a_per_user_tmpdir(monkeypatch, tmp_path):
    monkeypatch.delenv("TUNER_LOCK_FILE", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() now answers tmp_path
    assert tempfile.gettempdir() == str(tmp_path)
    path = lock.lock_path()
    assert tmp_path not in path.parents
    shared = next(d for d in ("/run/lock", "/var/lock", "/tmp") if os.access(d, os.W_OK))
    assert path == Path(shared) / "tuner" / "measure.lock"


def test_default_lock_falls_back_to_the_next_writable_folder(tmp_path):
    assert lock.default_lock((str(tmp_path / "missing"), str(tmp_path))) == tmp_path / "tuner" / "measure.lock"


def test_tuner_lock_file_overrides_the_shared_place(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNER_LOCK_FILE", str(tmp_path / "mine.lock"))
    assert lock.lock_path() == tmp_path / "mine.lock"
    assert lock.lock_path(tmp_path / "flag.lock") == tmp_path / "flag.lock"  # --lock-file wins over both


def test_lock_files_are_open_to_every_user_whatever_the_umask(monkeypatch, tmp_path):
    monkeypatch.delenv("TUNER_LOCK_FILE", raising=False)
    monkeypatch.setattr(lock, "SHARED_DIRS", (str(tmp_path),))
    old = os.umask(0o077)
    try:
        with measurement_lock(wait=False, what="mode test"):
            pass
    finally:
        os.umask(old)
    folder = tmp_path / "tuner"
    assert folder.stat().st_mode & 0o7777 == 0o777  # no sticky bit: protected_regular would refuse others
    assert (folder / "measure.lock").stat().st_mode & 0o777 == 0o666
    assert (folder / "measure.owner").stat().st_mode & 0o777 == 0o666
    assert (folder / "measure.owner").read_text() == f"mode test (pid {os.getpid()})"


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("/usr/bin/python3"),
    reason="needs root to run a process as another user, and a system python3 that user can run",
)
def test_another_user_meets_the_same_lock(monkeypatch):
    base = Path(tempfile.mkdtemp(prefix="tuner-lock-test-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)  # the other user must reach the folder the lock makes inside
        monkeypatch.delenv("TUNER_LOCK_FILE", raising=False)
        monkeypatch.setattr(lock, "SHARED_DIRS", (str(base),))
        path = lock.lock_path()

        def other() -> subprocess.Popen:
            return subprocess.Popen(
                ["/usr/bin/python3", "-c", OTHER_USER, str(path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                user="nobody",
                group="nogroup",
            )

        with measurement_lock(wait=False, what="root"):
            p = other()
            assert p.stdout.readline().strip() == "busy"  # the same file, the same lock: nobody must wait
            p.communicate(timeout=60)
        p = other()
        try:
            assert p.stdout.readline().strip() == "took"  # nobody could open root's lock file and take it
            with pytest.raises(LockBusy):  # and root now waits for nobody's measurement
                with measurement_lock(wait=False):
                    pass
        finally:
            p.communicate(timeout=60)
    finally:
        shutil.rmtree(base, ignore_errors=True)

"""Files that appear whole or not at all: written to a temp file in the target's folder, then renamed over it.

A reader (another process, a resumed study, a CI step) sees the old file or the new one, never half of one; the
temp file is removed when the writing raises. One that a SIGKILL leaves behind is named `.NAME.XXXXXXXX.tmp`
(hidden, beside NAME), so a caller holding a lock on NAME can recognise and remove it (tuner.measure.store).

chmod: the mode the file gets before the rename. None leaves the temp file's own: owner-only (0o600) where this
module made it (mkstemp), the writer's where the caller's writer made it (`atomic_path` with a `tmp` name).
default_mode() is what a plain open() would give. fsync (atomic_file, write_atomic): flush the file to the disk
before the rename and the folder after it (the rename itself survives a power cut).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator


def default_mode() -> int:
    """The mode open() gives a new file: 0o666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, tmp: str | os.PathLike | None = None, suffix: str = ".tmp", chmod: int | None = None
) -> Iterator[Path]:
    """A temp path beside `path` for a writer that takes a path (llama.cpp's quantize, a GGUF writer): renamed
    over `path` when the block ends, removed when it raises.

    tmp: the temp file's name, when the caller picks it (a fixed name a later run overwrites, rather than a
    leftover of a killed run that stays); by default a fresh `.NAME.XXXXXXXX{suffix}`, made here (empty, 0o600)."""
    path = Path(path)
    if tmp is None:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
        tmp = name
    tmp = Path(tmp)
    try:
        yield tmp
        if chmod is not None:
            os.chmod(tmp, chmod)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike, *, text: bool = False, chmod: int | None = None, fsync: bool = False
) -> Iterator[IO]:
    """An open temp file beside `path` for a writer that takes a file (json.dump, np.savez, Parquet): renamed over
    `path` when the block ends, removed when it raises. text: opened for str (UTF-8), else for bytes."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if chmod is not None:
            os.chmod(tmp, chmod)
        os.replace(tmp, path)
        if fsync:
            _fsync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | os.PathLike, data: bytes | str, *, chmod: int | None = None, fsync: bool = False) -> None:
    """Write `data` (str as UTF-8) as `path`, whole or not at all."""
    with atomic_file(path, text=isinstance(data, str), chmod=chmod, fsync=fsync) as f:
        f.write(data)


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike, *, chmod: int | None = None) -> None:
    """Copy src's bytes to dst, whole or not at all."""
    with atomic_path(dst, chmod=chmod) as tmp:
        shutil.copyfile(src, tmp)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""How much of a model file is in the page cache: a load that finds it there reads RAM, not the disk.

A trial that read 379 GiB from an NVMe drive and one that found them cached differ by minutes of load time, and
a cold cache also slows the first tokens of an mmap'd model. The runner asks this before each model load and the
record keeps the answer (`page_cache_pct`), as util-linux `fincore` would report it: mincore(2) over a read-only
mapping of the file, a window at a time (a mapping of a 400 GB file costs address space, not memory).
"""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

WINDOW = 1 << 30  # bytes mapped per mincore call

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
MAP_FAILED = ctypes.c_void_p(-1).value


def cached_bytes(path: str | os.PathLike) -> tuple[int, int]:
    """(bytes of the file in the page cache, file size). Raises OSError when the file cannot be read or mapped."""
    size = os.path.getsize(path)
    page = mmap.PAGESIZE
    cached = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in range(0, size, WINDOW):
            n = min(WINDOW, size - off)
            addr = _libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, fd, off)
            if addr in (None, MAP_FAILED):
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), str(path))
            try:
                vec = (ctypes.c_ubyte * ((n + page - 1) // page))()
                if _libc.mincore(addr, n, vec) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err), str(path))
                resident = int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1))
                cached += min(resident * page, n)
            finally:
                _libc.munmap(addr, n)
    finally:
        os.close(fd)
    return cached, size


def cached_pct(paths: list[str]) -> float | None:
    """The share (0-100) of these files' bytes in the page cache; None when a file cannot be checked."""
    got = total = 0
    try:
        for p in paths:
            c, s = cached_bytes(p)
            got, total = got + c, total + s
    except OSError:
        return None
    return 100.0 * got / total if total else None


def evict(paths: list[str | os.PathLike]) -> None:
    """Drop these files' pages from the page cache (posix_fadvise DONTNEED), so the next load reads the disk.

    Pages a running process still maps stay; files that cannot be opened are skipped (nothing to evict).
    Example: `evict(read_model(path).shards)` before a load measures it as a model bigger than RAM loads.
    """
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

"""`--mem-limit`: a smaller machine for each trial's worker, and what the kernel really limits.

Two limits apply together where the machine allows it:

- RLIMIT_DATA (always; the worker sets it on itself): private writable memory, counted when it is reserved.
  A KV cache or a `--no-mmap` model larger than the limit fails inside llama.cpp, which says so ("failed to
  allocate"), as on a machine without that much memory. It does not cover llama.cpp's default read-only
  mmap of the weights: those pages are file-backed.
- A memory cgroup for the worker (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`; swap capped to the
  same), where this process may create one (root, a writable memory controller). It caps resident memory,
  page cache the worker reads in included, so it covers mmap'd weights. The kernel does not fail a file
  page fault over the limit: it evicts weight pages and reads them again from the file at the next touch
  (page-cache thrashing: the trial runs, at disk speed). So the runner counts the cgroup's file refaults and
  stops a trial that re-read more than its model's size (and 64 MiB) as `oom` (it does not fit), and drops the
  model file from the page cache before each trial: a page already cached is charged to whoever read it
  first, and would escape the limit. Anonymous memory over the limit is OOM-killed by the kernel (`oom`).

Without a usable memory cgroup only RLIMIT_DATA applies, and `mechanism` says that mmap'd weights are not
limited. Each trial records which mechanism applied (TrialRecord.mem_limit_by).
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import time
from pathlib import Path

from tuner.measure import pagecache

RLIMIT_ONLY = "RLIMIT_DATA (mmap'd weights not limited)"
_counter = itertools.count()
_NAME = re.compile(r"^tuner-(\d+)-\d+$")


def _own_cgroups() -> dict[str, str]:
    """Controller → this process's cgroup path ('' → the v2 path), from /proc/self/cgroup."""
    out = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(",") if controllers else [""]:
                    out[c] = path
    except (OSError, ValueError):
        pass
    return out


def _mounts() -> list[tuple[str, str, str, str]]:
    """(fs type, mount point, root inside the hierarchy, super options) of every cgroup mount."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                head, _, tail = line.partition(" - ")
                fields, tfields = head.split(), tail.split()
                if tfields and tfields[0] in ("cgroup", "cgroup2"):
                    out.append((tfields[0], fields[4], fields[3], tfields[2] if len(tfields) > 2 else ""))
    except OSError:
        pass
    return out


def _folder(mount: str, root: str, path: str) -> Path:
    rel = path[len(root) :] if root != "/" and path.startswith(root) else path
    return Path(mount) / rel.lstrip("/")


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _stat(path: Path, key: str) -> int:
    """One counter of a flat-keyed cgroup file (memory.stat, memory.events, memory.oom_control); 0 if absent."""
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
    except (OSError, ValueError):
        pass
    return 0


class MemLimit:
    """The limit for one runner's workers: RLIMIT_DATA, plus a memory cgroup when one can be made."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.cgroup: Path | None = None
        self.version = 0  # 1 or 2 when a cgroup applies
        self.why_not = ""  # why there is no cgroup, for the note
        errors = []
        for make in (self._make_v2, self._make_v1):
            try:
                if make():
                    break
            except OSError as e:
                errors.append(f"{e.strerror or e}")
                self._remove()
                self.version = 0
        else:
            self.why_not = "; ".join(errors) or "no writable memory cgroup controller"
        if self.cgroup is not None and not self._can_join():
            self.why_not = f"cannot move a process into {self.cgroup}"
            self._remove()
            self.version = 0

    # -- making the cgroup --------------------------------------------------------------------------
    def _child(self, parent: Path) -> Path:
        # leftovers of runners that were killed (SIGKILL skips close()): empty, so rmdir works
        for old in parent.glob("tuner-*-*"):
            m = _NAME.match(old.name)
            if m and not Path(f"/proc/{m.group(1)}").exists():
                try:
                    old.rmdir()
                except OSError:
                    pass
        child = parent / f"tuner-{os.getpid()}-{next(_counter)}"
        child.mkdir()
        self.cgroup = child
        return child

    def _make_v2(self) -> bool:
        path = _own_cgroups().get("")
        mount = next((m for m in _mounts() if m[0] == "cgroup2"), None)
        if path is None or mount is None:
            return False
        parent = _folder(mount[1], mount[2], path)
        if "memory" not in (parent / "cgroup.controllers").read_text().split():
            return False  # the memory controller lives in a v1 hierarchy (or is not delegated here)
        if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            _write(parent / "cgroup.subtree_control", "+memory")  # EBUSY when processes live in parent
        child = self._child(parent)
        _write(child / "memory.max", str(self.limit))
        if (child / "memory.swap.max").exists():
            _write(child / "memory.swap.max", "0")
        self.version = 2
        return True

    def _make_v1(self) -> bool:
        path = _own_cgroups().get("memory")
        mount = next((m for m in _mounts() if m[0] == "cgroup" and "memory" in m[3].split(",")), None)
        if path is None or mount is None:
            return False
        child = self._child(_folder(mount[1], mount[2], path))
        _write(child / "memory.limit_in_bytes", str(self.limit))
        if (child / "memory.memsw.limit_in_bytes").exists():  # swap accounting on: memory + swap = the limit
            _write(child / "memory.memsw.limit_in_bytes", str(self.limit))
        self.version = 1
        return True

    def _can_join(self) -> bool:
        probe = subprocess.run(self.command(["true"]), capture_output=True)
        return probe.returncode == 0

    def _remove(self) -> None:
        if self.cgroup is None:
            return
        for _ in range(50):  # a just-reaped worker can take a moment to leave the cgroup
            try:
                self.cgroup.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)
        self.cgroup = None

    # -- using it -----------------------------------------------------------------------------------
    @property
    def mechanism(self) -> str:
        """What limits a trial, as recorded in TrialRecord.mem_limit_by (still known after close)."""
        if self.version == 2:
            return "cgroup2 memory.max + RLIMIT_DATA"
        if self.version == 1:
            return "cgroup1 memory.limit_in_bytes + RLIMIT_DATA"
        return RLIMIT_ONLY

    @property
    def note(self) -> str:
        """One line for the user when the limit is weaker than asked (empty when a cgroup applies)."""
        if self.version:
            return ""
        return (
            f"--mem-limit: no memory cgroup here ({self.why_not}); only RLIMIT_DATA applies, which does not "
            "cover llama.cpp's mmap of the weights (run as root on a machine with a writable memory "
            "controller, or pass --no-mmap)"
        )

    def command(self, argv: list[str]) -> list[str]:
        """argv, started inside the cgroup: the process joins it before exec, so all it allocates is charged."""
        if self.cgroup is None:
            return list(argv)
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.cgroup / "cgroup.procs"), *argv]

    def evict(self, path: str | os.PathLike) -> None:
        """Drop a file's unmapped pages from the page cache, so the trial's own reads are charged to it."""
        if self.cgroup is not None:
            pagecache.evict([path])

    def refaulted_bytes(self) -> int:
        """File pages the cgroup's processes read again after the limit evicted them (cumulative)."""
        if self.cgroup is None:
            return 0
        stat = self.cgroup / "memory.stat"
        pages = _stat(stat, "workingset_refault_file") or _stat(stat, "workingset_refault")
        return pages * os.sysconf("SC_PAGE_SIZE")

    def oom_kills(self) -> int:
        """Processes the kernel OOM-killed inside the cgroup (cumulative)."""
        if self.cgroup is None:
            return 0
        if self.version == 2:
            return _stat(self.cgroup / "memory.events", "oom_kill")
        if self.version == 1:
            return _stat(self.cgroup / "memory.oom_control", "oom_kill")
        return 0

    def close(self) -> None:
        self._remove()

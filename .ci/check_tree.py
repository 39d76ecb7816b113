#!/usr/bin/env python3
"""Fail when the repository tracks a file it should not: anything over a few MB, or a core dump.

A 108 MB gdb core dump once landed in the first commit; this keeps the next one out.
Usage: python3 .ci/check_tree.py [REPO] [--max-bytes N]   (exit 1 and one line per offender)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

MAX_BYTES = 5_000_000
ET_CORE = 4  # ELF e_type of a core file


def is_core_dump(path: Path) -> bool:
    """An ELF file whose type is ET_CORE (what the kernel and gdb's gcore write)."""
    try:
        with path.open("rb") as f:
            head = f.read(18)
    except OSError:
        return False
    if len(head) < 18 or head[:4] != b"\x7fELF":
        return False
    order = "little" if head[5] == 1 else "big"
    return int.from_bytes(head[16:18], order) == ET_CORE


def offenders(repo: Path, max_bytes: int = MAX_BYTES) -> list[str]:
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], check=True, capture_output=True).stdout
    bad = []
    for name in filter(None, out.decode().split("\0")):
        p = repo / name
        if not p.is_file():
            continue
        size = p.stat().st_size
        if is_core_dump(p):
            bad.append(f"{name}: a core dump ({size} bytes) is tracked; git rm --cached it")
        elif size > max_bytes:
            bad.append(f"{name}: {size} bytes is over the {max_bytes}-byte limit for tracked files")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("repo", nargs="?", default=str(Path(__file__).resolve().parent.parent))
    ap.add_argument("--max-bytes", type=int, default=MAX_BYTES)
    a = ap.parse_args(argv)
    bad = offenders(Path(a.repo), a.max_bytes)
    for line in bad:
        print(f"check_tree: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

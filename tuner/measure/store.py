"""Results store: trial records in Parquet, written so that no reader ever sees a half-written file.

Every write makes a complete new file next to the old one, fsyncs it and renames it into place (atomic on
POSIX), under a file lock so two writers never interleave. A SIGKILL at any moment leaves either the old
file or the new one.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from tuner import files
from tuner.errors import TunerError
from tuner.record import TrialRecord

TRIALS_FILE = "trials.parquet"


class StoreError(TunerError):
    """A results path that cannot be read or written; one-line message."""


def resolve(path: str | os.PathLike) -> Path:
    """A Parquet file, or a study folder holding trials.parquet."""
    p = Path(path)
    if p.is_dir():
        p = p / TRIALS_FILE
    return p


def read(path: str | os.PathLike, missing_ok: bool = False) -> pd.DataFrame:
    p = resolve(path)
    if not p.exists():
        if missing_ok:
            return pd.DataFrame()
        raise StoreError(f"no results at {path} (expected a Parquet file or a study folder with {TRIALS_FILE})")
    try:
        return pq.read_table(p).to_pandas()
    except (pa.ArrowInvalid, OSError) as e:
        raise StoreError(f"not a readable Parquet file: {p} ({str(e).splitlines()[0][:120]})") from None


def records(path_or_df) -> list[TrialRecord]:
    df = path_or_df if isinstance(path_or_df, pd.DataFrame) else read(path_or_df)
    return [TrialRecord.from_row(r) for r in df.to_dict("records")]


def writable_folder(folder: str | os.PathLike, what: str = "results folder") -> Path:
    """Create a folder (and its parents) and check it can be written, or say in one line why not."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"cannot create {what} {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StoreError(f"{what} is not writable: {folder}")
    return folder


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before any trial runs) when the results file cannot be written."""
    p = Path(path)
    writable_folder(p.parent)
    if p.exists():
        read(p)  # an existing file must be Parquet we can append to
    return p


def append(path: str | os.PathLike, recs: list[TrialRecord]) -> None:
    """Append records: read, add, write a new file, fsync, rename into place."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(p) + ".lock"):
        old = read(p, missing_ok=True)
        new = pd.DataFrame([r.to_row() for r in recs])
        df = pd.concat([old, new], ignore_index=True) if len(old) else new
        write_frame(p, df)


def mark(path: str | os.PathLike, column: str, value, where) -> int:
    """Set `column` to `value` on the rows for which `where(row_dict)` holds; returns how many."""
    p = Path(path)
    with FileLock(str(p) + ".lock"):
        df = read(p)
        hits = [bool(where(row)) for row in df.to_dict("records")]
        if any(hits):
            df.loc[hits, column] = value
            write_frame(p, df)
    return sum(hits)


def write_frame(p: Path, df: pd.DataFrame) -> None:
    """Write df as p atomically. Callers hold p's FileLock, so a temp file of p found now is a leftover of a
    writer that was killed mid-write (SIGKILL skips tuner.files' cleanup): remove it, it is never read."""
    for stale in p.parent.glob(f".{glob.escape(p.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    with files.atomic_file(p, fsync=True) as f:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), f)

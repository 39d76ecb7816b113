"""Units and formatting: sizes, parameter counts, durations, core counts.

The ground floor: imports no tuner module, so any room (planner, runner, report, CLI) may use it without
tying itself to another.
"""

from __future__ import annotations

import os
import re

import psutil

SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def fmt_size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def fmt_params(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def parse_size(text: str | int | None) -> int | None:
    """'24GiB', '24G', '512M', '1.5GB', '1000000' → bytes (binary units: G = GiB, as llama.cpp prints).

    Raises ValueError with a one-line message; the CLI's option types turn it into a usage error.
    """
    if text is None or isinstance(text, int):
        return text
    m = SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 24GiB, 512M)")
    num, unit, suffix = float(m[1]), m[2].lower(), m[3].lower()
    power = "kmgtp".find(unit) + 1 if unit else 0
    base = 1000 if suffix == "b" and unit else 1024
    return int(num * base**power)


def parse_duration(text: str | float | None) -> float | None:
    """'8h', '30m', '1h30m', '90s', '90' → seconds. Raises ValueError with a one-line message."""
    if text is None or isinstance(text, (int, float)):
        return text
    m = DURATION_RE.match(str(text).strip().lower())
    if not m or not any(m.groups()):
        raise ValueError(f"not a duration: {text!r} (use e.g. 8h, 30m, 90s)")
    h, mi, sec = (float(x) if x else 0.0 for x in m.groups())
    return h * 3600 + mi * 60 + sec


def hms(s: float) -> str:
    """Seconds as H:MM:SS, for elapsed times and ETAs."""
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def fmt_duration(seconds: float) -> str:
    """Seconds as a short label: 45s, 3m05s, 2h07m."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def parse_sizes(text: str | list | None) -> list[int] | None:
    """'24GiB' or '24GiB,24GiB' (one size per GPU) → [bytes, ...]; every size above 0."""
    if text is None or isinstance(text, list):
        return text
    items = [x.strip() for x in str(text).split(",")]
    if not all(items):
        raise ValueError(f"not a list of sizes: {text!r} (use e.g. 24GiB,24GiB)")
    sizes = [parse_size(x) for x in items]
    if any(s <= 0 for s in sizes):
        raise ValueError(f"every size must be above 0, got {text!r}")
    return sizes


def parse_headroom(text: str | int | float) -> int | float:
    """Memory to keep free: a share ('5%', '0.05') or a size ('1GiB'); one spelling for every command."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return text
    t = str(text).strip()
    try:
        share = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        return parse_size(t)
    if share >= 1:
        return int(share)  # a plain number of bytes
    if share < 0:
        raise ValueError(f"headroom must not be negative, got {text!r}")
    return share


def headroom_bytes(headroom: int | float, total: int) -> int:
    return int(headroom * total) if isinstance(headroom, float) else int(headroom)

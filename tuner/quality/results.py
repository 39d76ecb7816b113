"""One file's quality result, the cache of results and reference summaries, and the regression verdict."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from tuner import files, stats
from tuner.quality.logits import FORMAT_VERSION

CACHE_DIR = "quality"
CACHE_FILE = "cache.json"


STAT_KEYS = (
    "kld_mean",
    "kld_mean_err",
    "kld_median",
    "kld_p99",
    "kld_max",
    "same_top_pct",
    "same_top_err",
    "ppl",
    "ppl_err",
    "ppl_ref",
    "ppl_ratio",
    "ln_ppl_ratio",
    "ln_ppl_ratio_err",
    "p_diff_rms_pct",
    "n_tokens",
)


@dataclass
class QualityResult:
    """One model file's quality against a reference on a text. `outcome` is "ok" or how its pass failed."""

    model: str
    model_hash: str
    outcome: str = "ok"
    cause: str = ""
    reference: str = ""  # the reference model file (or the logits file it came from)
    reference_hash: str = ""
    text: str = ""
    text_hash: str = ""
    ctx: int = 0
    top_k: int = 0
    tail_samples: int = 0
    type_k: str = "f16"
    type_v: str = "f16"
    file_type: str = ""
    model_size_bytes: int | None = None
    is_reference: bool = False
    cached: bool = False
    wall_s: float | None = None
    decode_s: float | None = None  # of wall_s: llama.cpp decoding, and the numpy work on its logits
    numpy_s: float | None = None
    peak_rss_bytes: int | None = None
    stderr_tail: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def __getattr__(self, name: str):
        # kld_mean, same_top_pct, ... read straight from the figures (None when the pass failed)
        if name in STAT_KEYS:
            return self.__dict__.get("stats", {}).get(name)
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        stats = d.pop("stats")
        return {**d, **{k: stats.get(k) for k in STAT_KEYS}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QualityResult":
        names = {f.name for f in dataclasses.fields(cls)} - {"stats"}
        return cls(
            **{k: v for k, v in d.items() if k in names}, stats={k: d[k] for k in STAT_KEYS if d.get(k) is not None}
        )


def cache_key(model_hash: str, header: dict) -> str:
    parts = {
        "v": FORMAT_VERSION,
        "model": model_hash,
        "reference": header["model_hash"],
        "text": header["text_hash"],
        "ctx": header["ctx"],
        "top_k": header["top_k"],
        "tail_samples": header["tail_samples"],
        "type_k": header["type_k"],
        "type_v": header["type_v"],
    }
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


class Cache:
    """Results by cache key in RESULTS/quality/cache.json, plus reference summaries (reference-<key>.npz), so
    a search pays for a file's quality pass (and the reference pass) once. Writes are atomic and locked."""

    def __init__(self, results: str | os.PathLike):
        self.dir = Path(results) / CACHE_DIR
        self.path = self.dir / CACHE_FILE

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def get(self, key: str) -> QualityResult | None:
        d = self._read().get(key)
        return QualityResult.from_dict(d) if d else None

    def put(self, key: str, res: QualityResult) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            data = self._read()
            data[key] = res.to_dict()
            with files.atomic_file(self.path, text=True) as f:
                json.dump(data, f, indent=1, sort_keys=True)

    def reference_path(self, header: dict) -> Path:
        return self.dir / f"reference-{cache_key(header['model_hash'], header)}.npz"


@dataclass
class QualityVerdict:
    verdict: str  # regression | improvement | unchanged | inconclusive | incomparable | missing
    delta: float | None = None  # current - baseline mean KLD
    detail: str = ""


def judge_regression(
    base: QualityResult | dict | None,
    cur: QualityResult | dict | None,
    max_increase: float = 0.10,
    min_abs: float = 0.001,
    z: float = 2.0,
) -> QualityVerdict:
    # min_abs: a change of a near-lossless file's tiny KLD (0.0003 -> 0.0004 is +33 %) is no regression
    """Did the quality of a file get worse between two measurements? For `tuner compare`.

    A regression: mean KLD up by more than `max_increase` (relative) AND more than `min_abs`, AND by more than
    `z` combined standard errors (so noise from a short text is not a regression). Only results against the
    same reference, text, ctx and top-k compare; anything else is "incomparable".
    """
    if isinstance(base, dict):
        base = QualityResult.from_dict(base)
    if isinstance(cur, dict):
        cur = QualityResult.from_dict(cur)
    if base is None or cur is None or not base.ok or not cur.ok:
        return QualityVerdict("missing", detail="a side has no quality result")
    same = [
        k
        for k in ("reference_hash", "text_hash", "ctx", "top_k", "tail_samples")
        if getattr(base, k) != getattr(cur, k)
    ]
    if same:
        return QualityVerdict("incomparable", detail=f"measured with another {', '.join(same)}")
    delta = cur.kld_mean - base.kld_mean
    err = math.hypot(base.kld_mean_err or 0.0, cur.kld_mean_err or 0.0)
    # the one rule for an estimate with a standard error (tuner.stats): beyond the threshold AND beyond noise
    practical, significant = stats.estimates_differ(
        base.kld_mean, base.kld_mean_err, cur.kld_mean, cur.kld_mean_err, max_increase, min_abs, z
    )
    detail = f"mean KLD {base.kld_mean:.4f} -> {cur.kld_mean:.4f} (±{err:.4f})"
    if not practical:
        return QualityVerdict("unchanged", delta, detail)
    if not significant:
        return QualityVerdict("inconclusive", delta, detail)
    return QualityVerdict("regression" if delta > 0 else "improvement", delta, detail)

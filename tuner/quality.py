"""Quality of a quant file: how far its next-token distributions drift from a reference's on a text.

Computed as llama-perplexity's `--kl-divergence` computes it (tools/perplexity/perplexity.cpp of the llama.cpp
that llama-cpp-python vendors), so the figures can be checked against it:

- the text is tokenized once (BOS added when the vocabulary adds one) and cut into chunks of `ctx` tokens;
  the last partial chunk is dropped; token 0 of every chunk is replaced by BOS when the vocabulary adds one;
- in each chunk the first half is context: positions `first = ctx // 2` .. `ctx - 2` are scored, each
  predicting the next token;
- per position, KLD(reference || model) = sum over tokens of p_ref * (log p_ref - log p_model), leaving out
  tokens whose reference log-probability is -16 or less (as llama-perplexity does); "same top" counts the
  positions where both argmaxes agree; PPL uses the log-probability of the actual next token.
- statistics as llama-perplexity prints them: mean KLD with its standard error, median, 99th percentile
  (linear interpolation), same-top share with its standard error, PPL of both, ln(PPL(Q)/PPL(ref)).

The reference is reduced to what these measures need (a "reference logits" file, .npz): per scored position
the `top_k` most likely tokens and their log-probabilities, the probability left outside them (`tail`),
`tail_samples` tokens drawn from that tail in proportion to their probability, and the log-probability of the
actual next token. The top-k terms of the KLD are exact; the tail's share is an importance-sampling estimate
with a control variate of known mean (unbiased, and quiet even for a near-lossless quant). `top_k = 0` keeps
the whole vocabulary (exact). Against all 262,144 log-probabilities of Gemma 3 270M, the default (256 + 256)
gives the mean KLD within 0.15 %. A live reference pass and a saved file give the same figures, because both
go through the same summary.

Every pass runs in a worker process (`tuner.runner.Runner.run_job`), so an OOM or a crash is a recorded
failure with its cause. Results are cached by model hash + reference + text + ctx + KV types.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from tuner.ggufmeta import ModelInfo, read_model, tokenizer_hash

FORMAT = "tuner-reference-logits"
FORMAT_VERSION = 1
KLD_CUTOFF = -16.0  # llama-perplexity: reference log-probs at or below this are left out of the KLD sum
DEFAULT_CTX = 512  # llama-perplexity's default context
DEFAULT_TOP_K = 256
DEFAULT_TAIL_SAMPLES = 256
MIN_CTX = 16
TAIL_EPS = 1e-12  # tail masses below this are rounding noise, not probability
ROWS = 64  # output rows processed at once: bounds the numpy buffers (rows × n_vocab floats)
DEFAULT_TEXT = "quality-text.txt"
CACHE_DIR = "quality"
CACHE_FILE = "cache.json"

# The default budget: mean KLD against the highest-precision file. llama.cpp's published KLD figures for
# 7-8 B models put Q8_0 near 0.001, Q6_K near 0.005, Q5_K_M near 0.01 and Q4_K_M between about 0.02 and 0.06;
# 3-bit and 2-bit quants go to 0.1-0.5. 0.05 admits what is commonly called "Q4_K_M-class" loss and refuses
# the steep end of the curve. Small models quantize worse: state your own budget for them.
DEFAULT_MAX_KLD = 0.05


class QualityError(ValueError):
    """Bad input for a quality measurement: one line naming the problem."""


# ---------------------------------------------------------------------------------------------------------
# The arithmetic (numpy; shared by the worker passes and the tests)
# ---------------------------------------------------------------------------------------------------------
def softmax_stats(x: np.ndarray, buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log-sum-exp (float64) and argmax of each row of logits `x`; `buf` is scratch of x's shape (float32)."""
    n = x.shape[0]
    imax = x.argmax(axis=1)
    m = x[np.arange(n), imax]
    np.subtract(x, m[:, None], out=buf)
    np.exp(buf, out=buf)
    s = buf.sum(axis=1, dtype=np.float64)
    return m.astype(np.float64) + np.log(s), imax


def top_ids(x: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest values of each row (unordered). A threshold from a strided sample (its 4k/64-th
    largest: ~4k values of the row lie above it) leaves a few hundred candidates to partition instead of the
    whole vocabulary; a row with fewer than k above it is partitioned in full."""
    n, n_vocab = x.shape
    stride = 64 if n_vocab >= 64 * 16 * k else 1
    if stride == 1:
        return np.argpartition(x, n_vocab - k, axis=1)[:, n_vocab - k:]
    sub = x[:, ::stride]
    j = max(1, 4 * k // stride)
    thr = np.partition(sub, sub.shape[1] - j, axis=1)[:, sub.shape[1] - j]
    mask = x >= thr[:, None]
    counts = mask.sum(axis=1)
    out = np.empty((n, k), dtype=np.int64)
    r_idx, c_idx = np.nonzero(mask)
    starts = np.concatenate(([0], np.cumsum(counts)))
    for r in range(n):
        if counts[r] < k:
            out[r] = np.argpartition(x[r], n_vocab - k)[n_vocab - k:]
            continue
        cand = c_idx[starts[r]:starts[r + 1]]
        out[r] = cand[np.argpartition(x[r, cand], len(cand) - k)[len(cand) - k:]]
    return out


def summarize_rows(x: np.ndarray, targets: np.ndarray, top_k: int, buf: np.ndarray, tail_samples: int = 0,
                   rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """The reference summary of logit rows: the top-k tokens (most likely first) with their log-probs, the mass
    outside them (`tail`), `tail_samples` tokens drawn from that tail in proportion to their probability
    (systematic sampling, so the tail's share of the KLD is estimated without bias), and the target's nll."""
    n, n_vocab = x.shape
    lse, _ = softmax_stats(x, buf)  # buf now holds exp(x - max)
    k = n_vocab if top_k <= 0 else min(top_k, n_vocab)
    rows = np.arange(n)[:, None]
    ids = top_ids(x, k) if k < n_vocab else np.broadcast_to(np.arange(n_vocab), (n, n_vocab))
    order = np.argsort(-x[rows, ids], axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1).astype(np.int32)
    logp = x[rows, ids].astype(np.float64) - lse[:, None]
    tail = np.clip(1.0 - np.exp(logp).sum(axis=1), 0.0, 1.0)
    m = tail_samples if k < n_vocab else 0
    t_ids = np.zeros((n, m), dtype=np.int32)
    if m:
        rng = rng or np.random.default_rng(0)
        buf[rows, ids] = 0.0  # what is left is the tail, unnormalized
        for r in range(n):
            cdf = np.cumsum(buf[r], dtype=np.float64)
            u = (np.arange(m) + rng.random()) * (cdf[-1] / m)
            t_ids[r] = np.minimum(np.searchsorted(cdf, u, side="right"), n_vocab - 1)
    t_logp = x[rows, t_ids].astype(np.float64) - lse[:, None]
    nll = lse - x[np.arange(n), targets].astype(np.float64)
    return {"ids": ids, "logp": logp.astype(np.float32), "tail": tail, "tail_ids": t_ids,
            "tail_logp": t_logp.astype(np.float32), "nll": nll}


def compare_rows(x: np.ndarray, targets: np.ndarray, ref: dict[str, np.ndarray], buf: np.ndarray) \
        -> dict[str, np.ndarray]:
    """Per position: KLD(reference || x), model nll of the target, and whether the argmaxes agree.

    KLD = sum over the reference's top-k of p (log p - log q), plus the tail: its mass times the mean of
    (log p - log q) over the tail samples (an importance-sampling estimate of the same sum over the tail), with
    a control variate of known mean that removes the first-order noise.
    Without tail samples the tail is one bucket, p_tail log(p_tail / q_tail) (a lower bound). Terms whose
    reference log-prob is at or below KLD_CUTOFF count zero, as in llama-perplexity.
    """
    n = x.shape[0]
    lse, imax = softmax_stats(x, buf)
    rows = np.arange(n)[:, None]
    lq = x[rows, ref["ids"]].astype(np.float64) - lse[:, None]
    lp = ref["logp"].astype(np.float64)
    kld = np.where(lp > KLD_CUTOFF, np.exp(lp) * (lp - lq), 0.0).sum(axis=1)
    p_tail = ref["tail"]
    q_tail = np.clip(1.0 - np.exp(lq).sum(axis=1), 0.0, 1.0)
    if ref["tail_ids"].shape[1]:
        lps = ref["tail_logp"].astype(np.float64)
        lqs = x[rows, ref["tail_ids"]].astype(np.float64) - lse[:, None]
        # sum over the tail of p (log p - log q), from samples drawn in proportion to p. The control variate
        # (q/p - 1) has mean (q_tail - p_tail) / p_tail, known exactly: with it each sample's term is of second
        # order in log q - log p, so a near-lossless quant's tiny KLD is not drowned in sampling noise.
        with np.errstate(over="ignore"):
            terms = np.where(lps > KLD_CUTOFF, lps - lqs, 0.0) + np.expm1(lqs - lps)
        kld += p_tail * terms.mean(axis=1) - (q_tail - p_tail)
    else:
        q_tail = np.clip(q_tail, TAIL_EPS, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            kld += np.where(p_tail > TAIL_EPS, p_tail * (np.log(p_tail) - np.log(q_tail)), 0.0)
    nll = lse - x[np.arange(n), targets].astype(np.float64)
    return {"kld": kld, "nll": nll, "same_top": imax == ref["ids"][:, 0]}


def _mean_err(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error, as llama-perplexity's mean_and_uncertainty (0 for 10 values or fewer)."""
    n = len(values)
    mean = float(values.mean())
    var = float((values * values).mean()) - mean * mean
    return mean, (math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0)


def statistics(kld: np.ndarray, nll: np.ndarray, nll_ref: np.ndarray, same_top: np.ndarray) -> dict[str, Any]:
    """The figures llama-perplexity prints at the end of `--kl-divergence`, from per-position values."""
    n = len(kld)
    kld_mean, kld_err = _mean_err(kld)
    lp, lp_err = _mean_err(nll)
    lb, lb_err = _mean_err(nll_ref)
    cov = (float((nll * nll_ref).mean()) - lp * lb) / (n - 1) if n >= 10 else 0.0
    ln_ratio = lp - lb
    ln_ratio_err = math.sqrt(max(lp_err**2 + lb_err**2 - 2.0 * cov, 0.0))
    same = float(same_top.mean())
    p_diff = np.exp(-nll) - np.exp(-nll_ref)
    return {
        "kld_mean": kld_mean, "kld_mean_err": kld_err, "kld_median": float(np.median(kld)),
        "kld_p99": float(np.percentile(kld, 99.0)), "kld_max": float(kld.max()),
        "same_top_pct": 100.0 * same, "same_top_err": 100.0 * math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
        "ppl": math.exp(lp), "ppl_err": math.exp(lp) * lp_err, "ppl_ref": math.exp(lb),
        "ppl_ratio": math.exp(ln_ratio), "ln_ppl_ratio": ln_ratio, "ln_ppl_ratio_err": ln_ratio_err,
        "p_diff_rms_pct": 100.0 * math.sqrt(float((p_diff * p_diff).mean())),
        "n_tokens": n,
    }


# ---------------------------------------------------------------------------------------------------------
# Reference logits files
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ReferenceLogits:
    """A reference's summary on one text (see the module docstring). `header` identifies model, text and ctx.

    File: numpy .npz with `header` (a JSON string), `tokens` (int32, n_chunk × ctx, before BOS replacement),
    `ids` (int32, positions × k), `logp` (float32, positions × k), `tail` and `nll` (float64, positions).
    Positions are chunk-major: chunk c holds rows c·(ctx-1-ctx//2) onwards.
    """

    header: dict
    tokens: np.ndarray
    ids: np.ndarray
    logp: np.ndarray
    tail: np.ndarray
    tail_ids: np.ndarray
    tail_logp: np.ndarray
    nll: np.ndarray

    ARRAYS = ("tokens", "ids", "logp", "tail", "tail_ids", "tail_logp", "nll")

    @property
    def ctx(self) -> int:
        return int(self.header["ctx"])

    @property
    def n_chunk(self) -> int:
        return len(self.tokens) // self.ctx

    def chunk(self, c: int) -> dict[str, np.ndarray]:
        per = per_chunk(self.ctx)
        s = slice(c * per, (c + 1) * per)
        return {k: getattr(self, k)[s] for k in self.ARRAYS if k != "tokens"}

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (a complete temp file renamed into place): a reader never sees half a file."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, header=np.array(json.dumps(self.header, sort_keys=True)),
                         **{k: getattr(self, k) for k in self.ARRAYS})
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def read_header(cls, path: str | os.PathLike) -> dict:
        return cls._open(path, header_only=True).header

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceLogits":
        return cls._open(path, header_only=False)

    @classmethod
    def _open(cls, path, header_only: bool) -> "ReferenceLogits":
        p = Path(path)
        if not p.is_file():
            raise QualityError(f"reference logits file not found: {p}")
        try:
            with np.load(p, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
                    raise QualityError(f"{p} is not a tuner reference logits file (format {FORMAT} v{FORMAT_VERSION})")
                if header_only:
                    return cls(header, *(np.empty(0),) * len(cls.ARRAYS))
                ref = cls(header, *(z[k] for k in cls.ARRAYS))
        except QualityError:
            raise
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise QualityError(f"{p} is not a tuner reference logits file ({type(e).__name__})") from None
        per = per_chunk(ref.ctx)
        if (len(ref.tokens) % ref.ctx or len(ref.nll) != ref.n_chunk * per or ref.ids.shape != ref.logp.shape
                or ref.tail_ids.shape != ref.tail_logp.shape):
            raise QualityError(f"{p} is damaged: its arrays do not match its header (ctx {ref.ctx})")
        return ref


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def per_chunk(ctx: int) -> int:
    """Scored positions per chunk: first = ctx//2 .. ctx-2."""
    return ctx - 1 - ctx // 2


def reference_header(info: ModelInfo, text_hash: str, text_name: str, ctx: int, top_k: int,
                     tail_samples: int = 0, type_k: str = "f16", type_v: str = "f16") -> dict:
    """What identifies a reference summary: model (arch, vocabulary, tokenizer), text, ctx, top-k, KV types."""
    return {"format": FORMAT, "version": FORMAT_VERSION, "arch": info.arch, "n_vocab": info.n_vocab,
            "tokenizer_hash": tokenizer_hash(info.path), "model_hash": info.content_hash,
            "model_file": Path(info.path).name, "model_name": info.name, "file_type": info.file_type,
            "text_hash": text_hash, "text_name": text_name, "ctx": ctx, "top_k": top_k,
            "tail_samples": tail_samples, "type_k": type_k, "type_v": type_v, "kld_cutoff": KLD_CUTOFF}


def check_model(header: dict, info: ModelInfo, source: str) -> None:
    """Refuse a model that cannot be compared with this reference (other architecture or tokenizer)."""
    name = Path(info.path).name
    if header["arch"] != info.arch:
        raise QualityError(f"{name} is a {info.arch} model but the reference ({source}) is {header['arch']}")
    if header["n_vocab"] != info.n_vocab:
        raise QualityError(f"{name} has a vocabulary of {info.n_vocab} tokens but the reference ({source}) has "
                           f"{header['n_vocab']}")
    if header["tokenizer_hash"] != tokenizer_hash(info.path):
        raise QualityError(f"{name} has another tokenizer than the reference ({source}): same vocabulary size, "
                           "different tokens")


# ---------------------------------------------------------------------------------------------------------
# Text, reference choice
# ---------------------------------------------------------------------------------------------------------
def default_text_path() -> Path:
    return Path(str(resources.files("tuner") / "data" / DEFAULT_TEXT))


def read_text(path: str | os.PathLike | None) -> tuple[Path, str]:
    """(path, hash) of the text; raises QualityError for a missing, empty or non-UTF-8 file."""
    p = Path(path) if path else default_text_path()
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise QualityError(f"text file not found: {p}") from None
    except IsADirectoryError:
        raise QualityError(f"text path is a directory: {p}") from None
    except OSError as e:
        raise QualityError(f"cannot read text file {p}: {e.strerror}") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QualityError(f"text file is not UTF-8 (byte {e.start}): {p}") from None
    if not data.strip():
        raise QualityError(f"text file is empty: {p}")
    return p, hashlib.blake2b(data, digest_size=16).hexdigest()


def bits_per_weight(info: ModelInfo) -> float:
    n = sum(t.n_elements for t in info.tensors)
    return 8.0 * sum(t.n_bytes for t in info.tensors) / n if n else 0.0


def pick_reference(infos: list[ModelInfo]) -> ModelInfo:
    """The highest-precision file: most bits per weight over its tensors (F32 > BF16/F16 > Q8_0 > ... ); the
    first given wins a tie."""
    return max(infos, key=bits_per_weight)


# ---------------------------------------------------------------------------------------------------------
# Results, cache, budget
# ---------------------------------------------------------------------------------------------------------
STAT_KEYS = ("kld_mean", "kld_mean_err", "kld_median", "kld_p99", "kld_max", "same_top_pct", "same_top_err",
             "ppl", "ppl_err", "ppl_ref", "ppl_ratio", "ln_ppl_ratio", "ln_ppl_ratio_err", "p_diff_rms_pct",
             "n_tokens")


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
        return cls(**{k: v for k, v in d.items() if k in names},
                   stats={k: d[k] for k in STAT_KEYS if d.get(k) is not None})


def cache_key(model_hash: str, header: dict) -> str:
    parts = {"v": FORMAT_VERSION, "model": model_hash, "reference": header["model_hash"],
             "text": header["text_hash"], "ctx": header["ctx"], "top_k": header["top_k"],
             "tail_samples": header["tail_samples"], "type_k": header["type_k"], "type_v": header["type_v"]}
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
        from filelock import FileLock

        self.dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            data = self._read()
            data[key] = res.to_dict()
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=CACHE_FILE + ".", suffix=".part")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)

    def reference_path(self, header: dict) -> Path:
        return self.dir / f"reference-{cache_key(header['model_hash'], header)}.npz"


@dataclass(frozen=True)
class Budget:
    """What quality loss a recommendation may cost: mean KLD at most `max_kld`, top-token agreement at least
    `min_same_top` (percent). None: no bound on that figure."""

    max_kld: float | None = DEFAULT_MAX_KLD
    min_same_top: float | None = None

    def __post_init__(self):
        if self.max_kld is not None and self.max_kld < 0:
            raise QualityError(f"--max-kld must not be negative, got {self.max_kld:g}")
        if self.min_same_top is not None and not 0 <= self.min_same_top <= 100:
            raise QualityError(f"--min-same-top is a percentage (0-100), got {self.min_same_top:g}")

    def judge(self, res: QualityResult) -> tuple[bool, str]:
        """(meets the budget, why not) for one file's result; a failed or missing pass never qualifies."""
        if not res.ok:
            return False, f"quality not measured ({res.outcome}: {res.cause})"
        if self.max_kld is not None and res.kld_mean > self.max_kld:
            return False, f"mean KLD {res.kld_mean:.4f} > {self.max_kld:g}"
        if self.min_same_top is not None and res.same_top_pct < self.min_same_top:
            return False, f"same top {res.same_top_pct:.1f}% < {self.min_same_top:g}%"
        return True, ""


def qualifying(results: Iterable[QualityResult], budget: Budget | None = None) -> dict[str, tuple[bool, str]]:
    """Model path → (qualifies, reason) under the budget (default: DEFAULT_MAX_KLD). For the search and the
    recommendation: a config qualifies when its model file does."""
    budget = budget or Budget()
    return {r.model: budget.judge(r) for r in results}


STUDY_FILE = "quality.json"  # in a study folder: what `tuner search` measured, for `tuner recommend`


@dataclass
class StudyQuality:
    """A search's quality figures, one result per (model file, type_k, type_v), and the budget its
    recommendation applies. Saved as STUDY_DIR/quality.json, so `tuner recommend` re-derives under the same
    filter; a config qualifies when the result for its file and KV-cache types meets the budget."""

    results: list[QualityResult]
    budget: Budget = field(default_factory=Budget)

    def lookup(self, model_hash: str, type_k: str, type_v: str) -> QualityResult | None:
        return next((r for r in self.results if (r.model_hash, r.type_k, r.type_v) == (model_hash, type_k, type_v)),
                    None)

    def judge(self, rec) -> tuple[bool, str]:
        """(qualifies, why not) for a TrialRecord; a file or KV combination never measured does not qualify."""
        res = self.lookup(rec.model_hash, rec.config.type_k, rec.config.type_v)
        if res is None:
            return False, f"quality not measured for {Path(rec.config.model).name} " \
                          f"({rec.config.type_k}/{rec.config.type_v})"
        return self.budget.judge(res)

    def stamp(self, rec) -> None:
        """Put the file's figures on a TrialRecord (Parquet, report and compare read them from there)."""
        res = self.lookup(rec.model_hash, rec.config.type_k, rec.config.type_v)
        if res is None:
            return
        rec.kld_mean, rec.kld_mean_err = res.kld_mean, res.kld_mean_err
        rec.same_top_pct, rec.ppl_ratio = res.same_top_pct, res.ppl_ratio
        rec.quality_ok = self.budget.judge(res)[0]
        rec.quality_basis = hashlib.blake2b(json.dumps(
            [res.reference_hash, res.text_hash, res.ctx, res.top_k, res.tail_samples]).encode(),
            digest_size=8).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"budget": dataclasses.asdict(self.budget), "results": [r.to_dict() for r in self.results]}

    def save(self, study_dir: str | os.PathLike) -> None:
        path = Path(study_dir) / STUDY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{STUDY_FILE}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, study_dir: str | os.PathLike) -> "StudyQuality | None":
        """The study's quality figures, or None when its search measured none (no filter applies)."""
        path = Path(study_dir) / STUDY_FILE
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
            return cls([QualityResult.from_dict(r) for r in d["results"]], Budget(**d["budget"]))
        except (ValueError, KeyError, TypeError) as e:
            raise QualityError(f"{path} is not a tuner quality file ({e})") from None


def combinations(space) -> list[tuple[str, str]]:
    """The (type_k, type_v) pairs a search space can use: quality is measured (and budgeted) per pair."""
    base = space.base
    ks = space.dims["type_k"].values if "type_k" in space.dims else [base.type_k]
    vs = space.dims["type_v"].values if "type_v" in space.dims else [base.type_v]
    return [(k, v) for k in ks for v in vs]


@dataclass
class QualityVerdict:
    verdict: str  # regression | improvement | unchanged | inconclusive | incomparable | missing
    delta: float | None = None  # current - baseline mean KLD
    detail: str = ""


def judge_regression(base: QualityResult | dict | None, cur: QualityResult | dict | None,
                     max_increase: float = 0.10, min_abs: float = 0.001, z: float = 2.0) -> QualityVerdict:
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
    same = [k for k in ("reference_hash", "text_hash", "ctx", "top_k", "tail_samples") if getattr(base, k) != getattr(cur, k)]
    if same:
        return QualityVerdict("incomparable", detail=f"measured with another {', '.join(same)}")
    from tuner import stats

    delta = cur.kld_mean - base.kld_mean
    err = math.hypot(base.kld_mean_err or 0.0, cur.kld_mean_err or 0.0)
    # the one rule for an estimate with a standard error (tuner.stats): beyond the threshold AND beyond noise
    practical, significant = stats.estimates_differ(base.kld_mean, base.kld_mean_err, cur.kld_mean,
                                                    cur.kld_mean_err, max_increase, min_abs, z)
    detail = f"mean KLD {base.kld_mean:.4f} -> {cur.kld_mean:.4f} (±{err:.4f})"
    if not practical:
        return QualityVerdict("unchanged", delta, detail)
    if not significant:
        return QualityVerdict("inconclusive", delta, detail)
    return QualityVerdict("regression" if delta > 0 else "improvement", delta, detail)


# ---------------------------------------------------------------------------------------------------------
# The measurement (parent side)
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    ctx: int | None = None  # None: DEFAULT_CTX, or the reference logits file's ctx
    top_k: int = DEFAULT_TOP_K
    tail_samples: int = DEFAULT_TAIL_SAMPLES
    n_threads: int = 0  # 0: physical cores
    n_gpu_layers: int = 99
    type_k: str = "f16"
    type_v: str = "f16"


class Progress:
    """A progress line with ETA on a stream, at most every `every` seconds and at the end of each pass."""

    def __init__(self, stream=None, every: float = 2.0):
        self.stream = stream if stream is not None else sys.stderr
        self.every = every
        self.t0 = time.monotonic()
        self.last = 0.0
        self.passes_total = 0
        self.passes_done = 0
        self.chunk_s: float | None = None  # seconds per chunk, for passes not yet started

    def __call__(self, label: str, done: int, total: int, pass_t0: float) -> None:
        now = time.monotonic()
        if done and done < total and now - self.last < self.every:
            return
        self.last = now
        if done:
            self.chunk_s = (now - pass_t0) / done
        left = (total - done) + total * max(self.passes_total - self.passes_done - 1, 0)
        eta = f", ETA {_hms(left * self.chunk_s)}" if self.chunk_s is not None else ""
        self.stream.write(f"quality [{self.passes_done + 1}/{self.passes_total}] {label}: chunk {done}/{total}, "
                          f"{_hms(now - self.t0)} elapsed{eta}\n")
        self.stream.flush()


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def measure(models: list[str], runner, *, reference: str | None = None, reference_logits: str | None = None,
            text: str | None = None, settings: Settings | None = None, cache: Cache | None = None,
            save_reference: str | None = None, progress: Callable | None = None,
            faults: dict[str, str] | None = None) -> list[QualityResult]:
    """Quality of each model file against a reference on a text; one QualityResult per model, in order.

    The reference is `reference`, or the reference logits file `reference_logits`, or the highest-precision
    file among `models`. Raises QualityError (bad input) before any pass runs or anything is written; a pass
    that fails (OOM, crash, timeout) is a result with that outcome, and the other files still run.
    `faults` (model path → "sigkill", "segv", ...) makes that file's worker really die after its first chunk
    (for `tuner selftest` and the tests).
    """
    faults = faults or {}
    s = settings or Settings()
    if not models:
        raise QualityError("no model: pass --model FILE.gguf (repeatable)")
    if reference and reference_logits:
        raise QualityError("pass either --reference or --reference-logits, not both")
    models = list(dict.fromkeys(str(m) for m in models))
    infos = {m: read_model(m) for m in models}
    if save_reference:
        _check_target(save_reference)

    if reference_logits:
        header = ReferenceLogits.read_header(reference_logits)
        source = Path(reference_logits).name
        if text is not None:
            _, th = read_text(text)
            if th != header["text_hash"]:
                raise QualityError(f"{source} was made from another text ({header['text_name']}) than {text}")
        if s.ctx is not None and s.ctx != header["ctx"]:
            raise QualityError(f"{source} was made with --ctx {header['ctx']}, not {s.ctx}")
        if (s.type_k, s.type_v) != (header["type_k"], header["type_v"]):
            raise QualityError(f"{source} was made with KV cache {header['type_k']}/{header['type_v']}, "
                               f"not {s.type_k}/{s.type_v}")
        ref_info, text_path = None, None
        ctx = header["ctx"]
    else:
        ref_info = read_model(reference) if reference else pick_reference(list(infos.values()))
        source = Path(ref_info.path).name
        text_path, th = read_text(text)
        ctx = s.ctx if s.ctx is not None else DEFAULT_CTX
        header = reference_header(ref_info, th, text_path.name, ctx, s.top_k, s.tail_samples, s.type_k,
                                  s.type_v)
    if ctx < MIN_CTX:
        raise QualityError(f"--ctx must be at least {MIN_CTX}, got {ctx}")
    for m, info in infos.items():
        check_model(header, info, source)
        if info.n_ctx_train and ctx > info.n_ctx_train:
            raise QualityError(f"--ctx {ctx} is above {Path(m).name}'s trained context ({info.n_ctx_train})")
    if ref_info is not None and ref_info.n_ctx_train and ctx > ref_info.n_ctx_train:
        raise QualityError(f"--ctx {ctx} is above the reference's trained context ({ref_info.n_ctx_train})")

    results: dict[str, QualityResult] = {}
    keys = {m: cache_key(infos[m].content_hash, header) for m in models}
    if cache:
        for m in models:
            hit = cache.get(keys[m])
            if hit is not None:
                results[m] = dataclasses.replace(hit, model=m, cached=True)
    todo = [m for m in models if m not in results]
    ref_label = reference_logits or (ref_info.path if ref_info else "")
    base = {"reference": ref_label, "reference_hash": header["model_hash"], "text": header["text_name"],
            "text_hash": header["text_hash"], "ctx": ctx, "top_k": header["top_k"],
            "tail_samples": header["tail_samples"], "type_k": header["type_k"],
            "type_v": header["type_v"]}
    if not todo and not save_reference:
        return [results[m] for m in models]

    job = {"kind": "quality", "ctx": ctx, "n_threads": s.n_threads, "n_gpu_layers": s.n_gpu_layers,
           "type_k": s.type_k, "type_v": s.type_v}
    prog = progress if progress is not None else Progress()
    if isinstance(prog, Progress):
        live_ref = ref_info.content_hash if ref_info is not None else None
        prog.passes_total = sum(infos[m].content_hash != live_ref for m in todo) + (0 if reference_logits else 1)

    def run(label: str, extra: dict):
        t0 = time.monotonic()

        def on_stage(ev):
            if ev.get("stage") == "chunk":
                prog(label, ev["done"], ev["total"], t0)

        x = runner.run_job({**job, **extra}, on_stage=on_stage)
        if isinstance(prog, Progress):
            prog.passes_done += 1
        return x

    with tempfile.TemporaryDirectory(prefix="tuner-quality-") as tmpdir:
        ref_file, self_stats, failed = (Path(reference_logits), None, None) if reference_logits else \
            _reference(run, ref_info, source, text_path, header, s, cache, Path(tmpdir), prog)
        if failed is not None:  # the reference pass failed: no file can be measured
            x = failed
            return [results.get(m) or QualityResult(model=m, model_hash=infos[m].content_hash, outcome=x.outcome,
                                                    cause=f"reference pass ({source}): {x.cause}",
                                                    stderr_tail=_tail(x.log), **base) for m in models]
        if save_reference:
            _copy_atomic(ref_file, Path(save_reference))
        for m in todo:
            info = infos[m]
            res = QualityResult(model=m, model_hash=info.content_hash, file_type=info.file_type,
                                model_size_bytes=info.file_size, **base)
            if self_stats is not None and info.content_hash == header["model_hash"]:
                # the reference's own pass already measured it against itself (same logits, no second decode)
                res.stats, res.wall_s, res.peak_rss_bytes, res.decode_s, res.numpy_s = self_stats
                res.is_reference = True
            else:
                x = run(Path(m).name, {"mode": "compare", "model": m, "reference": str(ref_file),
                                       "fault": faults.get(m)})
                res.wall_s, res.peak_rss_bytes = x.wall_s, x.peak_rss()
                if x.outcome == "ok":
                    res.stats, res.decode_s, res.numpy_s = x.result["stats"], x.result["decode_s"], x.result["numpy_s"]
                    res.is_reference = info.content_hash == header["model_hash"]
                else:
                    res.outcome, res.cause, res.stderr_tail = x.outcome, x.cause, _tail(x.log)
            if cache and res.ok:
                cache.put(keys[m], res)
            results[m] = res
    return [results[m] for m in models]


def _reference(run, ref_info: ModelInfo, source: str, text_path: Path, header: dict, s: Settings,
               cache: Cache | None, tmpdir: Path, prog):
    """The reference summary file: from the cache, or from a reference pass (moved into the cache only once
    it succeeded). Returns (file, (stats, wall_s, peak_rss) of the pass or None, the pass if it failed)."""
    cached = cache.reference_path(header) if cache else None
    if cached is not None and cached.is_file():
        if isinstance(prog, Progress):
            prog.passes_total -= 1
        return cached, None, None
    tmp = tmpdir / "reference.npz"
    x = run(f"reference {source}", {"mode": "reference", "model": ref_info.path, "text": str(text_path),
                                    "top_k": s.top_k, "tail_samples": s.tail_samples, "header": header,
                                    "out": str(tmp)})
    if x.outcome == "bad_input":
        raise QualityError(x.cause)
    if x.outcome != "ok":
        return None, None, x
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        _copy_atomic(tmp, cached)
    return (cached or tmp), (x.result["stats"], x.wall_s, x.peak_rss(), x.result["decode_s"], x.result["numpy_s"]), None


def _tail(log: str, lines: int = 30) -> str:
    return "\n".join(log.rstrip().splitlines()[-lines:])[-3000:]


def _check_target(path: str) -> None:
    p = Path(path)
    if p.is_dir():
        raise QualityError(f"--save-reference-logits is a directory: {p}")
    if not p.parent.is_dir():
        raise QualityError(f"--save-reference-logits: folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise QualityError(f"--save-reference-logits: folder {p.parent} is not writable")


def _copy_atomic(src: Path, dst: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=dst.name + ".", suffix=".part")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------------------------
# The pass (worker side): `tuner.worker` hands `{"kind": "quality", ...}` jobs to run_job
# ---------------------------------------------------------------------------------------------------------
def tokenize(L, model_path: str, data: bytes) -> tuple[np.ndarray, bool, int]:
    """Tokens of `data` as llama-perplexity gets them (special tokens added, not parsed), with a vocabulary-only
    load: a text too short is found before the weights are read. Returns (tokens, add_bos, bos id)."""
    mp = L.llama_model_default_params()
    mp.vocab_only = True
    model = L.llama_model_load_from_file(model_path.encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not read the vocabulary of {model_path}")
    try:
        vocab = L.llama_model_get_vocab(model)
        n_max = len(data) + 16
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(vocab, data, len(data), buf, n_max, True, False)
        if n < 0:
            raise RuntimeError(f"tokenizer needs {-n} tokens, more than {n_max}")
        return (np.frombuffer(buf, dtype=np.int32, count=n).copy(), bool(L.llama_vocab_get_add_bos(vocab)),
                int(L.llama_vocab_bos(vocab)))
    finally:
        L.llama_model_free(model)


def run_job(worker, job: dict) -> dict:
    """One quality pass in the worker: `mode` "reference" (tokenize, decode, write the summary to job["out"])
    or "compare" (decode the reference file's tokens, compare with its summary)."""
    from tuner.record import TrialConfig

    # the worker runs as `python -m tuner.worker`: its classes live in __main__, and only its own
    # TrialFailure is caught and reported as a failed job (an import of tuner.worker would be a second copy)
    w = sys.modules[type(worker).__module__]
    TrialFailure, DECODE_OOM, classify_log, inject_early = w.TrialFailure, w.DECODE_OOM, w.classify_log, w.inject_early
    L = worker.L
    worker.emit("stage", stage="start")
    ctx_n = int(job["ctx"])
    if job["mode"] == "reference":
        data = Path(job["text"]).read_bytes()
        if data.endswith(b"\n"):
            data = data[:-1]  # llama.cpp's -f drops one trailing newline
        tokens, add_bos, bos = tokenize(L, job["model"], data)
        n_chunk = len(tokens) // ctx_n
        if n_chunk < 1:
            raise TrialFailure("bad_input", f"the text is {len(tokens)} tokens, shorter than one chunk of "
                                            f"--ctx {ctx_n}")
        tokens = tokens[: n_chunk * ctx_n]
        ref = None
        top_k, tail_samples = int(job["top_k"]), int(job["tail_samples"])
        rng = np.random.default_rng(0)  # the tail samples: the same reference gives the same summary
    else:
        ref = ReferenceLogits.load(job["reference"])
        tokens, n_chunk = ref.tokens, ref.n_chunk
    worker.load(TrialConfig(model=job["model"], n_gpu_layers=int(job.get("n_gpu_layers", 99))), None)
    model = worker.model
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    add_bos = bool(L.llama_vocab_get_add_bos(vocab))
    bos = L.llama_vocab_bos(vocab)

    n_batch = min(ctx_n, 2048)  # llama-perplexity: n_batch = min(2048, n_ctx), n_ubatch 512
    cp = L.llama_context_default_params()
    cp.n_ctx = ctx_n
    cp.n_batch = n_batch
    cp.n_ubatch = min(512, n_batch)
    cp.n_seq_max = 1
    n_threads = int(job.get("n_threads") or 0) or w.physical_cores()
    cp.n_threads = cp.n_threads_batch = n_threads
    cp.type_k = w.ggml_type(job.get("type_k", "f16"))
    cp.type_v = w.ggml_type(job.get("type_v", "f16"))
    cp.swa_full = False  # as llama.cpp's common params
    cp.no_perf = True
    worker.emit("stage", stage="context")
    mark = len(worker.log.lines)
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise TrialFailure(*classify_log("".join(worker.log.lines[mark:]), "error",
                                         "llama.cpp failed to create the context"))
    first = ctx_n // 2
    per = per_chunk(ctx_n)
    batch = L.llama_batch_init(n_batch, 0, 1)
    try:
        b_tok = np.ctypeslib.as_array(batch.token, shape=(n_batch,))
        b_pos = np.ctypeslib.as_array(batch.pos, shape=(n_batch,))
        b_nseq = np.ctypeslib.as_array(batch.n_seq_id, shape=(n_batch,))
        b_out = np.ctypeslib.as_array(ctypes.cast(batch.logits, ctypes.POINTER(ctypes.c_int8)), shape=(n_batch,))
        for i in range(n_batch):
            batch.seq_id[i][0] = 0
        b_nseq[:] = 1
        buf = np.empty((ROWS, n_vocab), dtype=np.float32)
        mem = L.llama_get_memory(ctx)
        parts: dict[str, list] = {}
        decode_s = numpy_s = 0.0
        worker.emit("stage", stage="chunk", done=0, total=n_chunk)
        for c in range(n_chunk):
            chunk = tokens[c * ctx_n:(c + 1) * ctx_n].copy()
            if add_bos:
                chunk[0] = bos
            targets = chunk[first + 1:]  # position p predicts token p + 1
            ref_c = ref.chunk(c) if ref is not None else None
            L.llama_memory_clear(mem, True)
            row = 0  # scored positions handled so far in this chunk
            for start in range(0, ctx_n, n_batch):
                n = min(n_batch, ctx_n - start)
                pos = np.arange(start, start + n)
                b_tok[:n] = chunk[start:start + n]
                b_pos[:n] = pos
                want = (pos >= first) & (pos <= ctx_n - 2)  # only the scored positions' logits
                b_out[:n] = want
                batch.n_tokens = n
                t0 = time.perf_counter()
                rc = L.llama_decode(ctx, batch)
                if rc != 0:
                    raise TrialFailure("oom" if rc in DECODE_OOM else "error",
                                       f"llama_decode returned {rc}" + (f": {DECODE_OOM[rc]}" if rc in DECODE_OOM else ""))
                n_out = int(want.sum())
                L.llama_synchronize(ctx)
                t1 = time.perf_counter()
                decode_s += t1 - t0
                if not n_out:
                    continue
                ptr = L.llama_get_logits(ctx)
                logits = np.ctypeslib.as_array(ptr, shape=(n_out * n_vocab,)).reshape(n_out, n_vocab)
                for r0 in range(0, n_out, ROWS):
                    x = logits[r0:r0 + ROWS]
                    k = slice(row + r0, row + r0 + len(x))
                    b = buf[:len(x)]
                    if ref is None:
                        summ = summarize_rows(x, targets[k], top_k, b, tail_samples, rng)
                        for name, arr in summ.items():
                            parts.setdefault(name, []).append(arr)
                        ref_rows = summ
                    else:
                        ref_rows = {name: arr[k] for name, arr in ref_c.items()}
                    cmp = compare_rows(x, targets[k], ref_rows, b)
                    cmp["nll_ref"] = ref_rows["nll"]
                    for name, arr in cmp.items():
                        parts.setdefault("cmp_" + name, []).append(arr)
                row += n_out
                numpy_s += time.perf_counter() - t1
            assert row == per
            worker.emit("stage", stage="chunk", done=c + 1, total=n_chunk)
            if c == 0 and job.get("fault"):
                inject_early(job["fault"])  # a real fault in the middle of a pass (tests)
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    stats = statistics(cat["cmp_kld"], cat["cmp_nll"], cat["cmp_nll_ref"], cat["cmp_same_top"])
    out = {"stats": stats, "n_chunk": n_chunk, "n_vocab": n_vocab, "decode_s": decode_s, "numpy_s": numpy_s}
    if ref is None:
        header = dict(job["header"], n_chunk=n_chunk, add_bos=add_bos, bos=int(bos))
        if n_vocab != header["n_vocab"]:
            raise TrialFailure("error", f"llama.cpp reports {n_vocab} tokens, the GGUF header {header['n_vocab']}")
        ReferenceLogits(header, tokens.astype(np.int32), *(cat[k] for k in ReferenceLogits.ARRAYS[1:])) \
            .save(job["out"])
    return out

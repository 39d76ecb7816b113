"""The budget, a study's quality figures and the measurement that drives the passes (each in a worker).

The package docstring (tuner/quality/__init__.py) says how quality is computed and checked."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tuner import files
from tuner.model.meta import ModelInfo, read_model
from tuner.quality.logits import (
    QualityError,
    ReferenceLogits,
    check_model,
    pick_reference,
    read_text,
    reference_header,
)
from tuner.quality.results import (
    Cache,
    QualityResult,
    cache_key,
)
from tuner.units import hms

DEFAULT_CTX = 512  # llama-perplexity's default context
DEFAULT_TOP_K = 256
DEFAULT_TAIL_SAMPLES = 256
MIN_CTX = 16

# The default budget: mean KLD against the highest-precision file. llama.cpp's published KLD figures for
# 7-8 B models put Q8_0 near 0.001, Q6_K near 0.005, Q5_K_M near 0.01 and Q4_K_M between about 0.02 and 0.06;
# 3-bit and 2-bit quants go to 0.1-0.5. 0.05 admits what is commonly called "Q4_K_M-class" loss and refuses
# the steep end of the curve. Small models quantize worse: state your own budget for them.
DEFAULT_MAX_KLD = 0.05


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
        return next(
            (r for r in self.results if (r.model_hash, r.type_k, r.type_v) == (model_hash, type_k, type_v)), None
        )

    def judge(self, rec) -> tuple[bool, str]:
        """(qualifies, why not) for a TrialRecord; a file or KV combination never measured does not qualify."""
        res = self.lookup(rec.model_hash, rec.config.type_k, rec.config.type_v)
        if res is None:
            return (
                False,
                f"quality not measured for {Path(rec.config.model).name} ({rec.config.type_k}/{rec.config.type_v})",
            )
        return self.budget.judge(res)

    def stamp(self, rec) -> None:
        """Put the file's figures on a TrialRecord (Parquet, report and compare read them from there)."""
        res = self.lookup(rec.model_hash, rec.config.type_k, rec.config.type_v)
        if res is None:
            return
        rec.kld_mean, rec.kld_mean_err = res.kld_mean, res.kld_mean_err
        rec.same_top_pct, rec.ppl_ratio = res.same_top_pct, res.ppl_ratio
        rec.quality_ok = self.budget.judge(res)[0]
        rec.quality_basis = hashlib.blake2b(
            json.dumps([res.reference_hash, res.text_hash, res.ctx, res.top_k, res.tail_samples]).encode(),
            digest_size=8,
        ).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"budget": dataclasses.asdict(self.budget), "results": [r.to_dict() for r in self.results]}

    def save(self, study_dir: str | os.PathLike) -> None:
        path = Path(study_dir) / STUDY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with files.atomic_file(path, text=True) as f:
            json.dump(self.to_dict(), f, indent=1)

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
    rpc: str = ""  # llama.cpp RPC servers whose devices take the offloaded layers (llama-server --rpc)


class Progress:
    """A progress line with ETA on a stream, at most every `every` seconds and at the end of each pass (plain
    lines, as the search's: tuner.cli.common.Progress says why)."""

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
        eta = f", ETA {hms(left * self.chunk_s)}" if self.chunk_s is not None else ""
        self.stream.write(
            f"quality [{self.passes_done + 1}/{self.passes_total}] {label}: chunk {done}/{total}, "
            f"{hms(now - self.t0)} elapsed{eta}\n"
        )
        self.stream.flush()


def measure(
    models: list[str],
    runner,
    *,
    reference: str | None = None,
    reference_logits: str | None = None,
    text: str | None = None,
    settings: Settings | None = None,
    cache: Cache | None = None,
    save_reference: str | None = None,
    progress: Callable | None = None,
    faults: dict[str, str] | None = None,
) -> list[QualityResult]:
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
            raise QualityError(
                f"{source} was made with KV cache {header['type_k']}/{header['type_v']}, not {s.type_k}/{s.type_v}"
            )
        ref_info, text_path = None, None
        ctx = header["ctx"]
    else:
        ref_info = read_model(reference) if reference else pick_reference(list(infos.values()))
        source = Path(ref_info.path).name
        text_path, th = read_text(text)
        ctx = s.ctx if s.ctx is not None else DEFAULT_CTX
        header = reference_header(ref_info, th, text_path.name, ctx, s.top_k, s.tail_samples, s.type_k, s.type_v)
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
    base = {
        "reference": ref_label,
        "reference_hash": header["model_hash"],
        "text": header["text_name"],
        "text_hash": header["text_hash"],
        "ctx": ctx,
        "top_k": header["top_k"],
        "tail_samples": header["tail_samples"],
        "type_k": header["type_k"],
        "type_v": header["type_v"],
    }
    if not todo and not save_reference:
        return [results[m] for m in models]

    job = {
        "kind": "quality",
        "ctx": ctx,
        "n_threads": s.n_threads,
        "n_gpu_layers": s.n_gpu_layers,
        "rpc": s.rpc,
        "type_k": s.type_k,
        "type_v": s.type_v,
    }
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
        ref_file, self_stats, failed = (
            (Path(reference_logits), None, None)
            if reference_logits
            else _reference(run, ref_info, source, text_path, header, s, cache, Path(tmpdir), prog)
        )
        if failed is not None:  # the reference pass failed: no file can be measured
            x = failed
            return [
                results.get(m)
                or QualityResult(
                    model=m,
                    model_hash=infos[m].content_hash,
                    outcome=x.outcome,
                    cause=f"reference pass ({source}): {x.cause}",
                    stderr_tail=_tail(x.log),
                    **base,
                )
                for m in models
            ]
        if save_reference:
            files.copy_atomic(ref_file, Path(save_reference), chmod=files.default_mode())
        for m in todo:
            info = infos[m]
            res = QualityResult(
                model=m, model_hash=info.content_hash, file_type=info.file_type, model_size_bytes=info.file_size, **base
            )
            if self_stats is not None and info.content_hash == header["model_hash"]:
                # the reference's own pass already measured it against itself (same logits, no second decode)
                res.stats, res.wall_s, res.peak_rss_bytes, res.decode_s, res.numpy_s = self_stats
                res.is_reference = True
            else:
                x = run(
                    Path(m).name, {"mode": "compare", "model": m, "reference": str(ref_file), "fault": faults.get(m)}
                )
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


def _reference(
    run,
    ref_info: ModelInfo,
    source: str,
    text_path: Path,
    header: dict,
    s: Settings,
    cache: Cache | None,
    tmpdir: Path,
    prog,
):
    """The reference summary file: from the cache, or from a reference pass (moved into the cache only once
    it succeeded). Returns (file, (stats, wall_s, peak_rss) of the pass or None, the pass if it failed)."""
    cached = cache.reference_path(header) if cache else None
    if cached is not None and cached.is_file():
        if isinstance(prog, Progress):
            prog.passes_total -= 1
        return cached, None, None
    tmp = tmpdir / "reference.npz"
    x = run(
        f"reference {source}",
        {
            "mode": "reference",
            "model": ref_info.path,
            "text": str(text_path),
            "top_k": s.top_k,
            "tail_samples": s.tail_samples,
            "header": header,
            "out": str(tmp),
        },
    )
    if x.outcome == "bad_input":
        raise QualityError(x.cause)
    if x.outcome != "ok":
        return None, None, x
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        files.copy_atomic(tmp, cached, chmod=files.default_mode())
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

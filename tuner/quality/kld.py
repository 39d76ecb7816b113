"""The arithmetic of a quality pass (numpy only): softmax, top-k summaries, KLD per position, the statistics.

As llama-perplexity's `--kl-divergence` computes them (see tuner/quality/__init__.py's docstring); shared by the worker
passes and the tests.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

KLD_CUTOFF = -16.0  # llama-perplexity: reference log-probs at or below this are left out of the KLD sum
TAIL_EPS = 1e-12  # tail masses below this are rounding noise, not probability


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
        return np.argpartition(x, n_vocab - k, axis=1)[:, n_vocab - k :]
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
            out[r] = np.argpartition(x[r], n_vocab - k)[n_vocab - k :]
            continue
        cand = c_idx[starts[r] : starts[r + 1]]
        out[r] = cand[np.argpartition(x[r, cand], len(cand) - k)[len(cand) - k :]]
    return out


def summarize_rows(
    x: np.ndarray,
    targets: np.ndarray,
    top_k: int,
    buf: np.ndarray,
    tail_samples: int = 0,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
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
    return {
        "ids": ids,
        "logp": logp.astype(np.float32),
        "tail": tail,
        "tail_ids": t_ids,
        "tail_logp": t_logp.astype(np.float32),
        "nll": nll,
    }


def compare_rows(
    x: np.ndarray, targets: np.ndarray, ref: dict[str, np.ndarray], buf: np.ndarray
) -> dict[str, np.ndarray]:
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
        "kld_mean": kld_mean,
        "kld_mean_err": kld_err,
        "kld_median": float(np.median(kld)),
        "kld_p99": float(np.percentile(kld, 99.0)),
        "kld_max": float(kld.max()),
        "same_top_pct": 100.0 * same,
        "same_top_err": 100.0 * math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
        "ppl": math.exp(lp),
        "ppl_err": math.exp(lp) * lp_err,
        "ppl_ref": math.exp(lb),
        "ppl_ratio": math.exp(ln_ratio),
        "ln_ppl_ratio": ln_ratio,
        "ln_ppl_ratio_err": ln_ratio_err,
        "p_diff_rms_pct": 100.0 * math.sqrt(float((p_diff * p_diff).mean())),
        "n_tokens": n,
    }

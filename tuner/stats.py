"""One statistics rule for every judgement of "faster", "slower" or "worse" in tuner.

Used by the CI gate (tuner.report.compare.judge), the confirmation and its race (tuner.search.confirm), the drift guard
(tuner.search.loop) and the quality gate (tuner.quality.judge_regression). The rule, stated once (README "Statistics"):

- The unit of a sample is a trial (a round of an interleaved comparison), never a repetition: a trial's
  repetitions share its process, its load and the machine's state at that minute, so they are not independent
  (on this project's machines the spread between trials was about twice the spread within one). A trial's
  value is the median of its repetitions.
- A config's figure is the median of its trial values; configs are ranked by that figure and judged by it.
- Two sides differ when BOTH hold: the effect is beyond a practical threshold, AND a test says p < alpha.
  Paired (both sides measured round by round, interleaved): the exact Wilcoxon signed-rank test on the
  per-round log ratios, and the effect is the median per-round ratio. Unpaired: the Mann-Whitney U test on
  the trial values, and the effect is the ratio of the medians.
- Intervals are percentile bootstrap 95 % intervals from scipy.stats.bootstrap (paired resampling for a
  paired ratio).
- Memory breaks a tie only when it matters: at least MEMORY_MIN_BYTES (64 MiB) AND MEMORY_MIN_SHARE (2 %) less.
- Figures that come as an estimate with a standard error (mean KLD) differ when the change is beyond the
  practical threshold (relative, with an absolute floor) AND beyond z = 2 combined standard errors.

The callers choose alpha and the threshold for what they guard (the CI gate: 0.01 and 5 %, the confirmation:
0.05 and 1 %), never the procedure.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as sps

BOOT = 2000
MEMORY_MIN_BYTES = 64 * 2**20
MEMORY_MIN_SHARE = 0.02
Z = 2.0  # standard errors, for figures that come as an estimate ± its standard error


def trial_value(samples: Sequence[float]) -> float | None:
    """One trial's value: the median of its repetitions (None when it measured nothing)."""
    return statistics.median(samples) if samples else None


def center(values: Sequence[float]) -> float | None:
    """A config's figure: the median of its trial values; ranking and judging both use it."""
    return statistics.median(values) if len(values) else None


@dataclass
class Comparison:
    """How side A stands against side B (ratio = A over B, so > 1 when A's figure is larger)."""

    ratio: float
    p: float
    n: tuple[int, int]
    paired: bool
    beyond: bool  # the effect is beyond the practical threshold
    significant: bool  # p < alpha

    @property
    def differ(self) -> bool:
        return self.beyond and self.significant


def min_p(n1: int, n2: int, paired: bool, alternative: str = "two-sided") -> float:
    """The smallest p the test can give at these sizes (exact Wilcoxon: 1/2^n one-sided; MWU: 1/C(n1+n2, n1))."""
    k = 1 if alternative == "two-sided" else 0
    if paired:
        n = min(n1, n2)
        return min(1.0, 2.0 ** (k - n)) if n else 1.0
    if not n1 or not n2:
        return 1.0
    return min(1.0, 2.0**k / math.comb(n1 + n2, n1))


def min_rounds(alpha: float, alternative: str = "two-sided") -> int:
    """The fewest paired rounds at which the test can reach p < alpha (a race cannot drop anyone before)."""
    return next(n for n in range(1, 64) if min_p(n, n, True, alternative) < alpha)


def p_value(a: Sequence[float], b: Sequence[float], paired: bool, alternative: str = "two-sided") -> float:
    """Paired: exact Wilcoxon signed-rank on log(a/b) per round; else Mann-Whitney U. `alternative` as scipy's
    (for A against B: "greater" asks whether A is larger)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if paired:
        d = np.log(a / b)
        if len(d) < 1 or not np.any(d):
            return 1.0
        method = "exact" if len(d) <= 50 and len(np.unique(np.abs(d[d != 0]))) == np.count_nonzero(d) else "auto"
        p = sps.wilcoxon(d, alternative=alternative, method=method).pvalue
    else:
        if len(a) < 1 or len(b) < 1:
            return 1.0
        p = sps.mannwhitneyu(a, b, alternative=alternative).pvalue
    p = float(p)
    return 1.0 if math.isnan(p) else p


def ratio(a: Sequence[float], b: Sequence[float], paired: bool) -> float:
    """The effect: the median per-round ratio when paired, else the ratio of the medians."""
    if paired:
        return float(np.median(np.asarray(a, dtype=float) / np.asarray(b, dtype=float)))
    return float(np.median(a) / np.median(b))


def compare(
    a: Sequence[float],
    b: Sequence[float],
    *,
    paired: bool,
    alpha: float,
    min_effect: float,
    alternative: str = "two-sided",
) -> Comparison:
    """The rule: A and B differ when |ratio - 1| > min_effect (in the asked direction) AND p < alpha.

    Paired: a[i] and b[i] are round i's trial values of each side (equal lengths)."""
    if paired and len(a) != len(b):
        raise ValueError("paired samples need one value a side per round")
    if not len(a) or not len(b) or (not paired and min(len(a), len(b)) < 1):
        return Comparison(1.0, 1.0, (len(a), len(b)), paired, False, False)
    r = ratio(a, b, paired) if np.median(b) else math.inf
    if alternative == "greater":
        beyond = r > 1 + min_effect
    elif alternative == "less":
        beyond = r < 1 - min_effect
    else:
        beyond = abs(r - 1) > min_effect
    p = p_value(a, b, paired, alternative)
    return Comparison(r, p, (len(a), len(b)), paired, beyond, p < alpha)


def median_ci(values: Sequence[float], seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the median of trial values."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2 or np.all(x == x[0]):
        v = float(x[0]) if len(x) else float("nan")
        return v, v
    res = sps.bootstrap(
        (x,), np.median, n_resamples=BOOT, method="percentile", confidence_level=0.95, rng=np.random.default_rng(seed)
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def ratio_ci(a: Sequence[float], b: Sequence[float], paired: bool, seed: int = 0) -> tuple[float, float, float]:
    """The effect (as `ratio`) with a percentile bootstrap 95 % interval: rounds resampled together when paired,
    each side on its own otherwise."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    r = ratio(a, b, paired)
    if min(len(a), len(b)) < 2:
        return r, r, r
    if paired:

        def stat(x, y, axis=-1):
            return np.median(x / y, axis=axis)
    else:

        def stat(x, y, axis=-1):
            return np.median(x, axis=axis) / np.median(y, axis=axis)

    d = a / b if paired else None
    if paired and np.all(d == d[0]):
        return r, r, r
    res = sps.bootstrap(
        (a, b),
        stat,
        paired=paired,
        vectorized=True,
        n_resamples=BOOT,
        method="percentile",
        confidence_level=0.95,
        rng=np.random.default_rng(seed),
    )
    return r, float(res.confidence_interval.low), float(res.confidence_interval.high)


def memory_matters(less: float, more: float) -> bool:
    """Is `less` bytes a difference worth a slower (but statistically tied) config against `more`? Only when it
    saves at least 64 MiB AND 2 %: a few MiB on a 300 MB model or 0.1 % of a 70 GB one changes nothing a user
    can act on, while measurement noise in peak RSS is of that order."""
    saved = more - less
    return saved >= MEMORY_MIN_BYTES and saved >= MEMORY_MIN_SHARE * more


def estimates_differ(
    base: float, base_err: float, cur: float, cur_err: float, rel: float, abs_floor: float = 0.0, z: float = Z
) -> tuple[bool, bool]:
    """(beyond the practical threshold, beyond z combined standard errors) for two estimates with standard
    errors: the threshold is `rel` of the base with an absolute floor (a change of a tiny base figure)."""
    delta = cur - base
    err = math.hypot(base_err or 0.0, cur_err or 0.0)
    return abs(delta) > max(abs_floor, rel * abs(base)), abs(delta) > z * err

"""The CI performance-regression gate: compare two result sets trial by trial, metric by metric.

Rows of BASELINE and CURRENT are paired by a config key (model content hash, every llama.cpp parameter and the
test shape; `repetitions` and `warmup` are how a config is measured, not what, so they are left out). The unit of
a sample is the trial (tuner.stats, the one rule): a speed gives one value per trial (the median of its
repetitions), peak memory one per trial (the worker's high-water mark).

A metric is a regression only when BOTH hold: the change is beyond a practical threshold (5 % for speeds, 10 %
for memory by default) AND the test has p < alpha (0.01). When both sides were measured round by round,
interleaved (`make perf-check`: the i-th trial of each side ran before the (i+1)-th of either) and there are
enough rounds for the paired test to reach alpha (8 at 0.01), rounds are paired: the exact Wilcoxon signed-rank
test on the per-round log ratios, the change is the median per-round ratio; otherwise the Mann-Whitney U test on
the trial values and the change of the medians. Too few trials or too much
noise between trials gives `inconclusive`, never a pass or a fail by luck. With fewer trials a side than the
test needs to reach p < alpha (5 unpaired, 8 paired at 0.01; `make perf-check` and CI measure 14), peak memory is
judged on the threshold alone (memory peaks barely move between runs of one config); the note and the report's
rule line say so.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from tuner import stats
from tuner.errors import TunerError
from tuner.measure import store
from tuner.measure.lock import measurement_lock
from tuner.measure.runner import Runner
from tuner.quality.results import judge_regression
from tuner.record import FAILED, TrialConfig, TrialRecord
from tuner.tables import markdown_table, text_table
from tuner.units import fmt_size


@dataclass(frozen=True)
class Metric:
    name: str
    title: str
    unit: str  # "t/s", "ms", "bytes"
    higher_is_better: bool
    kind: str  # "speed" or "memory": picks the default threshold
    samples: Callable[[TrialRecord], list[float]]


def _one(v) -> list[float]:
    return [float(v)] if v is not None else []


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("tg", "tg t/s", "t/s", True, "speed", lambda r: list(r.tg_samples)),
        Metric("pp", "pp t/s", "t/s", True, "speed", lambda r: list(r.pp_samples)),
        Metric("ttft", "TTFT", "ms", False, "speed", lambda r: list(r.ttft_samples_ms)),
        Metric("peak_ram", "peak RAM", "bytes", False, "memory", lambda r: _one(r.peak_rss_bytes)),
        Metric("peak_vram", "peak VRAM", "bytes", False, "memory", lambda r: _one(r.peak_vram_bytes)),
    )
}
DEFAULT_THRESHOLDS = {"speed": 5.0, "memory": 10.0}  # percent
VERDICTS = ("regression", "improvement", "unchanged", "inconclusive", "missing")
# Measurement settings, not part of what is measured: CI re-measures a config with more repetitions.
IGNORABLE = tuple(f.name for f in fields(TrialConfig) if f.name not in TrialConfig.NOT_KEY)


class CompareError(TunerError):
    """Bad input for a comparison; one line."""


@dataclass
class Settings:
    thresholds: dict[str, float] = field(default_factory=dict)  # metric → percent; missing = kind default
    alpha: float = 0.01
    max_cv: float = 0.20  # robust coefficient of variation above which a side is "too noisy"
    min_samples: int = 3  # trials a side
    ignore: tuple[str, ...] = ()
    allow_hw_mismatch: bool = False
    max_kld_increase: float = 0.10  # quality: mean KLD up by more than this share (and beyond noise) regresses

    def threshold(self, metric: str) -> float:
        return self.thresholds.get(metric, DEFAULT_THRESHOLDS[METRICS[metric].kind])


def parse_thresholds(items: Iterable[str]) -> dict[str, float]:
    """'tg=3', 'peak_ram=15', 'speed=4', 'memory=20' → {metric: percent}."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        try:
            pct = float(value.strip().rstrip("%"))
        except ValueError:
            pct = -1.0
        if not sep or pct < 0 or not math.isfinite(pct):
            raise CompareError(f"bad threshold {item!r}: expected METRIC=PERCENT, e.g. tg=3 or memory=15")
        if name in DEFAULT_THRESHOLDS:
            out.update({m.name: pct for m in METRICS.values() if m.kind == name and m.name not in out})
        elif name in METRICS:
            out[name] = pct
        else:
            raise CompareError(
                f"bad threshold {item!r}: unknown metric {name!r} (one of {', '.join([*METRICS, *DEFAULT_THRESHOLDS])})"
            )
    return out


def parse_ignore(items: Iterable[str]) -> tuple[str, ...]:
    names = [n.strip().replace("-", "_") for item in items for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in IGNORABLE]
    if unknown:
        raise CompareError(f"--ignore {unknown[0]!r}: not a config parameter (one of {', '.join(IGNORABLE)})")
    return tuple(dict.fromkeys(names))


# -- statistics -------------------------------------------------------------------------------------------------
def robust_cv(samples: list[float]) -> float | None:
    """Noise between trials as 1.4826 × MAD / |median| of the trial values: a coefficient of variation one
    outlier trial (a cold cache) does not blow up."""
    if len(samples) < 2:
        return None
    med = statistics.median(samples)
    if med == 0:
        return 0.0 if all(s == 0 for s in samples) else math.inf
    mad = statistics.median(abs(s - med) for s in samples)
    return 1.4826 * mad / abs(med)


def test_name(paired: bool) -> str:
    return "Wilcoxon signed-rank (rounds paired)" if paired else "Mann-Whitney U"


def trials_needed(s: "Settings", paired: bool = False) -> int:
    """Trials a side the test needs before it can give p < alpha (tuner.stats.min_p)."""
    return next((n for n in range(s.min_samples, 1000) if stats.min_p(n, n, paired) < s.alpha), 1000)


def interleaved(base: list[TrialRecord], cur: list[TrialRecord]) -> bool:
    """Were the sides measured round by round (as make perf-check does)? Equal trial counts, and by start time
    the i-th trial of each side both ran before the (i+1)-th of either: then round i pairs them."""
    if len(base) != len(cur) or len(base) < 2 or not all(r.started_utc for r in [*base, *cur]):
        return False
    b, c = sorted(r.started_utc for r in base), sorted(r.started_utc for r in cur)
    return all(max(b[i], c[i]) < min(b[i + 1], c[i + 1]) for i in range(len(b) - 1))


@dataclass
class MetricResult:
    metric: str
    verdict: str
    n_base: int = 0
    n_cur: int = 0
    base: float | None = None  # median
    cur: float | None = None
    change_pct: float | None = None  # (cur - base) / base, in percent; sign as measured
    threshold_pct: float | None = None
    p: float | None = None
    cv_base: float | None = None
    cv_cur: float | None = None
    note: str = ""
    first: dict | None = None  # with --rerun-on-alert: the first judgement, before the rerun


def judge(metric: str, base: list[float], cur: list[float], s: Settings, paired: bool = False) -> MetricResult | None:
    """One metric of one config pair: one value per trial a side (tuner.stats); `paired`: base[i] and cur[i]
    are round i, measured interleaved. None when neither side measured it (nothing to compare)."""
    m = METRICS[metric]
    if not base and not cur:
        return None
    r = MetricResult(metric, "missing", len(base), len(cur), threshold_pct=s.threshold(metric))
    if not base or not cur:
        r.note = f"only {'CURRENT' if cur else 'BASELINE'} measured {m.title}"
        return r
    paired = paired and len(base) == len(cur)
    r.base, r.cur = stats.center(base), stats.center(cur)
    if r.base and (not paired or all(base)):
        r.change_pct = (stats.ratio(cur, base, paired) - 1) * 100.0
    else:
        r.change_pct = 0.0 if r.cur == r.base else math.inf
    r.cv_base, r.cv_cur = robust_cv(base), robust_cv(cur)
    worse = r.change_pct < 0 if m.higher_is_better else r.change_pct > 0
    beyond = abs(r.change_pct) > r.threshold_pct
    direction = "regression" if worse else "improvement"
    test = test_name(paired)
    enough = min(len(base), len(cur)) >= s.min_samples and stats.min_p(len(base), len(cur), paired) < s.alpha
    if not enough:
        if m.kind == "memory":
            r.verdict = direction if beyond else "unchanged"
            r.note = (
                f"one sample per trial, {len(base)} vs {len(cur)} trial(s) (a {test} test needs "
                f"{trials_needed(s, paired)} a side at alpha {s.alpha:g}): judged on the {r.threshold_pct:g}% "
                "threshold alone"
            )
        else:
            r.verdict = "inconclusive"
            r.note = (
                f"too few trials ({len(base)} vs {len(cur)}) for a {test} test at alpha {s.alpha:g}; "
                f"measure at least {trials_needed(s, paired)} a side"
            )
        return r
    noisy = [
        (side, cv) for side, cv in (("BASELINE", r.cv_base), ("CURRENT", r.cv_cur)) if cv is not None and cv > s.max_cv
    ]
    r.p = stats.p_value(cur, base, paired) if not paired or (all(base) and all(cur)) else 1.0
    if noisy:
        r.verdict = "inconclusive"
        r.note = (
            "too noisy: " + ", ".join(f"{side} CV {100 * cv:.0f}%" for side, cv in noisy) + f" > {100 * s.max_cv:.0f}%"
        )
    elif not beyond:
        r.verdict = "unchanged"
        r.note = f"within the {r.threshold_pct:g}% threshold"
    elif r.p < s.alpha:
        r.verdict = direction
        r.note = f"beyond the {r.threshold_pct:g}% threshold, {test} p {_fmt_p(r.p)} < {s.alpha:g}"
    else:
        r.verdict = "inconclusive"
        r.note = (
            f"beyond the {r.threshold_pct:g}% threshold but not significant ({test} p {_fmt_p(r.p)} >= {s.alpha:g})"
        )
    return r


# -- pairing ----------------------------------------------------------------------------------------------------
def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def model_id(rec: TrialRecord) -> str:
    # The content hash survives a moved or renamed file; the name is a fallback for records without one.
    return rec.model_hash or Path(rec.config.model).name


# Parameters llama.cpp derives from others when they are not set: (parameter, its sources, the value it takes).
# Records hold what ran, so "followed" means the recorded value is the derived one (or 0, "not set").
DERIVED: tuple[tuple[str, tuple[str, ...], Callable[[TrialConfig], Any]], ...] = (
    ("n_threads_batch", ("n_threads",), lambda c: c.n_threads),
    ("n_ctx", ("n_prompt", "n_gen", "n_depth"), lambda c: c.n_prompt + c.n_gen + c.n_depth),
    ("n_ubatch", ("n_batch",), lambda c: c.n_batch),  # llama.cpp clamps n_ubatch to n_batch
)


def derived_ignores(recs: list[TrialRecord], ignore: tuple[str, ...]) -> tuple[str, ...]:
    """Derived parameters that followed an ignored source in every trial: ignoring the source ignores them too.

    A derived parameter someone set on its own (on either side) stays in the key.
    """
    return tuple(
        name
        for name, sources, derive in DERIVED
        if name not in ignore
        and any(s in ignore for s in sources)
        and recs
        and all(getattr(r.config, name) in (0, derive(r.config)) for r in recs)
    )


def _model_label(rec: TrialRecord) -> str:
    return Path(rec.config.model).name.removesuffix(".gguf")


@dataclass
class Side:
    """One result set, split into measured (ok) and failed trials per key."""

    path: str
    records: list[TrialRecord]
    ok: dict[tuple, list[TrialRecord]] = field(default_factory=dict)
    failed: dict[tuple, list[TrialRecord]] = field(default_factory=dict)

    def keys(self) -> list[tuple]:
        return list(dict.fromkeys([*self.ok, *self.failed]))

    def rows(self, key) -> list[TrialRecord]:
        return self.ok.get(key, []) + self.failed.get(key, [])


def load(path: str | os.PathLike) -> list[TrialRecord]:
    """Trial records of a Parquet file or a study folder; StoreError (exit 2) for anything else."""
    df = store.read(path)
    missing = [c for c in ("model", "outcome") if c not in df.columns]
    if missing:
        raise store.StoreError(f"{path} is not a tuner results file (no {', '.join(missing)} column)")
    if df.empty:
        raise store.StoreError(f"{path} holds no trials")
    try:
        return store.records(df)
    except (TypeError, ValueError, KeyError) as e:
        raise store.StoreError(f"{path}: unreadable trial row ({str(e).splitlines()[0][:120]})") from None


def split(path: str, recs: list[TrialRecord], ignore: tuple[str, ...]) -> Side:
    side = Side(str(path), recs)
    for r in recs:
        # skipped/interrupted trials measured nothing: neither a sample nor a failure
        bucket = side.ok if r.ok else side.failed if r.outcome in FAILED - {"interrupted"} else None
        if bucket is not None:
            key = (("model", "*" if "model" in ignore else model_id(r)),) + r.config.key((*ignore, "model"))
            bucket.setdefault(key, []).append(r)
    return side


def diff_keys(a: tuple, b: tuple) -> list[str]:
    da, db = dict(a), dict(b)
    return [f"{k}: {_fmt_v(da.get(k))} → {_fmt_v(db.get(k))}" for k in da if da.get(k) != db.get(k)]


def _fmt_v(v) -> str:
    if isinstance(v, tuple):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)


def closest(key: tuple, others: list[tuple]) -> tuple[tuple, list[str]] | None:
    """The key on the other side that differs in the fewest parameters, and how it differs."""
    if not others:
        return None
    best = min(others, key=lambda o: len(diff_keys(key, o)))
    return best, diff_keys(key, best)


# -- hardware and build -----------------------------------------------------------------------------------------
def hw_facts(hw: dict) -> dict[str, Any]:
    """What a reader needs to see to tell two machines apart (the fingerprint is a hash of about these)."""
    if not hw:
        return {}
    return {
        "cpu": hw.get("cpu"),
        "cores": hw.get("cores_physical"),
        "ram_gib": round((hw.get("ram_total") or 0) / 2**30),
        "gpus": ", ".join(
            f"{g.get('name')} {round((g.get('vram_total') or 0) / 2**30)} GiB" for g in hw.get("gpus") or []
        )
        or "none",
    }


def hw_diff(base: list[TrialRecord], cur: list[TrialRecord]) -> str:
    fb = {k: sorted({str(hw_facts(r.hw).get(k)) for r in base}) for k in ("cpu", "cores", "ram_gib", "gpus")}
    fc = {k: sorted({str(hw_facts(r.hw).get(k)) for r in cur}) for k in fb}
    parts = [f"{k} {'/'.join(fb[k])} → {'/'.join(fc[k])}" for k in fb if fb[k] != fc[k]]
    return (
        "; ".join(parts)
        or "fingerprints differ ("
        + "/".join(sorted({r.hw_fingerprint for r in base}))
        + " → "
        + "/".join(sorted({r.hw_fingerprint for r in cur}))
        + ")"
    )


def _build_label(r: TrialRecord) -> str:
    ver = r.build.get("llama_cpp_python") if r.build else None
    return f"{r.build_fingerprint or '?'}" + (f" (llama-cpp-python {ver})" if ver else "")


# -- the report -------------------------------------------------------------------------------------------------
@dataclass
class Pair:
    key: tuple
    label: str
    config: dict
    n_base: int  # trials on each side (ok + failed)
    n_cur: int
    results: list[MetricResult]
    hw_mismatch: str = ""  # what differs, empty when the hardware is the same
    rerun: str = ""  # "confirmed", "not confirmed" after --rerun-on-alert

    @property
    def regressed(self) -> bool:
        return any(r.verdict == "regression" for r in self.results)


@dataclass
class Report:
    baseline: str
    current: str
    settings: Settings
    pairs: list[Pair]
    hardware: dict
    build: dict
    counts: dict = field(default_factory=dict)

    def verdicts(self) -> list[str]:
        return [r.verdict for p in self.pairs for r in p.results]

    def regressions(self) -> list[tuple[Pair, MetricResult]]:
        return [(p, r) for p in self.pairs for r in p.results if r.verdict == "regression"]

    def exit_code(self, fail_on: Iterable[str] = ("regression",)) -> int:
        fail_on = set(fail_on)
        return 1 if any(v in fail_on for v in self.verdicts()) else 0

    def summary_line(self, fail_on: Iterable[str] = ("regression",)) -> str:
        counts = {v: self.verdicts().count(v) for v in VERDICTS if v in self.verdicts()}
        tally = ", ".join(f"{n} {v}" for v, n in counts.items()) or "nothing compared"
        if self.exit_code(fail_on):
            worst = [f"{r.metric} {_fmt_pct(r.change_pct)} ({p.label})" for p, r in self.regressions()]
            failing = "; ".join(worst) if worst else ", ".join(sorted(set(fail_on) & set(counts)))
            return f"FAIL: {failing} [{tally}]"
        return f"PASS: no confirmed regression [{tally}]"

    def to_dict(self, fail_on: Iterable[str] = ("regression",)) -> dict:
        settings = {**asdict(self.settings), "thresholds": {m: self.settings.threshold(m) for m in METRICS}}
        return {
            "baseline": self.baseline,
            "current": self.current,
            "settings": settings,
            "hardware": self.hardware,
            "build": self.build,
            "pairs": [
                {
                    "label": p.label,
                    "config": p.config,
                    "trials": {"baseline": p.n_base, "current": p.n_cur},
                    "hw_mismatch": p.hw_mismatch,
                    "rerun": p.rerun,
                    "metrics": [_jsonable(asdict(r)) for r in p.results],
                }
                for p in self.pairs
            ],
            "summary": self.summary_line(fail_on),
            "exit_code": self.exit_code(fail_on),
        }

    def to_json(self, fail_on: Iterable[str] = ("regression",)) -> str:
        return json.dumps(self.to_dict(fail_on), indent=2)

    # -- text forms --
    def _header(self) -> list[tuple[str, str]]:
        h, b = self.hardware, self.build
        rows = [
            (
                "baseline",
                f"{self.baseline}  ({self.counts.get('baseline', 0)} trial(s), hw {h['baseline']}, "
                f"build {b['baseline']})",
            ),
            (
                "current",
                f"{self.current}  ({self.counts.get('current', 0)} trial(s), hw {h['current']}, build {b['current']})",
            ),
        ]
        if h["mismatch"]:
            rows.append(
                (
                    "hardware",
                    f"DIFFERS: {h['mismatch']}"
                    + (" (compared anyway: --allow-hw-mismatch)" if self.settings.allow_hw_mismatch else ""),
                )
            )
        else:
            rows.append(("hardware", f"same: {h['facts']}"))
        rows.append(("build", "same" if b["baseline"] == b["current"] else "differs (this is what is compared)"))
        if self.settings.ignore:
            rows.append(("ignored", ", ".join(self.settings.ignore)))
        s = self.settings
        rows.append(
            (
                "rule",
                f"one value per trial (the median of its repetitions); regression = change beyond "
                f"the threshold AND p < {s.alpha:g} (Wilcoxon signed-rank when the rounds were "
                f"interleaved and are enough, else Mann-Whitney U); inconclusive when the CV between trials > "
                f"{100 * s.max_cv:.0f}% or < {s.min_samples} trials; peak memory with fewer trials "
                f"than the test needs ({trials_needed(s)} unpaired, {trials_needed(s, True)} paired): "
                "the threshold alone",
            )
        )
        return rows

    def _cells(self) -> list[list[str]]:
        out = []
        for p in self.pairs:
            for r in p.results:
                title, unit = _title_unit(r.metric)
                note = r.note + (f"; rerun: {p.rerun}" if p.rerun and r.first else "")
                out.append(
                    [
                        p.label,
                        title,
                        _fmt_val(r.base, unit),
                        _fmt_val(r.cur, unit),
                        _fmt_pct(r.change_pct),
                        f"{r.threshold_pct:g}%" if r.threshold_pct is not None else "-",
                        _fmt_p(r.p),
                        f"{r.n_base}/{r.n_cur}",
                        r.verdict.upper() if r.verdict == "regression" else r.verdict,
                        note,
                    ]
                )
        return out

    HEAD = ["config", "metric", "baseline", "current", "change", "thr", "p", "n", "verdict", "note"]

    def table(self, fail_on: Iterable[str] = ("regression",)) -> str:
        w = max(len(k) for k, _ in self._header())
        lines = [f"{k.ljust(w)}  {v}" for k, v in self._header()]
        lines += ["", text_table(self.HEAD, self._cells(), RIGHT), "", self.summary_line(fail_on)]
        return "\n".join(lines)

    def markdown(self, fail_on: Iterable[str] = ("regression",)) -> str:
        code = self.exit_code(fail_on)
        lines = [f"### tuner compare: {'❌' if code else '✅'} {self.summary_line(fail_on)}", ""]
        lines += [f"- **{k}**: {v}" for k, v in self._header()]
        lines += [
            "",
            markdown_table(self.HEAD, [[c.replace("|", "\\|") for c in row] for row in self._cells()], RIGHT),
            "",
        ]
        return "\n".join(lines)

    def junit(self, fail_on: Iterable[str] = ("regression",)) -> str:
        """JUnit XML: one test case per config and metric, so CI systems list every comparison."""
        fail_on = set(fail_on)
        cases = [(p, r) for p in self.pairs for r in p.results]
        failures = sum(r.verdict in fail_on for _, r in cases)
        skipped = sum(r.verdict in ("inconclusive", "missing") and r.verdict not in fail_on for _, r in cases)
        suite = ET.Element(
            "testsuite",
            name="tuner compare",
            tests=str(len(cases)),
            failures=str(failures),
            errors="0",
            skipped=str(skipped),
        )
        props = ET.SubElement(suite, "properties")
        for k, v in self._header():
            ET.SubElement(props, "property", name=k, value=v)
        for p, r in cases:
            title, unit = _title_unit(r.metric)
            msg = (
                f"{title}: {r.verdict}, {_fmt_pct(r.change_pct)} ({_fmt_val(r.base, unit)} → "
                f"{_fmt_val(r.cur, unit)}), p {_fmt_p(r.p)}; {r.note}"
            )
            case = ET.SubElement(suite, "testcase", classname=p.label, name=r.metric)
            if r.verdict in fail_on:
                ET.SubElement(case, "failure", message=msg, type=r.verdict).text = msg
            elif r.verdict in ("inconclusive", "missing"):
                ET.SubElement(case, "skipped", message=msg)
            ET.SubElement(case, "system-out").text = msg
        ET.indent(suite)
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"


def _jsonable(d: dict) -> dict:
    # JSON has no infinity: a change from 0 is reported as null
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


RIGHT = {2, 3, 4, 5, 6, 7}  # the figures' columns: baseline, current, change, threshold, p, n


def _fmt_pct(v: float | None) -> str:
    if v is None:
        return "-"
    return "+inf%" if v == math.inf else f"{v:+.1f}%"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2g}" if p >= 0.001 else "<0.001"


def _title_unit(metric: str) -> tuple[str, str]:
    """A result's title and unit: a speed or memory metric's own, else its name for both ("outcome", "kld")."""
    m = METRICS.get(metric)
    return (m.title, m.unit) if m else (metric, metric)


def _fmt_val(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "bytes":
        return fmt_size(v)
    if unit == "kld":
        return f"{v:.5f}"
    return f"{v:.1f} ms" if unit == "ms" else f"{v:.2f}"


def _label(key: tuple, rec: TrialRecord, varying: set[str], ignored_diff: list[str]) -> str:
    d = dict(key)
    c = rec.config
    parts = [_model_label(rec), f"pp{c.n_prompt}/tg{c.n_gen}" + (f"@d{c.n_depth}" if c.n_depth else "")]
    parts += [
        f"{k}={_fmt_v(d[k])}" for k in sorted(varying) if k in d and k not in ("model", "n_prompt", "n_gen", "n_depth")
    ]
    parts += ignored_diff
    return " ".join(parts)


def _failed_result(base_ok: list, cur_ok: list, base_failed: list, cur_failed: list) -> MetricResult | None:
    """A config that measured on one side and failed on the other (OOM, crash...) is itself a verdict."""
    if cur_failed and not cur_ok and base_ok:
        f = cur_failed[-1]
        return MetricResult(
            "outcome",
            "regression",
            len(base_ok),
            len(cur_failed),
            note=f"every CURRENT trial failed: {f.outcome}: {f.cause[:120]}",
        )
    if base_failed and not base_ok and cur_ok:
        f = base_failed[-1]
        return MetricResult(
            "outcome",
            "improvement",
            len(base_failed),
            len(cur_ok),
            note=f"BASELINE failed ({f.outcome}), CURRENT measures",
        )
    if base_failed and cur_failed and not base_ok and not cur_ok:
        return MetricResult(
            "outcome",
            "missing",
            len(base_failed),
            len(cur_failed),
            note=f"failed on both sides: {base_failed[-1].outcome} / {cur_failed[-1].outcome}",
        )
    return None


def compare_records(
    base_recs: list[TrialRecord],
    cur_recs: list[TrialRecord],
    settings: Settings,
    baseline: str = "BASELINE",
    current: str = "CURRENT",
) -> Report:
    """Pair the two record sets and judge every metric. CompareError when nothing pairs or the hardware differs."""
    settings = replace(settings, ignore=settings.ignore + derived_ignores([*base_recs, *cur_recs], settings.ignore))
    b = split(baseline, base_recs, settings.ignore)
    c = split(current, cur_recs, settings.ignore)
    bkeys, ckeys = b.keys(), c.keys()
    if not bkeys:
        raise CompareError(f"{baseline} holds no measured or failed trials (only skipped/interrupted ones)")
    if not ckeys:
        raise CompareError(f"{current} holds no measured or failed trials (only skipped/interrupted ones)")
    common = [k for k in bkeys if k in set(ckeys)]
    if not common:
        near = min(((bk, ck) for bk in bkeys for ck in ckeys), key=lambda kk: len(diff_keys(*kk)))
        diff = diff_keys(*near)
        hint = [d.split(":")[0] for d in diff]
        raise CompareError(
            f"no config of {baseline} matches one of {current}: the closest pair differs in "
            f"{'; '.join(diff)} (pass --ignore {','.join(hint)} to pair them anyway)"
        )
    all_keys = list(dict.fromkeys([*bkeys, *ckeys]))
    varying = {k for k in dict(all_keys[0]) if len({dict(x).get(k) for x in all_keys}) > 1}

    pairs: list[Pair] = []
    mismatches = []
    for key in all_keys:
        brows, crows = b.rows(key), c.rows(key)
        rec = (brows or crows)[-1]
        ignored_diff = []
        for name in settings.ignore:
            if name == "model":
                vb, vc = sorted({_model_label(r) for r in brows}), sorted({_model_label(r) for r in crows})
            else:
                vb = sorted({str(_hashable(getattr(r.config, name))) for r in brows})
                vc = sorted({str(_hashable(getattr(r.config, name))) for r in crows})
            if brows and crows and vb != vc:
                ignored_diff.append(f"{name}={'/'.join(vb)}→{'/'.join(vc)}")
        label = _label(key, rec, varying, ignored_diff)
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(key).items()}
        if not brows or not crows:
            where, other = (current, ckeys) if not crows else (baseline, bkeys)
            near = closest(key, [k for k in other if k not in (bkeys if not crows else ckeys)] or other)
            note = f"not measured in {where}"
            if near:
                note += f"; closest config there differs in {'; '.join(near[1])}"
            pairs.append(
                Pair(
                    key,
                    label,
                    config,
                    len(brows),
                    len(crows),
                    [MetricResult("config", "missing", len(brows), len(crows), note=note)],
                )
            )
            continue
        pair = Pair(key, label, config, len(brows), len(crows), [])
        fb, fc = {r.hw_fingerprint for r in brows}, {r.hw_fingerprint for r in crows}
        if fb != fc:
            pair.hw_mismatch = hw_diff(brows, crows)
            mismatches.append((label, pair.hw_mismatch))
        pair.results = judge_pair(
            b.ok.get(key, []), c.ok.get(key, []), b.failed.get(key, []), c.failed.get(key, []), settings
        )
        if pair.hw_mismatch:
            for r in pair.results:
                r.note = f"hardware differs ({pair.hw_mismatch}); " + r.note
        pairs.append(pair)
    if mismatches and not settings.allow_hw_mismatch:
        label, what = mismatches[0]
        raise CompareError(
            f"hardware differs between {baseline} and {current} for {len(mismatches)} config(s), "
            f"e.g. {label}: {what}; measure both on one machine, or pass --allow-hw-mismatch "
            "to compare anyway"
        )

    def sides(recs):
        return "/".join(sorted({r.hw_fingerprint or "?" for r in recs}))

    facts = hw_facts((base_recs[-1]).hw)
    hardware = {
        "baseline": sides(base_recs),
        "current": sides(cur_recs),
        "facts": ", ".join(f"{k} {v}" for k, v in facts.items()) if facts else "unknown",
        "mismatch": "; ".join(f"{lbl}: {w}" for lbl, w in dict(mismatches).items()),
    }
    build = {
        "baseline": " / ".join(sorted({_build_label(r) for r in base_recs})),
        "current": " / ".join(sorted({_build_label(r) for r in cur_recs})),
    }
    return Report(
        baseline,
        current,
        settings,
        pairs,
        hardware,
        build,
        counts={"baseline": len(base_recs), "current": len(cur_recs)},
    )


def judge_pair(
    base_ok: list[TrialRecord],
    cur_ok: list[TrialRecord],
    base_failed: list[TrialRecord],
    cur_failed: list[TrialRecord],
    settings: Settings,
) -> list[MetricResult]:
    out = []
    failed = _failed_result(base_ok, cur_ok, base_failed, cur_failed)
    if failed:
        out.append(failed)
    if base_ok and cur_ok:
        # paired when the rounds were interleaved AND there are enough of them for the paired test to reach alpha
        # (8 at 0.01); fewer rounds are judged unpaired, where 5 trials a side can
        paired = interleaved(base_ok, cur_ok) and stats.min_p(len(base_ok), len(cur_ok), True) < settings.alpha
        for name, m in METRICS.items():
            b = [stats.trial_value(m.samples(rec)) for rec in sorted(base_ok, key=lambda r: r.started_utc)]
            c = [stats.trial_value(m.samples(rec)) for rec in sorted(cur_ok, key=lambda r: r.started_utc)]
            both = paired and None not in b and None not in c
            r = judge(name, [x for x in b if x is not None], [x for x in c if x is not None], settings, both)
            if r is not None:
                out.append(r)
    kld = judge_quality(base_ok + base_failed, cur_ok + cur_failed, settings)
    if kld is not None:
        out.append(kld)
    return out


def judge_quality(base: list[TrialRecord], cur: list[TrialRecord], settings: Settings) -> MetricResult | None:
    """The quality gate: the model file's mean KLD as each side's search measured it (on its records), judged by
    tuner.quality.judge_regression; None when a side has no quality figures."""

    def figures(recs):
        r = next((r for r in recs if r.kld_mean is not None), None)
        return (
            None
            if r is None
            else {
                "model": r.config.model,
                "model_hash": r.model_hash,
                "reference_hash": r.quality_basis,
                "kld_mean": r.kld_mean,
                "kld_mean_err": r.kld_mean_err or 0.0,
            }
        )

    b, c = figures(base), figures(cur)
    if b is None or c is None:
        return None
    v = judge_regression(b, c, max_increase=settings.max_kld_increase)
    change = 100.0 * v.delta / b["kld_mean"] if v.delta is not None and b["kld_mean"] else None
    return MetricResult(
        "kld",
        v.verdict,
        len(base),
        len(cur),
        base=b["kld_mean"],
        cur=c["kld_mean"],
        change_pct=change,
        threshold_pct=100.0 * settings.max_kld_increase,
        note=v.detail,
    )


def compare(baseline: str | os.PathLike, current: str | os.PathLike, settings: Settings | None = None) -> Report:
    """Compare two Parquet files or study folders (the library form of `tuner compare`)."""
    settings = settings or Settings()
    return compare_records(load(baseline), load(current), settings, str(baseline), str(current))


# -- confirmation: re-measure what alerted ----------------------------------------------------------------------
def rerun_alerts(report: Report, current: str | os.PathLike, run: Callable[[TrialConfig], TrialRecord]) -> Report:
    """Re-measure every CURRENT config with a regression as many times as CURRENT measured it, and judge it
    again on the fresh trials alone.

    The rerun has the first judgement's power (a single trial against the baseline's several misses real
    slowdowns: benchmarks/gate_power.py). The fresh trials are appended to CURRENT's Parquet. A regression
    stands only when the rerun shows it too (the chance of two false alarms in a row is about the square of
    one); otherwise the rerun's verdict replaces it and the note keeps the first judgement.
    """
    base_side = split(report.baseline, load(report.baseline), report.settings.ignore)
    cur_recs = load(current)
    cur_side = split(str(current), cur_recs, report.settings.ignore)
    for pair in report.pairs:
        if not pair.regressed:
            continue
        rows = cur_side.rows(pair.key)
        last = max(rows, key=lambda r: r.started_utc or "")
        reps = max(r.config.repetitions for r in rows)
        fresh = []
        for _ in rows:
            fresh.append(run(replace(last.config, repetitions=reps)))
            store.append(current, fresh[-1:])
        ok = [f for f in fresh if f.ok]
        again = judge_pair(
            base_side.ok.get(pair.key, []),
            ok,
            base_side.failed.get(pair.key, []),
            [f for f in fresh if not f.ok],
            report.settings,
        )
        again_by = {r.metric: r for r in again}
        confirmed = False
        merged = []
        for first in pair.results:
            new = again_by.pop(first.metric, None)
            if first.verdict != "regression":
                merged.append(first)
                continue
            summary = {"verdict": first.verdict, "change_pct": first.change_pct, "p": first.p, "note": first.note}
            if new is not None and new.verdict == "regression":
                confirmed = True
                new.note = f"confirmed on rerun (first run {_fmt_pct(first.change_pct)}); {new.note}"
                new.first = summary
                merged.append(new)
            else:
                if new is None and first.metric == "outcome":  # failed before, ran fine now
                    ran = ", ".join(sorted({f.outcome for f in fresh}))
                    new = replace(first, verdict="unchanged", n_cur=len(ok), note=f"the rerun ran: {ran}")
                shown = new or replace(first, verdict="missing", note="the rerun did not measure it")
                was = _fmt_pct(first.change_pct) if first.change_pct is not None else "failed"
                shown.note = f"first run {was}, not confirmed on rerun; {shown.note}"
                shown.first = summary
                merged.append(shown)
        # metrics the first judgement could not have (CURRENT had only failed trials) come from the rerun
        merged += [r for name, r in again_by.items() if name not in {m.metric for m in merged}]
        pair.results = merged
        pair.rerun = "confirmed" if confirmed else "not confirmed"
        report.counts["current"] = report.counts.get("current", 0) + len(fresh)
    return report


def rerun_on_this_machine(
    report: Report,
    current: str | os.PathLike,
    trial_timeout: float = 600.0,
    mem_limit: int | None = None,
    no_wait: bool = False,
    log: Callable[[str], None] | None = None,
    lock_file: str | None = None,
) -> Report:
    """--rerun-on-alert as a call: take the measurement lock, check this is CURRENT's machine, rerun_alerts.

    CompareError when a model file is gone or this machine is not the one CURRENT was measured on.
    """
    alerts = [p for p in report.pairs if p.regressed]
    cur_path = store.resolve(current)
    store.check_writable(cur_path)
    for p in alerts:
        models = {r.config.model for r in split(str(current), load(current), report.settings.ignore).rows(p.key)}
        gone = [m for m in models if not Path(m).is_file()]
        if gone:
            raise CompareError(f"--rerun-on-alert: model file {gone[0]} (of {p.label}) is not here to re-measure")
    if log:
        log(f"re-measuring {len(alerts)} alerting config(s) before failing (as many trials as CURRENT has)...")
    with measurement_lock(wait=not no_wait, what="tuner compare --rerun-on-alert", path=lock_file):
        with Runner(timeout=trial_timeout, mem_limit=mem_limit) as runner:
            here = runner.hw.fingerprint()
            cur_hw = {r.hw_fingerprint for r in load(current)}
            if here not in cur_hw:
                raise CompareError(
                    f"--rerun-on-alert: this machine (hw {here}) is not the one CURRENT was measured "
                    f"on ({'/'.join(sorted(cur_hw))}); rerun there"
                )
            return rerun_alerts(report, cur_path, runner.run)

"""The report's charts, one function each, drawn with matplotlib's Agg canvas on bare `Figure`s (no pyplot).

A new chart: write `chart_NAME(study, colours, **options) -> Chart` here and add it to STUDY_CHARTS at the end.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from typing import Callable

import optuna
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator
from optuna.distributions import CategoricalDistribution

from tuner.record import OUTCOMES, TrialConfig
from tuner.report.canvas import (
    BASELINE_STYLE,
    LABELS,
    MODEL_MARKERS,
    NO_OFFLOAD,
    OUTCOME_COLOURS,
    Chart,
    figure,
    legend,
    mark_not_ok,
    note,
    single_x,
)
from tuner.report.load import (
    DEFAULT_MAP,
    SHAPE_FIELDS,
    Study,
    mem_scale,
    model_label,
    parse_utc,
    shape_label,
    varying_fields,
    xvalue,
)
from tuner.report.proofs import chart_confirmation, chart_context_ladder, chart_quality
from tuner.search.recommend import BASELINES, pareto_front
from tuner.units import fmt_size


def _speed_panel(ax, study: Study, colours, param: str, metric: str, chart: Chart) -> dict:
    """t/s against one parameter: every ok trial a faint dot; per quant file a line through the best trial at
    each value, its error bar the sd over the repetitions; failed and skipped trials marked at 0 t/s."""
    trials = study.trials
    ok = [r for r in trials if r.ok and r.metric(metric)[0] is not None]
    # flash_attn "on"/"off", type_k, use_mmap: category labels (a bool would be drawn at 0 and 1)
    categorical = any(isinstance(xvalue(r, param), (str, bool)) for r in trials)

    def x_of(r):
        v = xvalue(r, param)
        return str(v).lower() if categorical else v

    by_model = defaultdict(list)
    for r in ok:
        by_model[model_label(r.config.model)].append(r)
    for m, rs in sorted(by_model.items()):
        c = colours[m]
        ax.scatter(
            [x_of(r) for r in rs], [r.metric(metric)[0] for r in rs], color=c, alpha=0.3, s=16, linewidths=0, zorder=2
        )
        best: dict = {}
        for r in rs:
            x = x_of(r)
            if x not in best or r.metric(metric)[0] > best[x].metric(metric)[0]:
                best[x] = r
        xs = sorted(best)
        ax.errorbar(
            xs,
            [best[x].metric(metric)[0] for x in xs],
            yerr=[best[x].metric(metric)[1] or 0 for x in xs],
            color=c,
            marker="o",
            ms=5,
            capsize=3,
            lw=1.5,
            zorder=3,
            label=f"{m} (best at each value)",
        )
        chart.counts["ok"] += len(rs)
    extra: dict = {}
    mark_not_ok(ax, trials, x_of, lambda r: 0.0, chart, extra)
    what = {"tg": "tg: generation", "pp": "pp: prompt processing"}[metric]
    ax.set_ylabel(f"{what} speed (tokens/s)")
    ax.set_xlabel(LABELS.get(param, param))
    if not categorical:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    top = max([r.metric(metric)[0] + (r.metric(metric)[1] or 0) for r in ok], default=1.0)
    ax.set_ylim(-0.05 * top, 1.12 * top)
    if not ok:
        note(ax, f"no trial succeeded: no {metric} t/s to plot\n(failed trials are marked at 0)", chart)
    elif len({x_of(r) for r in trials}) < 2:
        note(ax, f"only one {param} value was measured", chart, "top")
    if not categorical:
        single_x(ax, [xvalue(r, param) for r in trials])
    return extra


# drawn elsewhere: the model is each line's colour, threads have chart 2, a ladder's depth follows its context
# (chart 9)
SPEED_ELSEWHERE = ("model", "n_threads", "n_threads_batch", "n_depth")


def speed_dimensions(study: Study) -> list[str]:
    """The config fields the study varied, in TrialConfig order, that chart 1 draws speed against."""
    return [d for d in varying_fields(study.trials) if d not in SPEED_ELSEWHERE]


def chart_speed_vs_varied(study: Study, colours, **options) -> Chart:
    """tg and pp against each dimension the study varied: a constant (n_gpu_layers 0 on a CPU build) is one
    point that says nothing, so it gets no panel."""
    dims = speed_dimensions(study)
    fig = figure(2, max(1, len(dims)), height=3.6)
    ch = Chart(
        "1-speed-vs-varied",
        "Speed against what the study varied",
        "tg and pp t/s against each parameter the study varied (threads: chart 2), one line per quant "
        "file (best trial at each value, error bars: sd over the repetitions); × = failed trials at 0 "
        "t/s. Parameters that never varied get no panel.",
        fig,
        study=study.label,
    )
    extras = []
    for i, d in enumerate(dims):
        for ax, metric in zip(fig.axes[2 * i : 2 * i + 2], ("tg", "pp")):
            extras.append(_speed_panel(ax, study, colours, d, metric, ch))
            if d == "n_gpu_layers":
                _vram_wall(ax, study, ch)
    if not dims:
        why = (
            "no trial succeeded: no t/s to plot"
            if not study.ok
            else "no parameter but threads varied (chart 2 draws those)"
        )
        for ax in fig.axes:
            ax.set_axis_off()
        note(fig.axes[0], why, ch)
    if not study.gpu_offload and "n_gpu_layers" not in dims:
        ch.notes.append(NO_OFFLOAD)  # said in the report's text: why there is no GPU-layers panel
    legend(fig, extras)
    varied = ", ".join(dims) or "nothing but threads"
    fig.suptitle(f"{study.label}: t/s against {varied} ({shape_label(study.trials)})")
    return ch


def _vram_wall(ax, study: Study, chart: Chart) -> None:
    """Where the device's VRAM ran out: the fewest GPU layers any trial ran out of memory with (per quant),
    or the first layer count whose peak VRAM reached 95% of the device total."""
    total = study.vram_total
    walls = {}
    for r in study.trials:
        ngl = r.config.n_gpu_layers
        full = total and r.peak_vram_bytes and r.peak_vram_bytes >= 0.95 * total
        if ngl > 0 and (r.outcome == "oom" or full):
            m = model_label(r.config.model)
            walls[m] = min(walls.get(m, ngl), ngl)
    for m, ngl in sorted(walls.items()):
        label = f"VRAM limit reached: {m} from ngl={ngl}" + (f" ({fmt_size(total)} device)" if total else "")
        ax.axvline(ngl, color=OUTCOME_COLOURS["oom"], ls="-.", lw=1.2, alpha=0.8, label=label)
        chart.counts["vram_wall"] += 1


def chart_speed_vs_threads(study: Study, colours, **options) -> Chart:
    fig = figure(2)
    ch = Chart(
        "2-speed-vs-threads",
        "Speed against threads",
        "tg t/s against n_threads and pp t/s against n_threads_batch (the threads llama.cpp uses for "
        "prompt batches), one line per quant file.",
        fig,
        study=study.label,
    )
    legend(
        fig,
        [
            _speed_panel(fig.axes[0], study, colours, "n_threads", "tg", ch),
            _speed_panel(fig.axes[1], study, colours, "n_threads_batch", "pp", ch),
        ],
    )
    fig.suptitle(f"{study.label}: t/s against threads (physical cores: {study.hw.get('cores_physical', '?')})")
    return ch


def _mem_panel(ax, study: Study, colours, param: str, what: str, chart: Chart) -> dict:
    trials = study.trials
    attr = "peak_rss_bytes" if what == "ram" else "peak_vram_bytes"
    total = study.ram_total if what == "ram" else study.vram_total
    vals = [getattr(r, attr) for r in trials if getattr(r, attr)]
    div, unit = mem_scale(vals or ([total] if total else []))
    by_model = defaultdict(list)
    for r in trials:
        if r.ok and getattr(r, attr):
            by_model[model_label(r.config.model)].append(r)
    for m, rs in sorted(by_model.items()):
        ax.scatter(
            [xvalue(r, param) for r in rs],
            [getattr(r, attr) / div for r in rs],
            color=colours[m],
            s=22,
            alpha=0.8,
            zorder=3,
            label=m,
        )
        chart.counts["ok"] += len(rs)
    extra: dict = {}
    # a failed trial's peak is what it reached before dying: that is where the wall is
    mark_not_ok(
        ax,
        trials,
        lambda r: xvalue(r, param),
        lambda r: getattr(r, attr) / div if getattr(r, attr) else None,
        chart,
        extra,
    )
    name = "RAM (peak RSS)" if what == "ram" else "VRAM"
    if total and vals and total / max(vals) > 8:
        # the machine dwarfs this model: a line up there would squash every point onto the axis
        ax.set_title(
            f"machine {name.split()[0]}: {fmt_size(total)}, off this scale ({total / max(vals):.0f}× the largest peak)",
            fontsize=8,
            color="#444444",
        )
        chart.counts[f"{what}_total_text"] += 1
    elif total:
        ax.axhline(total / div, color="#444444", ls="--", lw=1.2, label=f"machine {name.split()[0]}: {fmt_size(total)}")
        chart.counts[f"{what}_total_line"] += 1
        cap = _cap(study, what)
        if cap and cap < total:
            ax.axhline(cap / div, color="#c0392b", ls=":", lw=1.2, label=f"usable (limits − headroom): {fmt_size(cap)}")
    ax.set_xlabel(LABELS.get(param, param))
    ax.set_ylabel(f"peak {name} ({unit})")
    if param == "n_ctx" and vals:
        ctxs = [xvalue(r, "n_ctx") for r in trials]
        if max(ctxs) >= 4 * min(ctxs) > 0:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if vals:
        single_x(ax, [xvalue(r, param) for r in trials])
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        if what == "vram":
            note(ax, "no VRAM measured" + (f"\n({NO_OFFLOAD})" if not study.gpu_offload else ""), chart)
        else:
            note(ax, "no trial has a peak RAM reading", chart)
    missing = sum(1 for r in trials if not r.ok and not getattr(r, attr))
    if vals and missing and what == "ram":
        ax.text(
            0.01,
            0.01,
            f"{missing} failed/skipped trial(s) without a reading not placed",
            transform=ax.transAxes,
            fontsize=7,
            color="#666666",
        )
    return extra


def _cap(study: Study, what: str) -> int | None:
    lim = (study.recommended or {}).get("limits") or {}
    head = lim.get("headroom") or 0
    if what == "ram":
        tot = [x for x in (lim.get("max_ram"), study.ram_total) if x]
        return min(tot) - head if tot else None
    caps = [x for x in (lim.get("max_vram"), (study.vram_total - head) if study.vram_total else None) if x]
    return min(caps) if caps else None


def chart_memory(study: Study, colours, **options) -> Chart:
    fig = figure(2, 2, height=3.6)
    ch = Chart(
        "3-memory",
        "Measured memory",
        "Peak RAM (worker RSS) and peak VRAM against n_gpu_layers and n_ctx, with the machine's totals "
        "as dashed lines: the hardware math, measured instead of guessed.",
        fig,
        study=study.label,
    )
    a = fig.axes
    extras = [
        _mem_panel(a[0], study, colours, "n_gpu_layers", "ram", ch),
        _mem_panel(a[1], study, colours, "n_ctx", "ram", ch),
        _mem_panel(a[2], study, colours, "n_gpu_layers", "vram", ch),
        _mem_panel(a[3], study, colours, "n_ctx", "vram", ch),
    ]
    if not study.gpu_offload:
        note(a[0], NO_OFFLOAD, ch, "top")
    legend(fig, extras)
    fig.suptitle(f"{study.label}: peak memory")
    return ch


def chart_pareto(study: Study, colours, **options) -> Chart:
    fig = figure(1, width=7.5, height=4.6)
    ax = fig.axes[0]
    ch = Chart(
        "4-pareto",
        "Speed against memory (Pareto front)",
        "tg t/s against peak memory (RSS + VRAM) of every trial; the line joins the configs no other "
        "config beats on both; the star is the recommendation; hollow = measured under drift.",
        fig,
        study=study.label,
    )
    trials = study.trials
    ok = [r for r in trials if r.ok and r.metric("tg")[0] is not None and (r.peak_rss_bytes or r.peak_vram_bytes)]
    mem = lambda r: (r.peak_rss_bytes or 0) + (r.peak_vram_bytes or 0)  # noqa: E731
    div, unit = mem_scale([mem(r) for r in trials])
    for m in sorted({model_label(r.config.model) for r in ok}):
        for drift in (False, True):
            # trials measured under drift are hollow: the recommendation passes them over
            rs = [r for r in ok if model_label(r.config.model) == m and r.drift == drift]
            if rs:
                ax.errorbar(
                    [mem(r) / div for r in rs],
                    [r.metric("tg")[0] for r in rs],
                    yerr=[r.metric("tg")[1] or 0 for r in rs],
                    fmt="o",
                    color=colours[m],
                    ms=5,
                    alpha=0.8,
                    capsize=2,
                    mfc="white" if drift else colours[m],
                    zorder=3,
                    label=f"{m} (measured under drift)" if drift else m,
                )
                ch.counts["ok"] += len(rs)
    front = pareto_front(ok)
    if front:
        xs = [f["peak_memory_bytes"] / div for f in front]
        ys = [f["tg_ts_mean"] for f in front]
        ax.step(
            xs,
            ys,
            where="post",
            color="#333333",
            lw=1.2,
            alpha=0.7,
            zorder=2,
            label=f"Pareto front ({len(front)} configs)",
        )
        ch.counts["front"] = len(front)
    extra: dict = {}
    mark_not_ok(ax, trials, lambda r: mem(r) / div, lambda r: 0.0 if mem(r) else None, ch, extra)
    rec = study.recommended
    best = next((r for r in ok if rec and r.trial_number == rec.get("trial_number")), None)
    if best is not None:
        ax.scatter(
            [mem(best) / div],
            [best.metric("tg")[0]],
            marker="*",
            s=320,
            color="gold",
            edgecolors="black",
            linewidths=1,
            zorder=6,
            label=f"recommended (trial #{best.trial_number})",
        )
        ax.annotate(
            f"#{best.trial_number}: {best.metric('tg')[0]:.1f} t/s",
            (mem(best) / div, best.metric("tg")[0]),
            xytext=(8, 8),
            textcoords="offset points",
            fontsize=8,
        )
        ch.counts["recommended"] = 1
    ax.set_xlabel(f"peak memory: RSS + VRAM ({unit})")
    ax.set_ylabel("tg: generation speed (tokens/s)")
    if not ok:
        note(
            ax,
            "no trial succeeded: no speed/memory point to plot\n(failed trials with a memory reading "
            "are marked at 0 t/s)",
            ch,
        )
    elif len(ok) < 2:
        note(ax, "only one ok trial: no trade-off to show", ch, "top")
    if rec is None:
        note(ax, "no recommendation (no trial succeeded within the limits)", ch, "top")
    legend(fig, [extra], "right")
    fig.suptitle(f"{study.label}: tg t/s against peak memory")
    return ch


def _sort_key(v):
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def chart_outcome_map(study: Study, colours, outcome_map: tuple[str, str] = DEFAULT_MAP, **options) -> Chart:
    dims = outcome_map
    fig = figure(1, width=7.5, height=4.8)
    ax = fig.axes[0]
    xd, yd = dims
    ch = Chart(
        "5-outcome-map",
        f"Outcome map ({xd} × {yd})",
        f"Every trial at its {xd} × {yd} cell, coloured by outcome (trials sharing a cell are spread "
        f"within it; marker shape = quant file): the out-of-memory wall is where green turns red.",
        fig,
        study=study.label,
    )
    trials = study.trials
    xs = sorted({xvalue(r, xd) for r in trials}, key=_sort_key)
    ys = sorted({xvalue(r, yd) for r in trials}, key=_sort_key)
    cells = defaultdict(list)
    for r in trials:
        cells[(xs.index(xvalue(r, xd)), ys.index(xvalue(r, yd)))].append(r)
    markers = {
        m: MODEL_MARKERS[i % len(MODEL_MARKERS)]
        for i, m in enumerate(sorted({model_label(r.config.model) for r in trials}))
    }
    seen_outcomes = Counter()
    for (cx, cy), rs in cells.items():
        k = len(rs)
        cols = math.ceil(math.sqrt(k))
        step = 0.7 / cols
        for i, r in enumerate(sorted(rs, key=lambda r: r.trial_number or 0)):
            dx = (i % cols - (cols - 1) / 2) * step
            dy = (i // cols - (math.ceil(k / cols) - 1) / 2) * step
            ax.scatter(
                [cx + dx],
                [cy + dy],
                marker=markers[model_label(r.config.model)],
                s=60 if k < 10 else 30,
                color=OUTCOME_COLOURS.get(r.outcome, "#000000"),
                edgecolors="white",
                linewidths=0.6,
                zorder=3,
            )
            seen_outcomes[r.outcome] += 1
            ch.counts[r.outcome] += 1
    ax.set_xticks(range(len(xs)), [str(v) for v in xs])
    ax.set_yticks(range(len(ys)), [str(v) for v in ys])
    ax.set_xlim(-0.5, len(xs) - 0.5)
    ax.set_ylim(-0.5, len(ys) - 0.5)
    ax.grid(False)
    for i in range(len(xs) + 1):
        ax.axvline(i - 0.5, color="#dddddd", lw=0.8)
    for i in range(len(ys) + 1):
        ax.axhline(i - 0.5, color="#dddddd", lw=0.8)
    ax.set_xlabel(LABELS.get(xd, xd))
    ax.set_ylabel(LABELS.get(yd, yd))
    handles = [
        Line2D([], [], ls="", marker="o", color=OUTCOME_COLOURS.get(o, "#000"), label=f"{o} ({n})")
        for o, n in sorted(seen_outcomes.items(), key=lambda kv: OUTCOMES.index(kv[0]) if kv[0] in OUTCOMES else 99)
    ]
    if len(markers) > 1:
        handles += [Line2D([], [], ls="", marker=mk, color="#555555", label=m) for m, mk in markers.items()]
    fig.legend(handles=handles, loc="outside right upper", framealpha=0.9)
    if "n_gpu_layers" in dims and not study.gpu_offload:
        note(ax, NO_OFFLOAD, ch, "top")
    if len(xs) * len(ys) < 2:
        note(ax, f"only one {xd} × {yd} cell was measured", ch, "top")
    fig.suptitle(f"{study.label}: outcome of every trial ({len(trials)})")
    return ch


def chart_progress(study: Study, colours, **options) -> Chart:
    fig = figure(2)
    ch = Chart(
        "6-search-progress",
        "Search progress",
        "Best tg so far against trial number and wall time, with the baselines (llama-server's own --fit "
        "placement, llama.cpp's defaults, the seed's 3500 MB/layer heuristic and the community MoE recipe) as "
        "horizontal lines; ◆ = drift-anchor re-measurements.",
        fig,
        study=study.label,
    )
    trials = sorted([r for r in study.trials if r.trial_number is not None], key=lambda r: r.trial_number)
    starts = [t for t in (parse_utc(r.started_utc) for r in study.records) if t]
    t0 = min(starts) if starts else None
    span = (
        max(
            ((parse_utc(r.finished_utc) or parse_utc(r.started_utc)) - t0).total_seconds()
            for r in study.records
            if (parse_utc(r.finished_utc) or parse_utc(r.started_utc))
        )
        if t0
        else 0
    )
    tdiv, tunit = (3600, "h") if span > 7200 else ((60, "min") if span > 120 else (1, "s"))

    def when(r):
        t = parse_utc(r.finished_utc) or parse_utc(r.started_utc)
        return (t - t0).total_seconds() / tdiv if t and t0 else None

    tg = lambda r: r.metric("tg")[0] if r.ok else None  # noqa: E731
    counted = None
    extras = []
    for ax, x_of, xlabel in (
        (fig.axes[0], lambda r: r.trial_number, "trial number"),
        (fig.axes[1], when, f"wall time since the first trial started ({tunit})"),
    ):
        pts = [(x_of(r), tg(r), r) for r in trials if tg(r) is not None and x_of(r) is not None]
        for m in sorted({model_label(r.config.model) for _, _, r in pts}):
            mp = [(x, y) for x, y, r in pts if model_label(r.config.model) == m]
            ax.scatter(*zip(*mp), color=colours[m], s=20, alpha=0.75, zorder=3, label=m)
        ch.counts["ok"] += len(pts)
        best, bx, by = None, [], []
        for x, y, r in sorted(pts, key=lambda p: p[0]):
            if not r.drift and (best is None or y > best):
                best = y
            if best is not None:
                bx.append(x)
                by.append(best)
        if bx:
            ax.step(
                bx,
                by,
                where="post",
                color="#1f77b4",
                lw=2,
                zorder=4,
                label="best so far (tg)" + (", drift-marked trials excluded" if any(r.drift for r in trials) else ""),
            )
        anchors = [(x_of(r), tg(r)) for r in study.anchors if tg(r) is not None and x_of(r) is not None]
        if anchors:
            ax.scatter(
                *zip(*anchors), marker="D", s=26, color="#777777", zorder=3, label=f"drift anchor ({len(anchors)})"
            )
        drift = [x_of(r) for r in trials if r.drift and x_of(r) is not None]
        if drift:
            ax.axvspan(min(drift), max(drift), color="#f39c12", alpha=0.12, label="marked drift")
        extra: dict = {}
        mark_not_ok(ax, trials, x_of, lambda r: 0.0, ch, extra)
        for label in BASELINES:
            b = next((r for r in trials if r.baseline == label), None)
            col, ls = BASELINE_STYLE[label]
            if b is not None and tg(b) is not None:
                ax.axhline(
                    tg(b), color=col, ls=ls, lw=1.3, label=f"{label} baseline (#{b.trial_number}): {tg(b):.1f} t/s"
                )
                ch.counts["baseline"] += 1
            elif b is not None:
                extra[label] = Line2D(
                    [], [], color=col, ls=ls, label=f"{label} baseline (#{b.trial_number}): {b.outcome}"
                )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tg: generation speed (tokens/s)")
        top = max([y for _, y, _ in pts] + [y for _, y in anchors], default=1.0)
        ax.set_ylim(-0.05 * top, 1.15 * top)
        if ax is fig.axes[0]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not pts:
            note(ax, "no trial succeeded: no best-so-far line\n(failed trials are marked at 0)", ch)
        elif x_of is when and t0 is None:
            note(ax, "no timestamps recorded", ch)
        extras.append(extra)
        counted = counted or Counter(ch.counts)
    ch.counts = counted  # both panels draw the same trials: count them once
    legend(fig, extras)
    fig.suptitle(f"{study.label}: search progress ({len(trials)} trials, objective {study.objective})")
    return ch


def importances(study: Study, target: str) -> tuple[dict[str, float] | None, str]:
    """Optuna's PED-ANOVA importances of the searched parameters for `target`: "tg" (t/s over ok trials) or
    "failed" (1 for a trial that failed or was skipped, 0 for ok, over all trials).

    The parameters and their distributions come from the Optuna storage; without one, from the records
    (every config field that varied, as a categorical)."""
    trials = [r for r in study.trials if r.trial_number is not None and r.outcome != "interrupted"]
    if target == "tg":
        rows = [(r, r.metric("tg")[0]) for r in trials if r.ok and r.metric("tg")[0] is not None]
    else:
        rows = [(r, 0.0 if r.ok else 1.0) for r in trials]
    if len(rows) < 3:
        return None, f"too few trials ({len(rows)}) for parameter importance (needs 3)"
    if len({v for _, v in rows}) < 2:
        return None, (
            "every trial failed"
            if target == "failed" and rows[0][1]
            else "no trial failed"
            if target == "failed"
            else "every ok trial ran at the same speed"
        )
    by_number = {t.number: t for t in (study.optuna_trials or []) if t.params}
    if by_number:
        space = [
            (by_number[r.trial_number].params, by_number[r.trial_number].distributions, v)
            for r, v in rows
            if r.trial_number in by_number
        ]
    else:
        names = [k for k in list(TrialConfig.__dataclass_fields__) if k not in SHAPE_FIELDS]
        vals = {k: sorted({xvalue(r, k) for r, _ in rows}, key=_sort_key) for k in names}
        vary = {k: v for k, v in vals.items() if len(v) > 1}
        space = [
            ({k: xvalue(r, k) for k in vary}, {k: CategoricalDistribution(v) for k, v in vary.items()}, v)
            for r, v in rows
        ]
    if not space or not any(p for p, _, _ in space):
        return None, "no parameter varied"
    keys = set.intersection(*(set(p) for p, _, _ in space))
    frozen = [
        optuna.trial.create_trial(params={k: p[k] for k in keys}, distributions={k: d[k] for k in keys}, value=v)
        for p, d, v in space
    ]
    tmp = optuna.create_study(direction="maximize")
    tmp.add_trials(frozen)
    # PED-ANOVA (Optuna's default evaluator, no scikit-learn needed): what it takes to reach the top quantile.
    # Small studies need a quantile holding a few trials; for "failed" the top quantile is the failing share.
    values = [v for _, _, v in space]
    q = sum(values) / len(values) if target == "failed" else max(0.1, min(0.5, 3 / len(values)))
    try:
        imp = optuna.importance.get_param_importances(
            tmp, evaluator=optuna.importance.PedAnovaImportanceEvaluator(target_quantile=min(max(q, 0.05), 0.95))
        )
    except (ValueError, RuntimeError) as e:
        return None, f"Optuna could not compute importances: {str(e).splitlines()[0][:100]}"
    if not imp:
        return None, "no parameter varied"
    return dict(imp), ""


def chart_importance(study: Study, colours, **options) -> Chart:
    fig = figure(2, height=3.8)
    ch = Chart(
        "7-parameter-importance",
        "Parameter importance",
        "Optuna's importance (PED-ANOVA, its default evaluator) of each searched parameter: for reaching the "
        "top tg t/s (ok trials) and for failing (all trials).",
        fig,
        study=study.label,
    )
    for ax, target, title in (
        (fig.axes[0], "tg", "what drives tg t/s (ok trials)"),
        (fig.axes[1], "failed", "what makes a trial fail (all trials)"),
    ):
        imp, why = importances(study, target)
        ax.set_title(title)
        ax.set_xlabel("importance (Optuna PED-ANOVA, sums to 1)")
        if imp is None:
            ax.set_yticks([])
            note(ax, why, ch)
            continue
        names = sorted(imp, key=imp.get)
        ax.barh(
            [LABELS.get(n, n) for n in names],
            [imp[n] for n in names],
            color="#d62728" if target == "failed" else "#1f77b4",
            alpha=0.8,
        )
        for i, n in enumerate(names):
            ax.text(imp[n], i, f" {imp[n]:.2f}", va="center", fontsize=8)
        ax.set_xlim(0, max(1.0, max(imp.values()) * 1.15))
        ch.counts[f"bars_{target}"] = len(names)
    if study.optuna_trials is None:
        note(fig.axes[0], f"{study.optuna_note}: parameters taken from trials.parquet", ch, "top")
    fig.suptitle(f"{study.label}: parameter importance")
    return ch


def shared_configs(a: Study, b: Study) -> list[dict]:
    """Configs measured ok in both studies, tg pooled over every trial of that config in each: the same config
    across studies has the model as its file name (paths differ between rigs)."""

    def pool(s):
        out = defaultdict(list)
        for r in s.ok:
            out[(model_label(r.config.model),) + r.config.key(("model",))].append(r)
        return out

    pa, pb = pool(a), pool(b)
    rows = []
    for k in sorted(set(pa) & set(pb), key=str):
        ta = [x for r in pa[k] for x in r.tg_samples]
        tb = [x for r in pb[k] for x in r.tg_samples]
        if not ta or not tb:
            continue
        ma, mb = statistics.fmean(ta), statistics.fmean(tb)
        rows.append(
            {
                "key": k,
                "model": k[0],
                "config": _key_text(k, a, b),
                "tg_a": ma,
                "tg_b": mb,
                "ratio": mb / ma if ma else None,
                "trials_a": [r.trial_number for r in pa[k]],
                "trials_b": [r.trial_number for r in pb[k]],
            }
        )
    return rows


def _key_text(k: tuple, *studies: Study) -> str:
    vary = varying_fields([r for s in studies for r in s.trials])
    d = dict(k[1:])
    return f"{k[0]} " + " ".join(f"{f}={d[f]}" for f in vary if f in d and f != "model")


def chart_compare(studies: list[Study], colours) -> Chart:
    fig = figure(2, width=6.2, height=4.4)
    ch = Chart(
        "compare",
        "Comparison",
        "Left: the best tg of each quant file in each study (error bars: sd over the repetitions). Right: "
        "configs measured in both the first study and another, tg against tg (on the diagonal = same "
        "speed).",
        fig,
    )
    ax = fig.axes[0]
    models = sorted({model_label(r.config.model) for s in studies for r in s.trials})
    width = 0.8 / max(1, len(models))
    for j, m in enumerate(models):
        xs, ys, es = [], [], []
        for i, s in enumerate(studies):
            rs = [r for r in s.ok if model_label(r.config.model) == m and r.metric("tg")[0] is not None]
            if rs:
                b = max(rs, key=lambda r: r.metric("tg")[0])
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(b.metric("tg")[0])
                es.append(b.metric("tg")[1] or 0)
        if xs:
            ax.bar(xs, ys, width=width * 0.92, yerr=es, capsize=3, color=colours[m], label=m)
            ch.counts["bars"] += len(xs)
    for i, s in enumerate(studies):
        if not s.ok:
            ax.text(i, 0, "no ok trial", ha="center", va="bottom", rotation=90, fontsize=8, color="#d62728")
    ax.set_xticks(range(len(studies)), [s.label for s in studies], rotation=15)
    ax.set_ylabel("best tg: generation speed (tokens/s)")
    ax.set_xlabel("study")
    ax.grid(axis="x", visible=False)
    ax = fig.axes[1]
    base = studies[0]
    top = 0.0
    markers = {s.label: MODEL_MARKERS[i % len(MODEL_MARKERS)] for i, s in enumerate(studies[1:])}
    for s in studies[1:]:
        rows = shared_configs(base, s)
        for m in sorted({r["model"] for r in rows}):
            mr = [r for r in rows if r["model"] == m]
            ax.scatter(
                [r["tg_a"] for r in mr],
                [r["tg_b"] for r in mr],
                color=colours[m],
                marker=markers[s.label],
                s=30,
                label=f"{s.label}: {m}",
                zorder=3,
            )
            top = max(top, *(max(r["tg_a"], r["tg_b"]) for r in mr))
        ch.counts["shared"] += len(rows)
    if top:
        ax.plot([0, top * 1.05], [0, top * 1.05], color="#888888", ls="--", lw=1, label="same speed")
        ax.set_xlim(0, top * 1.08)
        ax.set_ylim(0, top * 1.08)
    else:
        note(ax, "no config was measured ok in both the first study and another", ch)
    ax.set_xlabel(f"tg in {base.label} (tokens/s)")
    ax.set_ylabel("tg in the other study (tokens/s)")
    legend(fig)
    fig.suptitle(f"comparison of {len(studies)} studies")
    return ch


# ---------------------------------------------------------------------------------------------------------
# the registry: the per-study charts, in report order. A new chart is a function above, added here.
# Each is called as f(study, colours, **options) with the report's options (outcome_map=...): it takes the
# ones it needs as keywords and ignores the rest.
# ---------------------------------------------------------------------------------------------------------
STUDY_CHARTS: tuple[Callable[..., Chart], ...] = (
    chart_speed_vs_varied,
    chart_speed_vs_threads,
    chart_memory,
    chart_pareto,
    chart_outcome_map,
    chart_progress,
    chart_importance,
    chart_confirmation,
    chart_context_ladder,
    chart_quality,
)


def study_charts(study: Study, colours, outcome_map: tuple[str, str] = DEFAULT_MAP) -> list[Chart]:
    return [chart(study, colours, outcome_map=outcome_map) for chart in STUDY_CHARTS]

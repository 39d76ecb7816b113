"""The charts' canvas: a bare matplotlib `Figure` with the report's style, notes, legends, markers and colours,
and the `Chart` every chart function returns (tuner.report.charts, tuner.report.proofs)."""

from __future__ import annotations

import io
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from tuner.record import TrialRecord
from tuner.report.load import (
    Study,
    model_label,
)
from tuner.search.confirm import ROLE_BASELINE, ROLE_FIT, ROLE_RECIPE

OUTCOME_COLOURS = {
    "ok": "#2ca02c",
    "oom": "#d62728",
    "crash": "#9467bd",
    "timeout": "#ff7f0e",
    "swap": "#8c564b",
    "load_error": "#e377c2",
    "error": "#111111",
    "skipped": "#9a9a9a",
    "interrupted": "#bcbd22",
}
MODEL_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
BASELINE_STYLE = {
    ROLE_FIT: ("#c0392b", "-."),
    ROLE_BASELINE: ("#222222", "--"),
    "heuristic": ("#8e44ad", ":"),
    ROLE_RECIPE: ("#16a085", (0, (1, 1))),
}
NO_OFFLOAD = "no GPU offload on this build: n_gpu_layers is 0 in every trial"
LABELS = {
    "n_gpu_layers": "n_gpu_layers (layers on the GPU)",
    "n_ctx": "n_ctx (context size, tokens)",
    "n_threads": "n_threads (generation threads)",
    "n_threads_batch": "n_threads_batch (prompt threads)",
    "n_batch": "n_batch (tokens)",
    "n_ubatch": "n_ubatch (tokens)",
    "flash_attn": "flash_attn",
    "model": "model (quant file)",
}
RC = {
    "svg.fonttype": "none",  # keep text as <text> in SVGs: searchable, small, selectable
    "font.size": 9,
    "axes.titlesize": 10,
    "legend.fontsize": 7.5,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


def quant_colours(studies: list[Study]) -> dict[str, Any]:
    """One colour per quant file, the same in every chart of every study of one report."""
    names = sorted({model_label(r.config.model) for s in studies for r in s.records})
    palette = list(matplotlib.colormaps["tab10"].colors)
    palette = [c for i, c in enumerate(palette) if i not in (3, 7)]  # red and grey mean failed/skipped here
    palette += list(matplotlib.colormaps["Dark2"].colors)
    return {n: palette[i % len(palette)] for i, n in enumerate(names)}


def model_markers(studies: list[Study]) -> dict[str, str]:
    names = sorted({model_label(r.config.model) for s in studies for r in s.records})
    return {n: MODEL_MARKERS[i % len(MODEL_MARKERS)] for i, n in enumerate(names)}


# ---------------------------------------------------------------------------------------------------------
# charts
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Chart:
    key: str  # file stem, e.g. "1-speed-vs-varied"
    title: str
    caption: str
    fig: Figure
    counts: Counter = field(default_factory=Counter)  # markers drawn: ok / failed outcomes / skipped / ...
    notes: list[str] = field(default_factory=list)  # what the chart says instead of data it lacks
    study: str = ""  # study label ("" for the comparison)
    files: dict[str, Path] = field(default_factory=dict)

    def render(self, fmt: str) -> bytes:
        buf = io.BytesIO()
        with matplotlib.rc_context(RC):
            self.fig.savefig(
                buf, format=fmt, dpi=110, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else None
            )
        return buf.getvalue()


def figure(ncols: int, nrows: int = 1, width: float = 5.6, height: float = 4.0) -> Figure:
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
        FigureCanvasAgg(fig)
        fig.subplots(nrows, ncols, squeeze=False)
    return fig


def note(ax, text: str, chart: Chart, where: str = "center") -> None:
    """Say on the chart what is missing, instead of drawing nothing: in the middle of an empty panel, or
    (where="top") as the panel's title line, so it never hides data."""
    if where == "center":
        ax.text(
            0.5,
            0.5,
            text,
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=9,
            wrap=True,
            bbox={"boxstyle": "round", "fc": "#fff6d5", "ec": "#c9a227"},
            zorder=10,
        )
    else:
        old = ax.get_title()
        ax.set_title((old + "\n" if old else "") + text, fontsize=8.5, color="#8a6d00")
    text = " ".join(text.split())
    if text not in chart.notes:
        chart.notes.append(text)


def mark_not_ok(ax, recs: list[TrialRecord], x_of: Callable, y_of: Callable, chart: Chart, handles: dict) -> None:
    """Failed trials as × in their outcome's colour, skipped ones as hollow grey circles: never dropped."""
    by = defaultdict(list)
    for r in recs:
        if not r.ok:
            y = y_of(r)
            if y is not None:
                by[r.outcome].append((x_of(r), y))
    for outcome, pts in sorted(by.items()):
        col = OUTCOME_COLOURS.get(outcome, "#000000")
        if outcome == "skipped":
            ax.scatter(*zip(*pts), s=42, facecolors="none", edgecolors=col, linewidths=1.2, zorder=4)
            h = Line2D([], [], ls="", marker="o", mfc="none", mec=col, label=f"skipped ({len(pts)})")
        else:
            ax.scatter(*zip(*pts), s=48, marker="x", color=col, linewidths=1.8, zorder=5)
            h = Line2D([], [], ls="", marker="x", color=col, mew=1.8, label=f"{outcome} ({len(pts)})")
        handles[outcome] = h
        chart.counts[outcome] += len(pts)


def legend(fig, extras: list[dict] = (), where: str = "below") -> None:
    """One legend for the whole figure, outside the panels (a legend inside hides points); entries with the
    same label in several panels appear once."""
    seen: dict = {}
    for ax in fig.axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    for extra in extras:
        for h in extra.values():
            seen.setdefault(h.get_label(), h)
    if not seen:
        return
    if where == "below":
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=min(3, len(seen)), framealpha=0.9)
    else:
        fig.legend(list(seen.values()), list(seen), loc="outside right upper", framealpha=0.9)


def single_x(ax, values) -> None:
    """One numeric x value: a readable axis around it instead of matplotlib's ±0.05 ticks."""
    vals = {v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if len(vals) == 1:
        v = vals.pop()
        ax.set_xlim(v - 1, v + 1)
        ax.set_xticks([v])

"""`tuner report` as a library: charts, report.html and report.md from what studies wrote.

Reads only a study folder (trials.parquet through tuner.measure.store, the Optuna storage study.db, recommended.json,
logs/); nothing is re-run. The package: load.py reads studies, charts.py draws each chart (a new chart goes
into its STUDY_CHARTS registry), render.py turns the report's blocks into HTML and Markdown; this module
assembles and writes the whole report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tuner import files
from tuner.measure import store
from tuner.record import TrialConfig

# the public names, importable as tuner.report.NAME (loading, charts, rendering live in the submodules)
from tuner.report.canvas import NO_OFFLOAD, Chart, quant_colours
from tuner.report.charts import STUDY_CHARTS, chart_compare, speed_dimensions, study_charts
from tuner.report.load import DEFAULT_MAP, FORMATS, ReportError, Study, load_studies, load_study
from tuner.report.render import compare_blocks, failure_groups, planner_rows, study_blocks, to_html, to_markdown

__all__ = [
    "DEFAULT_MAP",
    "FORMATS",
    "NO_OFFLOAD",
    "STUDY_CHARTS",
    "Chart",
    "Report",
    "ReportError",
    "Study",
    "build",
    "failure_groups",
    "load_study",
    "load_studies",
    "parse_formats",
    "parse_map",
    "planner_rows",
    "quant_colours",
    "speed_dimensions",
    "study_charts",
    "to_html",
    "to_markdown",
]


# ---------------------------------------------------------------------------------------------------------
# the whole report
# ---------------------------------------------------------------------------------------------------------
def parse_formats(text: str) -> tuple[str, ...]:
    fmts = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    if not fmts:
        raise ReportError("--format: give at least one of " + ", ".join(FORMATS))
    bad = [f for f in fmts if f not in FORMATS]
    if bad:
        raise ReportError(f"--format {bad[0]!r}: expected a comma-separated list of {', '.join(FORMATS)}")
    return fmts


def parse_map(text: str) -> tuple[str, str]:
    dims = tuple(d.strip() for d in text.split(",") if d.strip())
    names = set(TrialConfig.__dataclass_fields__)
    if len(dims) != 2 or dims[0] == dims[1]:
        raise ReportError(f"--outcome-map {text!r}: expected two different config parameters, e.g. n_gpu_layers,n_ctx")
    for d in dims:
        if d not in names:
            raise ReportError(
                f"--outcome-map: unknown parameter {d!r} (e.g. n_gpu_layers, n_ctx, n_threads, "
                f"n_ubatch, flash_attn, model)"
            )
    return dims  # type: ignore[return-value]


@dataclass
class Report:
    studies: list[Study]
    charts: list[Chart]
    compare: Chart | None
    formats: tuple[str, ...]
    top: int = 10
    html_path: Path | None = None
    md_path: Path | None = None

    @property
    def title(self) -> str:
        return "tuner report: " + ", ".join(s.label for s in self.studies)

    def blocks(self) -> list:
        out: list = []
        if len(self.studies) > 1:
            out += compare_blocks(self.studies, self.compare)
        for s in self.studies:
            out += study_blocks(s, [c for c in self.charts if c.study == s.label], self.top)
        return out

    def all_charts(self) -> list[Chart]:
        return self.charts + ([self.compare] if self.compare else [])

    def write(self, out: str | os.PathLike) -> list[Path]:
        """Render every chart, then write the files (each one atomically)."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise ReportError(f"--out {out}: is a file, expected a folder")
        rendered = [(c, f, c.render(f)) for c in self.all_charts() for f in self.formats]
        store.writable_folder(out, "report folder")
        written = []
        for c, f, data in rendered:
            p = out / (c.study or "") / f"{c.key}.{f}"
            p.parent.mkdir(parents=True, exist_ok=True)
            files.write_atomic(p, data, chmod=0o644)
            c.files[f] = p
            written.append(p)
        fmt = "png" if "png" in self.formats else self.formats[0]
        blocks = self.blocks()
        self.html_path, self.md_path = out / "report.html", out / "report.md"
        files.write_atomic(self.html_path, to_html(self.title, blocks, fmt), chmod=0o644)
        files.write_atomic(self.md_path, to_markdown(self.title, blocks, fmt, out), chmod=0o644)
        return written + [self.html_path, self.md_path]


def build(
    paths: list[str | os.PathLike],
    formats: tuple[str, ...] = ("png", "svg"),
    outcome_map: tuple[str, str] = DEFAULT_MAP,
    top: int = 10,
) -> Report:
    """Load the studies and draw every chart (nothing is written until Report.write)."""
    studies = load_studies(paths)
    colours = quant_colours(studies)
    charts = [c for s in studies for c in study_charts(s, colours, outcome_map)]
    compare = chart_compare(studies, colours) if len(studies) > 1 else None
    return Report(studies, charts, compare, formats, top)

"""`tuner report`: charts, report.html and report.md from study folders, as a thin Click command."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from tuner import report as reportlib
from tuner.errors import TunerError
from tuner.search import fleet


@click.command("report")
@click.argument("study_dirs", nargs=-1, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--storage",
    default=None,
    help="also report a study of this shared storage (a fleet): one study "
    "per fingerprint group, from any host, no Parquet needed",
)
@click.option("--study", "study_name", default=None, help="with --storage: the study's name")
@click.option(
    "-o",
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="folder for the report  [default: STUDY_DIR/report for one study, ./report for several]",
)
@click.option(
    "--format", "formats", default="png,svg", show_default=True, help="chart formats, comma-separated: png, svg, pdf"
)
@click.option(
    "--outcome-map",
    "outcome_map",
    default=",".join(reportlib.DEFAULT_MAP),
    show_default=True,
    metavar="X,Y",
    help="the two config parameters of the outcome map",
)
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="rows in the top-configs table")
def report_cmd(study_dirs, storage, study_name, out, formats, outcome_map, top):
    """Charts and a report (report.html, report.md) from what `tuner search` wrote; nothing is re-run.

    Reads STUDY_DIR/trials.parquet, study.db (Optuna) and recommended.json. With several study folders
    (e.g. the same model on two rigs, or before/after a driver update) the report starts with a comparison.
    report.html is self-contained (charts embedded); report.md suits a CI job summary or a PR comment.

    \b
    Examples:
      tuner report results/my-study
      tuner report results/rig-a/my-study results/rig-b/my-study --out cmp --format svg
      tuner report --storage postgresql://tuner:PW@db-host/tuner --study my-study --out fleet-report
    """
    with tempfile.TemporaryDirectory(prefix="tuner-snapshot-") as tmp:
        if storage or study_name:
            study_dirs = (*study_dirs, *map(str, fleet.snapshot_for_cli(storage, study_name, tmp, nest=True)))
            out = out or "report"
        if not study_dirs:
            raise TunerError("no study: pass STUDY_DIR(s), or --storage URL --study NAME")
        _report(study_dirs, out, formats, outcome_map, top)


def _report(study_dirs, out, formats, outcome_map, top):
    fmts = reportlib.parse_formats(formats)
    dims = reportlib.parse_map(outcome_map)
    out = Path(out) if out else (Path(study_dirs[0]) / "report" if len(study_dirs) == 1 else Path("report"))
    if out.exists() and not out.is_dir():
        raise reportlib.ReportError(f"--out {out}: is a file, expected a folder")
    rep = reportlib.build(list(study_dirs), fmts, dims, top)
    rep.write(out)
    n = len(rep.all_charts())
    click.echo(f"{n} charts ({', '.join(fmts)}) in {out}/")
    click.echo(f"  {rep.html_path}")
    click.echo(f"  {rep.md_path}")
    for s in rep.studies:
        rec = s.recommended
        click.echo(
            f"  {s.label}: {len(s.ok)}/{len(s.trials)} trials ok; "
            + (f"recommended trial #{rec['trial_number']}" if rec else "no recommendation")
        )

"""`tuner compare`: the CI regression gate as a thin Click command over tuner.report.compare."""

from __future__ import annotations

import os
from pathlib import Path

import click

from tuner import files
from tuner.cli.options import run_params
from tuner.errors import TunerError
from tuner.report import compare as cmp

FAIL_ON = ("regression", "inconclusive", "missing")


def _check_out(path: str | None, what: str) -> None:
    """Fail before any work (or any rerun) when a report file cannot be written."""
    if not path:
        return
    parent = Path(path).parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise TunerError(f"cannot write {what} {path}: folder {parent} does not exist or is not writable")
    if Path(path).is_dir():
        raise TunerError(f"cannot write {what} {path}: it is a folder")


def _fail_on(value: tuple[str, ...]) -> tuple[str, ...]:
    names = [n.strip() for v in value for n in v.split(",") if n.strip()] or ["regression"]
    bad = [n for n in names if n not in FAIL_ON]
    if bad:
        raise TunerError(f"--fail-on {bad[0]!r}: expected one of {', '.join(FAIL_ON)}")
    return tuple(dict.fromkeys(names))


@click.command("compare")
@click.argument("baseline", type=click.Path(dir_okay=True))
@click.argument("current", type=click.Path(dir_okay=True))
@click.option(
    "--ignore",
    "ignore",
    multiple=True,
    metavar="PARAM",
    help="pair configs that differ only in PARAM (repeatable or comma-separated), e.g. flash_attn",
)
@click.option(
    "--threshold",
    "thresholds",
    multiple=True,
    metavar="METRIC=PCT",
    help="practical threshold in percent per metric (tg, pp, ttft, peak_ram, peak_vram) or group "
    "(speed, memory); defaults speed=5, memory=10",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.01,
    show_default=True,
    help="significance level of the statistical test",
)
@click.option(
    "--max-cv",
    type=click.FloatRange(0, min_open=True),
    default=20.0,
    show_default=True,
    help="percent: a side whose trials vary more than this (robust CV = 1.4826·MAD/median of the "
    "trial values) is inconclusive",
)
@click.option(
    "--min-samples",
    type=click.IntRange(2),
    default=3,
    show_default=True,
    help="fewer trials a side is inconclusive (memory: threshold only)",
)
@click.option(
    "--allow-hw-mismatch",
    is_flag=True,
    help="compare even when the hardware fingerprints differ (flagged in every output)",
)
@click.option(
    "--max-kld-increase",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="percent: the quality gate, when both sides' records carry their model file's KLD (tuner "
    "search measured it): mean KLD up by more than this, and beyond 2 standard errors, regresses",
)
@click.option(
    "--fail-on",
    "fail_on",
    multiple=True,
    metavar="VERDICTS",
    show_default=True,
    help="verdicts that fail the gate (exit 1): regression [default], inconclusive, missing",
)
@click.option(
    "--rerun-on-alert",
    is_flag=True,
    help="re-measure each CURRENT config with a regression as many times as CURRENT measured it "
    "(appended to CURRENT) and fail only when the rerun confirms it",
)
@run_params()
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON instead of a table")
@click.option("--markdown", "markdown_out", type=click.Path(dir_okay=False), help="also write a markdown report")
@click.option("--junit", "junit_out", type=click.Path(dir_okay=False), help="also write JUnit XML for CI")
def compare(
    baseline,
    current,
    ignore,
    thresholds,
    alpha,
    max_cv,
    min_samples,
    allow_hw_mismatch,
    max_kld_increase,
    fail_on,
    rerun_on_alert,
    as_json,
    markdown_out,
    junit_out,
    **run_opts,
):
    """CI regression gate: compare CURRENT against BASELINE (Parquet files or study folders).

    Trials are paired by config (model content hash, every llama.cpp parameter and the test shape; not the
    repetition count). The unit is the trial: a speed's value per trial is the median of its repetitions, peak
    RAM and VRAM one value per trial. A REGRESSION needs both a change beyond the threshold (5 % speeds, 10 %
    memory) and a significant test at alpha 0.01: Wilcoxon signed-rank on the per-round ratios when the sides
    were measured round by round interleaved, else Mann-Whitney U on the trial values. Too noisy or too few
    trials is inconclusive; a config or metric on one side only is missing. Peak memory with fewer trials a
    side than the test needs is judged on the threshold alone. Differing hardware is an error unless
    --allow-hw-mismatch. A config that measured in BASELINE and failed (OOM, crash) in CURRENT is a regression.
    Quality: when both sides' records carry the model file's mean KLD (from `tuner search`), a KLD up by more
    than --max-kld-increase and beyond noise is a regression too (e.g. a new build's quant kernels).

    Exit status: 0 no confirmed regression, 1 regression, 2 bad input. The markdown report is appended to
    $GITHUB_STEP_SUMMARY when that is set.

    Measure baseline and candidate interleaved, many short trials each (`make perf-check`: 28 rounds of -r 3,
    the side measured first alternating A B B A).
    --rerun-on-alert measures every alerting CURRENT config again on this machine, as many trials as CURRENT
    has of it (same config, same repetitions, appended to CURRENT's Parquet), and judges it again on the fresh
    trials alone; the regression stands only if the rerun shows it too. That cuts false alarms but also power:
    a real 10 % slowdown has to be caught twice (benchmarks/README.md, gate_power.py).

    \b
    Examples:
      tuner compare results/base.parquet results/cand.parquet --junit junit.xml
      tuner compare results/base.parquet results/cand.parquet --rerun-on-alert
      tuner compare results/study-a results/study-b --ignore flash_attn --threshold tg=3 --json
    """
    settings = cmp.Settings(
        thresholds=cmp.parse_thresholds(thresholds),
        alpha=alpha,
        max_cv=max_cv / 100.0,
        min_samples=min_samples,
        ignore=cmp.parse_ignore(ignore),
        allow_hw_mismatch=allow_hw_mismatch,
        max_kld_increase=max_kld_increase / 100.0,
    )
    fail_on = _fail_on(fail_on)
    _check_out(markdown_out, "the markdown report")
    _check_out(junit_out, "the JUnit report")
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    _check_out(summary_file, "$GITHUB_STEP_SUMMARY")
    report = cmp.compare(baseline, current, settings)
    if rerun_on_alert and report.regressions():
        # run_params' names (timeout, mem_limit, no_wait) are shared with bench and search
        cmp.rerun_on_this_machine(
            report,
            current,
            run_opts.get("timeout", run_opts.get("trial_timeout", 600.0)),
            run_opts.get("mem_limit"),
            run_opts.get("no_wait", False),
            log=lambda line: click.echo(line, err=True),
            lock_file=run_opts.get("lock_file"),
        )

    click.echo(report.to_json(fail_on) if as_json else report.table(fail_on))
    md = report.markdown(fail_on)
    if markdown_out:
        files.write_atomic(markdown_out, md)
    if junit_out:
        files.write_atomic(junit_out, report.junit(fail_on))
    if summary_file:
        # GitHub owns this file and appends every step's summary to the run page: add, never replace
        with open(summary_file, "a") as f:
            f.write(md + "\n")
    return report.exit_code(fail_on)

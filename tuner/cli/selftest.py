"""`tuner selftest`: real fault injection into real workers (library: tuner.measure.selftest)."""

from __future__ import annotations

import time

import click

from tuner.measure.lock import measurement_lock
from tuner.measure.selftest import DEFAULT_TIMEOUT, Case, parent_kill, run, table
from tuner.record import TrialRecord


@click.command("selftest")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="seconds before a trial counts as hung (the two hang cases take this long each)",
)
@click.option("--no-wait", is_flag=True, help="fail instead of waiting when another measurement runs")
def selftest_cmd(timeout, no_wait):
    """Inject real faults into real trial workers and check that each is recorded right.

    Makes a tiny synthetic model in a temporary folder, then runs a clean trial and trials whose worker is
    killed by SIGKILL, segfaults, aborts, exits without a result, hangs while loading, hangs while decoding,
    and fails to allocate memory; then kills a running `tuner search` itself (SIGKILL, mid-trial) and checks
    that re-running the same command resumes it with no completed trial lost. Prints expected vs recorded outcome and
    cause; exits 0 only if all match
    (1 otherwise). Takes about 2 x --timeout plus a few seconds.

    Example: tuner selftest --timeout 20
    """

    def progress(case: Case, rec: TrialRecord) -> None:
        click.echo(f"  {case.name}: {rec.outcome} ({rec.wall_s:.1f} s)", err=True)

    t0 = time.monotonic()
    with measurement_lock(wait=not no_wait, what="tuner selftest"):
        results = run(timeout, progress=progress)
        resumed, detail = parent_kill()
    click.echo(table(results))
    click.echo(f"parent killed mid-trial, same command re-run: {'resumed' if resumed else 'FAILED'} ({detail})")
    bad = [r for r in results if not r.ok]
    if not resumed:
        click.echo("selftest FAILED: the search did not resume cleanly after a SIGKILL", err=True)
        return 1
    if bad:
        click.echo(
            f"selftest FAILED: {len(bad)} of {len(results)} cases recorded wrong "
            f"({', '.join(r.case.name for r in bad)})",
            err=True,
        )
        for r in bad:
            if r.record.stderr_tail:
                click.echo(f"--- {r.case.name}: worker stderr (tail) ---\n{r.record.stderr_tail}", err=True)
        return 1
    click.echo(
        f"selftest passed: {len(results)} of {len(results)} cases recorded as expected "
        f"in {time.monotonic() - t0:.0f} s",
        err=True,
    )
    return 0

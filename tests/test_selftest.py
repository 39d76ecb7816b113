"""`tuner selftest`: real faults in real workers, expected vs recorded, exit 0 only when all match."""

from __future__ import annotations

import re

from click.testing import CliRunner

from tuner.cli import cli
from tuner.measure import selftest


def parse_table(text: str) -> list[dict[str, str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("| ").split(" | ")]
    return [dict(zip(head, (c.strip() for c in ln.strip("| ").split(" | ")))) for ln in lines[2:]]


def test_selftest_command_all_cases_match():
    # 5 s: long enough for a worker on busy CPUs to reach the load stage before the hang counts
    res = CliRunner().invoke(cli, ["selftest", "--timeout", "5"])
    assert res.exit_code == 0, res.output
    rows = parse_table(res.stdout)
    assert [r["case"] for r in rows] == [c.name for c in selftest.CASES]
    assert [r["recorded"] for r in rows] == ["ok", "crash", "crash", "crash", "error", "timeout", "timeout", "oom"]
    assert {r["match"] for r in rows} == {"yes"}
    causes = {r["case"]: r["cause"] for r in rows}
    assert causes["SIGKILL"] == "killed by SIGKILL" and causes["segfault"] == "killed by SIGSEGV"
    assert causes["hang while loading"] == "the model load took over 5 s (--load-timeout)"
    assert re.search(r"insufficient memory|failed to allocate", causes["allocation failure"])
    assert re.search(r"selftest passed: 8 of 8 cases recorded as expected in \d+ s", res.stderr)
    assert re.search(
        r"parent killed mid-trial, same command re-run: resumed \(\d+ trial\(s\) done at the "
        r"kill, 0 lost, 1 recorded interrupted \(the running trial #\d+: yes\), 0 left running, "
        r"Optuna and Parquet agree\)",
        res.stdout,
    )


def test_selftest_library_reports_a_mismatch(monkeypatch):
    wrong = selftest.Case("segfault, expected ok on purpose", "segv", "ok", r"^$", "(none)")
    results = selftest.run(timeout=30, cases=(selftest.CASES[0], wrong))
    assert [r.record.outcome for r in results] == ["ok", "crash"]
    assert [r.ok for r in results] == [True, False]
    assert results[1].record.signal == 11 and results[1].record.cause == "killed by SIGSEGV"
    # and the command turns any mismatch into exit 1 with the failing case named
    monkeypatch.setattr(selftest, "CASES", (wrong,))
    res = CliRunner().invoke(cli, ["selftest", "--timeout", "30"])
    assert res.exit_code == 1, res.output
    assert parse_table(res.stdout)[0]["match"] == "NO"
    assert "selftest FAILED: 1 of 1 cases recorded wrong (segfault, expected ok on purpose)" in res.stderr


def test_selftest_bad_timeout_is_one_line_error():
    res = CliRunner().invoke(cli, ["selftest", "--timeout", "0"])
    assert res.exit_code == 2
    assert res.stderr.startswith("tuner: error: Invalid value for '--timeout'") and res.stderr.count("\n") == 1
    assert res.stdout == ""


def test_selftest_help_has_an_example():
    res = CliRunner().invoke(cli, ["selftest", "--help"])
    assert res.exit_code == 0 and "Example: tuner selftest --timeout 20" in res.output

"""`tuner selftest`: real fault injection on this rig, to trust the runner before an overnight search.

A tiny synthetic model is made in a temporary folder; then real worker processes are made to die the ways
trials die on real rigs (SIGKILL, SIGSEGV, abort, a hang while loading and while decoding, an allocation
failure) next to one clean trial. Each recorded outcome and cause is compared with what it must be.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna

from tuner.errors import TunerError
from tuner.measure import store
from tuner.measure.runner import Runner, resolve
from tuner.record import TrialConfig, TrialRecord
from tuner.tables import markdown_table

DEFAULT_TIMEOUT = 10.0


class SelftestError(TunerError):
    """The self-test could not start (its test model could not be made): not bad input, exit 1."""

    exit_code = 1


@dataclass(frozen=True)
class Case:
    name: str
    fault: str | None  # the worker's job["fault"]
    outcome: str  # the outcome the record must have
    cause: str  # regex the record's cause must match
    expect: str  # the cause as a person reads it, for the table


CASES: tuple[Case, ...] = (
    Case("clean trial", None, "ok", r"^$", "(none)"),
    Case("SIGKILL", "sigkill", "crash", r"^killed by SIGKILL", "killed by SIGKILL"),
    Case("segfault", "segv", "crash", r"^killed by SIGSEGV", "killed by SIGSEGV"),
    Case("abort()", "abort", "crash", r"^killed by SIGABRT", "killed by SIGABRT"),
    Case("exit, no result", "exit", "error", r"^worker exited with code 3 and no result", "exited with code 3"),
    Case(
        "hang while loading",
        "hang_load",
        "timeout",
        r"^the model load took over .* s \(--load-timeout\)",
        "the model load took over ... s",
    ),
    Case(
        "hang while decoding",
        "hang_decode",
        "timeout",
        r"^no result after .* \(stage (warmup|pp|tg)\)",
        "no result ... (stage warmup)",
    ),
    Case(
        "allocation failure",
        "alloc_fail",
        "oom",
        r"(?i)(alloc|out of memory|insufficient memory)",
        "llama.cpp allocation line",
    ),
)


@dataclass
class Result:
    case: Case
    record: TrialRecord

    @property
    def ok(self) -> bool:
        return self.record.outcome == self.case.outcome and re.search(self.case.cause, self.record.cause) is not None


def make_model(folder: Path) -> Path:
    """The tiny model, quantized by llama.cpp in a child process: the parent stays free of llama.cpp (and
    CUDA), and the quantizer's log stays out of the terminal unless it fails."""
    code = "import sys; from tuner.model.synth import synthesize; synthesize(sys.argv[1], 'tiny', ('q8_0',))"
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    model = folder / "tiny-q8_0.gguf"
    if proc.returncode != 0 or not model.is_file():
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise SelftestError(f"could not make the test model: {lines[-1] if lines else proc.returncode}")
    return model


def run(
    timeout: float = DEFAULT_TIMEOUT,
    cases: tuple[Case, ...] | None = None,
    workdir: str | None = None,
    progress: Callable[[Case, TrialRecord], None] | None = None,
) -> list[Result]:
    """Run every case in real worker processes on a fresh tiny model; one Result per case, in order."""
    cases = CASES if cases is None else cases
    with tempfile.TemporaryDirectory(prefix="tuner-selftest-", dir=workdir) as tmp:
        model = make_model(Path(tmp))
        # A small shape on one thread: the point is how trials end, not how fast they run, and one thread
        # keeps the clean trial well inside --timeout even on a busy machine.
        cfg = resolve(TrialConfig(model=str(model), n_prompt=32, n_gen=8, repetitions=2, n_threads=1))
        out = []
        with Runner(timeout=timeout, load_timeout=timeout) as runner:
            for case in cases:
                rec = runner.run(cfg, fault=case.fault)
                if progress:
                    progress(case, rec)
                out.append(Result(case, rec))
    return out


def running_trials(db: str | Path) -> set[int]:
    """Numbers of the trials a study's SQLite storage holds as RUNNING (read while the search writes: WAL)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return {n for (n,) in con.execute("SELECT number FROM trials WHERE state = 'RUNNING'")}
        finally:
            con.close()
    except sqlite3.Error:  # not created yet
        return set()


def trial_numbers(parquet: str | Path) -> set[int]:
    """Trial numbers that have their row in a study's Parquet file."""
    try:
        return {int(n) for n in store.read(parquet)["trial_number"].dropna()}
    except (store.StoreError, KeyError):
        return set()


def wait_mid_trial(db: Path, parquet: Path, proc: subprocess.Popen, after: int, deadline: float) -> int | None:
    """Wait until `proc` (a tuner search) is inside a trial, after `after` trials have their row: Optuna holds a
    trial RUNNING that has no Parquet row yet (between ask and the row's write, the worker measures). Returns
    that trial's number, or None if the search ended or the deadline passed first."""
    while time.monotonic() < deadline and proc.poll() is None:
        done = trial_numbers(parquet)
        running = running_trials(db) - done
        if len(done) >= after and running:
            return min(running)
        time.sleep(0.02)
    return None


def parent_kill(workdir: str | None = None, deadline_s: float = 120.0) -> tuple[bool, str]:
    """SIGKILL a running `tuner search` in the middle of a trial, re-run the same command, check the resume.

    Passes when every trial completed before the kill is still there, unchanged, the trial that was running is
    recorded once as `interrupted`, the study has no trial left RUNNING, and Optuna and the Parquet file agree
    trial by trial.
    """
    with tempfile.TemporaryDirectory(prefix="tuner-selftest-", dir=workdir) as tmp:
        model = make_model(Path(tmp))
        results = Path(tmp) / "results"
        cmd = [
            sys.executable,
            "-c",
            "from tuner.cli import cli; cli()",
            "search",
            "-m",
            str(model),
            "-t",
            "1",
            "-ub",
            "64,128,256,512",
            "-p",
            "256",
            "-n",
            "1024",
            "-r",
            "3",
            "--n-trials",
            "4",
            "--drift-every",
            "0",
            "--no-auto-space",
            "--no-confirm",
            "--results",
            str(results),
            "--study",
            "selftest",
        ]
        # the selftest holds the rig's lock; its own search must not wait for it
        env = dict(os.environ, TUNER_LOCK_FILE=str(Path(tmp) / "lock"))
        parquet = results / "selftest" / store.TRIALS_FILE

        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        db = results / "selftest" / "study.db"
        target = wait_mid_trial(db, parquet, proc, 1, time.monotonic() + deadline_s)
        if target is None:
            proc.kill()
            proc.wait()
            return False, f"the search was never caught mid-trial (exit {proc.returncode})"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = store.read(parquet)
        if target in set(before["trial_number"]):
            return False, f"trial {target} finished before the kill landed: not a mid-trial kill"
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=deadline_s)
        if again.returncode != 0:
            lines = again.stderr.strip().splitlines()
            return False, f"the re-run failed (exit {again.returncode}): {lines[-1] if lines else ''}"
        after = store.read(parquet)
        lost = [int(n) for n in before["trial_number"] if n not in set(after["trial_number"])]
        study = optuna.load_study(study_name="selftest", storage=f"sqlite:///{results / 'selftest' / 'study.db'}")
        running = [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
        # queued trials (a block of the loaded model's configs, see Search.after_load) have not run yet
        agree = sorted(
            t.number
            for t in study.trials
            if "duplicate_of" not in t.user_attrs and t.state != optuna.trial.TrialState.WAITING
        ) == sorted(int(n) for n in after["trial_number"])
        interrupted = [int(n) for n in after.loc[after["outcome"] == "interrupted", "trial_number"]]
        ok = (
            not lost
            and not running
            and agree
            and interrupted == [target]
            and int((after["outcome"] == "ok").sum()) == 4
        )
        return ok, (
            f"{len(before)} trial(s) done at the kill, {len(lost)} lost, {len(interrupted)} recorded "
            f"interrupted (the running trial #{target}: {'yes' if interrupted == [target] else 'NO'}), "
            f"{len(running)} left running, Optuna and Parquet {'agree' if agree else 'DISAGREE'}"
        )


def table(results: list[Result]) -> str:
    head = ["case", "expected", "recorded", "cause", "match"]
    rows = [
        [
            r.case.name,
            f"{r.case.outcome}: {r.case.expect}",
            r.record.outcome,
            (r.record.cause or "(none)")[:80],
            "yes" if r.ok else "NO",
        ]
        for r in results
    ]
    return markdown_table(head, rows)

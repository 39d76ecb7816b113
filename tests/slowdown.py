"""A known slowdown, injected: a test that must see a slower machine takes a known share of a CPU itself.

`pinned()` pins this thread to one CPU; every process it starts inherits that, so the trial workers of a `tuner
bench` or a search started inside it run there. `Hogs(cpu, n)` starts n processes (HOGS unless told) pinned to that
same CPU and busy all the time, each in a session of its own. The worker has its own session too
(tuner.measure.runner), and the kernel shares a CPU alike between the sessions (autogroups) that want it, so while
the hogs run a worker gets at most 1/(n + 1) of its CPU (a quarter for three: a slowdown of about 4x, measured), and
other work on the machine can only take more. The other CPUs are left to the rest of the machine.

benchmarks/gate_power.py injects a small slowdown (a duty of 10 %) with hogs that keep to their duty and, once
descheduled, sleep to their next slot; on a CPU they share with the worker they would take less than their duty.
The hogs here take all the scheduler gives them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

HOGS = 3
HOG = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


@contextmanager
def pinned():
    """This thread on one CPU (the last it may use) until the block ends; yields the CPU. Processes started
    inside the block stay there after it."""
    before = os.sched_getaffinity(0)
    cpu = max(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


class Hogs:
    """`n` processes busy on `cpu` from the block's start to its end."""

    def __init__(self, cpu: int, n: int = HOGS):
        self.cpu, self.n = cpu, n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self):
        # each in its own session: a scheduling group of its own, as the worker has
        self.procs = [
            subprocess.Popen([sys.executable, "-c", HOG, str(self.cpu)], start_new_session=True) for _ in range(self.n)
        ]
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs = []

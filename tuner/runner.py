"""The runner: the parent side of a trial. Whatever the worker does, the runner survives and returns a record.

Each worker is a fresh interpreter (`python -m tuner.worker`, never a fork of a process that may hold CUDA)
in its own session, so a kill reaches all of it and a Ctrl-C in the terminal reaches only the parent.
With `reuse=True` a worker that finished a trial cleanly stays up for the next trial with the same load
parameters (same model file, n_gpu_layers, overrides, mmap): the load is paid once, as llama-bench does,
while every trial still runs outside the parent. After any failure the worker is gone and the next trial
gets a fresh one.
"""

from __future__ import annotations

import collections
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tuner import hardware
from tuner.bench import fmt_size
from tuner.ggufmeta import read_model
from tuner.memlimit import MemLimit
from tuner.record import TrialConfig, TrialRecord, oom_line, utcnow

DEFAULT_TIMEOUT = 600.0
DEFAULT_SWAP_RATE = 64 << 20  # bytes/s swapped in, sustained over SWAP_WINDOW: the machine is thrashing
SWAP_WINDOW = 3.0
SAMPLES = ("pp_samples", "tg_samples", "ttft_samples_ms")
REFAULT_FLOOR = 64 << 20  # file pages re-read under --mem-limit before a small model's trial counts as not fitting


def new_record(cfg: TrialConfig, hw: hardware.Hardware, build: dict, info=None) -> TrialRecord:
    """A trial record with the facts every row carries: hardware, build, model (read once, cached)."""
    rec = TrialRecord(config=cfg, started_utc=utcnow(), hw=hw.to_dict(), build=dict(build),
                      hw_fingerprint=hw.fingerprint(), build_fingerprint=hardware.build_fingerprint(build))
    rec.__dict__.update((info or read_model(cfg.model)).facts())
    return rec


class SwapWatch:
    """The swap-in rate over the last SWAP_WINDOW seconds, from the kernel's cumulative swap-in counter.

    A trial that swaps in faster than `limit` bytes/s for a whole window is thrashing: it would run at a
    fraction of a token per second and make the machine unresponsive (the seed's 0.01 t/s trap).
    """

    def __init__(self, limit: float, window: float = SWAP_WINDOW):
        self.limit, self.window = limit, window
        self.samples: collections.deque = collections.deque()

    def thrashing(self, now: float, swapped_in: int) -> float | None:
        """Add a sample; the rate in bytes/s when it is over the limit for a full window, else None."""
        self.samples.append((now, swapped_in))
        while now - self.samples[0][0] > self.window:
            self.samples.popleft()
        span = now - self.samples[0][0]
        if span < self.window * 0.8:
            return None
        rate = (swapped_in - self.samples[0][1]) / span
        return rate if rate > self.limit else None


class TrialInterrupted(Exception):
    """Ctrl-C during a trial: the worker was stopped; `record` is the interrupted trial."""

    def __init__(self, record: TrialRecord):
        super().__init__("interrupted")
        self.record = record


@dataclass
class _Worker:
    proc: subprocess.Popen
    rfd: int
    log_path: Path
    load_key: tuple | None = None
    used: bool = False
    buf: bytes = b""
    events: collections.deque = field(default_factory=collections.deque)

    @property
    def pid(self) -> int:
        return self.proc.pid


def vmstat(key: str) -> int:
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
    except OSError:
        pass
    return 0


def vm_hwm(pid: int) -> int | None:
    """A live process's RSS high-water mark (VmHWM) in bytes, from the kernel; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def tail(text: str, lines: int = 40, chars: int = 4000) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])[-chars:]


def classify(result: dict | None, returncode: int | None, stderr: str, oom_killed: bool,
             killed_for: str | None) -> tuple[str, str]:
    """Outcome and one-line cause for a trial without a clean result."""
    if killed_for:
        return killed_for.split(":", 1)[0], killed_for.split(":", 1)[1].strip()
    if result is not None:
        return result["outcome"], result.get("cause", "")
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    oom = oom_line(stderr)
    last = lines[-1][:300] if lines else ""
    if returncode is not None and returncode < 0:
        sig = -returncode
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        if sig == signal.SIGKILL and oom_killed:
            return "oom", "killed by the kernel OOM killer (SIGKILL, oom_kill counter rose)"
        if oom:
            return "oom", f"{name} after: {oom}"
        return "crash", f"killed by {name}" + (f": {last}" if last else "")
    if oom:
        return "oom", oom
    return "error", f"worker exited with code {returncode} and no result" + (f": {last}" if last else "")


class Runner:
    """Runs trials in worker processes and returns one TrialRecord per trial."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, mem_limit: int | None = None, reuse: bool = False,
                 nvml: hardware.Nvml | None = None, swap_rate_limit: int = DEFAULT_SWAP_RATE,
                 poll_interval: float = 0.5, hw: hardware.Hardware | None = None, build: dict | None = None):
        self.timeout = timeout
        self.mem_limit = mem_limit
        # RLIMIT_DATA (set by the worker from the job) plus a memory cgroup where the machine allows one
        self.limit = MemLimit(mem_limit) if mem_limit else None
        self.reuse = reuse
        self.nvml = nvml if nvml is not None else hardware.Nvml()
        self.swap_rate_limit = swap_rate_limit
        # Each wake-up of the parent can preempt a llama.cpp thread spinning at a barrier (all cores busy);
        # results arrive without waiting for it (select), so sampling twice a second costs nothing in latency.
        self.poll_interval = poll_interval
        self.hw = hw or hardware.probe(self.nvml)
        self.build = build or hardware.build_info()
        self._tmp = tempfile.TemporaryDirectory(prefix="tuner-logs-")
        self.last_log = ""  # full stderr of the last trial (the study keeps it for failed trials)
        # A worker is started ahead of need: its interpreter and llama.cpp import overlap the parent's work
        # (opening the study, writing results) instead of adding to every trial's wall time.
        self._worker: _Worker | None = self._spawn()

    # -- worker lifecycle --------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        rfd, wfd = os.pipe()
        log_path = Path(self._tmp.name) / f"worker-{time.monotonic_ns()}.log"
        # GGML_NO_BACKTRACE: on abort ggml would attach gdb for a backtrace; that is slow and floods the log
        env = dict(os.environ, PYTHONUNBUFFERED="1", GGML_NO_BACKTRACE="1")
        with open(log_path, "wb") as log:
            argv = [sys.executable, "-m", "tuner.worker", str(wfd)]
            if self.limit:
                argv = self.limit.command(argv)
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=log, pass_fds=(wfd,),
                                    start_new_session=True, env=env)
        os.close(wfd)
        return _Worker(proc, rfd, log_path)

    def _reap(self, w: _Worker, kill: bool) -> tuple[int | None, int | None]:
        """Stop a worker; returns (returncode, ru_maxrss in bytes) from the kernel's own accounting."""
        if self._worker is w:
            self._worker = None
        try:
            if w.proc.stdin and not w.proc.stdin.closed:
                w.proc.stdin.close()
        except OSError:
            pass
        if kill:
            try:
                os.killpg(w.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (0 if kill else 30)
        rusage = None
        try:
            while w.proc.returncode is None:  # poll() may have reaped it already (a worker that died idle)
                try:
                    pid, status, rusage = os.wait4(w.pid, os.WNOHANG if time.monotonic() < deadline else 0)
                except ChildProcessError:
                    w.proc.poll()
                    break
                if pid:
                    w.proc.returncode = os.waitstatus_to_exitcode(status)
                    break
                time.sleep(0.01)
                if time.monotonic() >= deadline and not kill:
                    os.killpg(w.pid, signal.SIGKILL)
                    kill = True
        finally:
            os.close(w.rfd)
        return w.proc.returncode, rusage.ru_maxrss * 1024 if rusage else None

    def close(self) -> None:
        if self._worker:
            self._reap(self._worker, kill=not self._worker.used)  # an idle spare has nothing to finish
        if self.limit:
            self.limit.close()
        self._tmp.cleanup()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one trial ---------------------------------------------------------------------------------
    def run(self, cfg: TrialConfig, fault: str | None = None) -> TrialRecord:
        rec = new_record(cfg, self.hw, self.build)
        w = self._worker
        usable = w is not None and w.proc.poll() is None and (
            not w.used or (self.reuse and w.load_key == cfg.load_key()))
        if not usable:
            if w is not None:
                self._reap(w, kill=not w.used)
            w = self._worker = self._spawn()
        w.used = True
        log_offset = w.log_path.stat().st_size
        t0 = time.monotonic()
        job = {"config": cfg.to_dict(), "fault": fault, "mem_limit": self.mem_limit}
        sin0, oom0 = psutil.swap_memory().sin, vmstat("oom_kill")
        if self.limit:
            self.limit.evict(cfg.model)
            refault0, cg_oom0 = self.limit.refaulted_bytes(), self.limit.oom_kills()
            rec.mem_limit_bytes, rec.mem_limit_by = self.mem_limit, self.limit.mechanism
        result, killed_for, stage, eof = None, None, "start", False
        swap = SwapWatch(self.swap_rate_limit) if self.swap_rate_limit else None
        vram_peak: list[int] = []
        hwm = None  # the worker's VmHWM, sampled while it lives: the peak of a worker that dies without a result
        interrupted = False
        try:
            try:
                w.proc.stdin.write((json.dumps(job) + "\n").encode())
                w.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                eof = True
            while result is None and not eof:
                ready, _, _ = select.select([w.rfd], [], [], self.poll_interval)
                if ready:
                    data = os.read(w.rfd, 1 << 16)
                    if not data:
                        eof = True
                    w.buf += data
                    while b"\n" in w.buf:
                        line, w.buf = w.buf.split(b"\n", 1)
                        ev = json.loads(line)
                        if ev["event"] == "stage":
                            stage = ev["stage"]
                            hwm = max(hwm or 0, ev.get("hwm") or 0) or None
                        elif ev["event"] == "result":
                            result = ev
                now = time.monotonic()
                hwm = max(hwm or 0, vm_hwm(w.pid) or 0) or None
                vram = self.nvml.process_vram({w.pid})
                vram_peak = [max(a, b) for a, b in zip(vram_peak, vram)] if vram_peak else vram
                rate = swap.thrashing(now, psutil.swap_memory().sin) if swap else None
                if rate is not None:
                    killed_for = (f"swap: stopped while thrashing swap ({rate / 2**20:.0f} MiB/s swapped in, "
                                  f"stage {stage})")
                    break
                if result is None and now - t0 > self.timeout:
                    killed_for = f"timeout: no result after {self.timeout:g} s (stage {stage})"
                    break
                killed_for = self._thrashing_weights(cfg, refault0, stage) if self.limit else None
                if killed_for:
                    break
        except KeyboardInterrupt:
            interrupted = True
            killed_for = f"interrupted: stopped by Ctrl-C (stage {stage})"
        if self.limit and not killed_for:  # a result that came between two polls
            killed_for = self._thrashing_weights(cfg, refault0, stage)
        rec.wall_s = time.monotonic() - t0
        rec.swap_in_bytes = max(0, psutil.swap_memory().sin - sin0)
        keep = result is not None and result["outcome"] == "ok" and self.reuse and killed_for is None
        returncode = maxrss = None
        if not keep:
            returncode, maxrss = self._reap(w, kill=killed_for is not None or result is None)
            if not interrupted:
                self._worker = self._spawn()  # the spare for the next trial
        else:
            w.load_key = cfg.load_key()
        with open(w.log_path, "rb") as f:
            f.seek(log_offset)
            self.last_log = f.read().decode(errors="replace")
        rec.exit_code = returncode
        rec.signal = -returncode if returncode is not None and returncode < 0 else None
        oom_killed = vmstat("oom_kill") > oom0 or bool(self.limit and self.limit.oom_kills() > cg_oom0)
        rec.outcome, rec.cause = ("ok", "") if (result and result["outcome"] == "ok" and not killed_for) else \
            classify(result, returncode, self.last_log, oom_killed, killed_for)
        if result:
            for k in ("pp_samples", "tg_samples", "ttft_samples_ms", "load_ms", "peak_rss_bytes",
                      "n_gpu_layers_effective", "overrides_applied", "flash_attn_resolved"):
                if k in result and not (killed_for and k in SAMPLES):  # a stopped trial measured nothing
                    setattr(rec, k, result[k])
        if rec.peak_rss_bytes is None:
            # ru_maxrss also counts the parent's RSS at spawn (fork/vfork before exec), so it is only a fallback
            rec.peak_rss_bytes = hwm or maxrss
        rec.peak_vram_by_gpu = vram_peak
        rec.peak_vram_bytes = sum(vram_peak) if vram_peak else None
        if rec.outcome != "ok":
            rec.stderr_tail = tail(self.last_log)
        rec.finished_utc = utcnow()
        if interrupted:
            raise TrialInterrupted(rec)
        return rec

    def _thrashing_weights(self, cfg: TrialConfig, refault0: int, stage: str) -> str | None:
        """'oom: ...' once the worker re-read more file pages than its model (and REFAULT_FLOOR) under the cgroup
        limit: the mmap'd weights do not fit, and the kernel evicts and re-reads them (it never fails such a
        fault). The floor keeps a few re-read library pages of a trial near the limit from counting."""
        again = self.limit.refaulted_bytes() - refault0
        try:
            size = os.path.getsize(cfg.model)
        except OSError:
            return None
        if again <= max(size, REFAULT_FLOOR):
            return None
        return (f"oom: the trial does not fit under --mem-limit {fmt_size(self.mem_limit)}: {fmt_size(again)} of "
                f"file pages (its mmap'd weights are {fmt_size(size)}) re-read from disk after the limit evicted "
                f"them (stage {stage})")

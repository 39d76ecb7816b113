"""The runner: the parent side of a trial. Whatever the worker does, the runner survives and returns a record.

Each worker is a fresh interpreter (`python -m tuner.measure.worker`, never a fork of a process that may hold CUDA)
in its own session, so a kill reaches all of it and a Ctrl-C in the terminal reaches only the parent.
With `reuse=True` a worker that finished a trial cleanly stays up for the next trial with the same load
parameters (same model file, n_gpu_layers, overrides, mmap): the load is paid once, as llama-bench does,
while every trial still runs outside the parent. After any failure the worker is gone and the next trial
gets a fresh one.

Workers of other loads wait beside it (up to KEEP_LOADED, least recently used evicted first) while they hold
nothing but host RAM and the next load still leaves the reserve free (too_many_waiting): a race that alternates
between a few configs reloads none of them, where their models fit in RAM together. A waiting worker blocks on
its pipe and uses no CPU. A build that offloads to a GPU, or a config with RPC servers, keeps one worker only: a waiting
one would hold device memory the next trial is measured on.
"""

from __future__ import annotations

import collections
import dataclasses
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

from tuner.measure import hardware, pagecache
from tuner.measure.memlimit import MemLimit
from tuner.model.meta import ModelInfo, read_model
from tuner.record import TrialConfig, TrialRecord, oom_line, utcnow
from tuner.units import fmt_size, physical_cores

DEFAULT_TIMEOUT = 600.0
# A model load is not the trial's failure unless the load itself takes this long: 379 GiB read at 150 MB/s (a
# hard disk) take 45 minutes; the trial timeout counts from the end of the load.
DEFAULT_LOAD_TIMEOUT = 3600.0
SETUP_STAGES = ("load", "fill")  # worker stages bounded by load_timeout, outside the trial timeout
DEFAULT_SWAP_RATE = 64 << 20  # bytes/s swapped in, sustained over SWAP_WINDOW: the machine is thrashing
SWAP_WINDOW = 3.0
SAMPLES = (
    "pp_samples",
    "tg_samples",
    "ttft_samples_ms",
    "pp_stream_samples",
    "tg_stream_samples",
    "ttft_stream_ms",
)
REFAULT_FLOOR = 64 << 20  # file pages re-read under --mem-limit before a small model's trial counts as not fitting
KEEP_LOADED = 4  # workers of other loads kept waiting with their model (the race's K, the defaults and fit's)
RAM_RESERVE_SHARE, RAM_RESERVE_MIN = 0.10, 2 << 30  # RAM left free beside a new load before anything is kept


def new_record(cfg: TrialConfig, hw: hardware.Hardware, build: dict, info=None) -> TrialRecord:
    """A trial record with the facts every row carries: hardware, build, model (read once, cached)."""
    rec = TrialRecord(
        config=cfg,
        started_utc=utcnow(),
        hw=hw.to_dict(),
        build=dict(build),
        hw_fingerprint=hw.fingerprint(),
        build_fingerprint=hardware.build_fingerprint(build),
    )
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
    host_only: bool = False  # its last job held host RAM only: it may wait loaded beside others
    device_base: list[int] = field(default_factory=list)  # each GPU's used memory before this worker started
    buf: bytes = b""
    events: collections.deque = field(default_factory=collections.deque)

    @property
    def pid(self) -> int:
        return self.proc.pid


def keeps_host_only(cfg: TrialConfig, build: dict) -> bool:
    """A worker of this config may wait loaded beside others: it holds host RAM only (no GPU context, which a
    GPU build makes even at n_gpu_layers 0, and no RPC server's buffers)."""
    return not build.get("gpu_offload") and not cfg.rpc


def load_need(model: str, need_bytes: int | None = None) -> int:
    """RAM a new load needs, for keeping waiting workers beside it: the planner's figure where the caller has
    one, else the model's files and a quarter more for its context."""
    return need_bytes or int(read_model(model).file_size * 1.25) + (512 << 20)


def too_many_waiting(n_waiting: int, keep: int, free: int, need: int, total: int) -> bool:
    """Whether the least recently used waiting worker must go before a new load: more wait than `keep`, or the
    load's `need` would leave less than the reserve (RAM_RESERVE_SHARE of `total`, at least RAM_RESERVE_MIN) of
    the `free` RAM."""
    return n_waiting > keep or free - need < max(int(total * RAM_RESERVE_SHARE), RAM_RESERVE_MIN)


def _mapped(pid: int) -> int:
    """A process's resident file-backed and shared pages (its mmap'd weights)."""
    try:
        return psutil.Process(pid).memory_info().shared
    except psutil.Error:
        return 0


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


def classify(
    result: dict | None, returncode: int | None, stderr: str, oom_killed: bool, killed_for: str | None
) -> tuple[str, str]:
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

    def __init__(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        mem_limit: int | None = None,
        reuse: bool = False,
        nvml: hardware.Nvml | None = None,
        swap_rate_limit: int = DEFAULT_SWAP_RATE,
        poll_interval: float = 0.5,
        hw: hardware.Hardware | None = None,
        build: dict | None = None,
        load_timeout: float = DEFAULT_LOAD_TIMEOUT,
        keep_loaded: int | None = None,
    ):
        self.timeout = timeout
        self.keep_loaded = KEEP_LOADED if keep_loaded is None else keep_loaded  # 0: one worker, as before
        self.load_timeout = load_timeout
        self.mem_limit = mem_limit
        # RLIMIT_DATA (set by the worker from the job) plus a memory cgroup where the machine allows one
        self.limit = MemLimit(mem_limit) if mem_limit else None
        # Under a memory limit every trial gets a fresh worker: a reused one keeps what earlier trials reserved
        # (RLIMIT_DATA counts address space, and it grows trial by trial), so later trials would be judged on a
        # smaller machine than asked; and the model is dropped from the page cache before each trial anyway.
        self.reuse = reuse and not mem_limit
        self.nvml = nvml if nvml is not None else hardware.Nvml()
        self.swap_rate_limit = swap_rate_limit
        # Each wake-up of the parent can preempt a llama.cpp thread spinning at a barrier (all cores busy);
        # results arrive without waiting for it (select), so sampling twice a second costs nothing in latency.
        self.poll_interval = poll_interval
        self.hw = hw or hardware.probe(self.nvml, with_llama=nvml is None)  # a handed-in NVML is the whole story
        self.nvml.align(self.hw.gpus)  # per-GPU figures in the probe's order: llama.cpp's, the planner's
        self.build = build or hardware.build_info()
        self._tmp = tempfile.TemporaryDirectory(prefix="tuner-logs-")
        self.last_log = ""  # full stderr of the last trial (the study keeps it for failed trials)
        # A worker is started ahead of need: its interpreter and llama.cpp import overlap the parent's work
        # (opening the study, writing results) instead of adding to every trial's wall time.
        self._worker: _Worker | None = self._spawn()
        self._waiting: dict[tuple, _Worker] = {}  # other loads' workers, least recently used first
        self._spare: _Worker | None = None  # a started worker set aside while a waiting one runs

    # -- worker lifecycle --------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        base = self.nvml.device_used()  # before the worker exists: its device-wide figure is taken over this
        rfd, wfd = os.pipe()
        log_path = Path(self._tmp.name) / f"worker-{time.monotonic_ns()}.log"
        # GGML_NO_BACKTRACE: on abort ggml would attach gdb for a backtrace; that is slow and floods the log
        env = dict(os.environ, PYTHONUNBUFFERED="1", GGML_NO_BACKTRACE="1", TUNER_WORKER_TMP=self._tmp.name)
        with open(log_path, "wb") as log:
            argv = [sys.executable, "-m", "tuner.measure.worker", str(wfd)]
            if self.limit:
                argv = self.limit.command(argv)
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=log, stderr=log, pass_fds=(wfd,), start_new_session=True, env=env
            )
        os.close(wfd)
        return _Worker(proc, rfd, log_path, device_base=base)

    @property
    def loaded_key(self) -> tuple | None:
        """The load key of the model the last trial's worker keeps loaded (None: the next trial loads afresh)."""
        w = self._worker
        return w.load_key if w is not None and w.used and self.reuse and w.proc.poll() is None else None

    @property
    def loaded_keys(self) -> list[tuple]:
        """Every load key a worker keeps loaded: the waiting ones (least recently used first), then the last's."""
        return [k for k, w in self._waiting.items() if w.proc.poll() is None] + (
            [self.loaded_key] if self.loaded_key is not None else []
        )

    def _worker_for(self, load_key: tuple | None, model: str | None, need_bytes: int | None) -> _Worker:
        """The worker for the next job: the last one if it has this load, a waiting one that has it, else a fresh
        one (the spare), after room is made for its load."""
        w = self._worker
        if w is not None and w.proc.poll() is None:
            if not w.used or (self.reuse and load_key is not None and w.load_key == load_key):
                return w
        waiting = self._waiting.pop(load_key, None) if load_key is not None else None
        if waiting is not None and waiting.proc.poll() is not None:
            self._reap(waiting, kill=True)
            waiting = None
        if w is not None:
            self._set_aside(w)
        if waiting is None:
            self._make_room(model, need_bytes)
        fresh = waiting or self._spare
        self._spare = None
        if fresh is None or fresh.proc.poll() is not None:
            if fresh is not None:
                self._reap(fresh, kill=True)
            fresh = self._spawn()
        self._worker = fresh
        return fresh

    def _set_aside(self, w: _Worker) -> None:
        """The last job's worker, when the next job needs another: kept waiting if it may (see the module), a
        started but unused one kept as the spare, else stopped."""
        self._worker = None
        if not w.used and w.proc.poll() is None and self._spare is None:
            self._spare = w
        elif self.reuse and w.used and w.host_only and w.load_key is not None and w.proc.poll() is None:
            self._waiting[w.load_key] = w
        else:
            self._reap(w, kill=not w.used)

    def _make_room(self, model: str | None, need_bytes: int | None) -> None:
        """Stop waiting workers, least recently used first, until at most `keep_loaded` wait and the new load
        (tuner.measure.runner.load_need) leaves the reserve free; a job without a model stops them all."""
        vm = psutil.virtual_memory()
        need = load_need(model, need_bytes) if model else vm.total

        def free() -> int:  # MemAvailable counts a waiting worker's mapped weights as reclaimable: they are not
            return psutil.virtual_memory().available - sum(_mapped(w.pid) for w in self._waiting.values())

        while self._waiting and too_many_waiting(len(self._waiting), self.keep_loaded, free(), need, vm.total):
            self._reap(self._waiting.pop(next(iter(self._waiting))), kill=False)

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
        for w in [*self._waiting.values(), *([self._spare] if self._spare else [])]:
            self._reap(w, kill=not w.used)
        self._waiting, self._spare = {}, None
        if self.limit:
            self.limit.close()
        self._tmp.cleanup()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one job in a worker -----------------------------------------------------------------------
    def _exchange(
        self,
        job: dict,
        load_key: tuple | None,
        on_stage=None,
        model: str | None = None,
        host_only: bool = False,
        need_bytes: int | None = None,
    ) -> "_Exchange":
        """Send one job to a worker and wait for its result, a kill (timeout, swap) or its death.

        A worker is reused only when `load_key` matches what it has loaded (None: always a fresh worker
        for this job, and no reuse after it). `host_only`: the job holds host RAM only, so its worker may wait
        loaded beside others; `need_bytes`: what its load needs, if the caller knows. `on_stage(event)` sees
        every stage event as it arrives.
        """
        w = self._worker_for(load_key, model, need_bytes)
        x = _Exchange()
        x.loads = not (w.used and load_key is not None and w.load_key == load_key)
        if x.loads and model and load_key is not None:
            x.page_cache_pct = pagecache.cached_pct(read_model(model).shards)
        w.used = True
        log_offset = w.log_path.stat().st_size
        t0 = time.monotonic()
        sin0, oom0 = psutil.swap_memory().sin, vmstat("oom_kill")
        eof = False
        # setup stages (the model load, a depth fill) are bounded by --load-timeout and not counted in the trial
        # timeout: loading 300 GB or filling 32k tokens on a CPU takes what it takes, and is not the config's speed
        setup_t0, setup_s = None, 0.0
        if self.limit:
            if model:
                self.limit.evict(model)
            refault0, cg_oom0 = self.limit.refaulted_bytes(), self.limit.oom_kills()
        swap = SwapWatch(self.swap_rate_limit) if self.swap_rate_limit else None
        try:
            try:
                w.proc.stdin.write((json.dumps(job) + "\n").encode())
                w.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                eof = True
            while x.result is None and not eof:
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
                            if x.stage in SETUP_STAGES and setup_t0 is not None:
                                setup_s += time.monotonic() - setup_t0
                                setup_t0 = None
                            if ev["stage"] in SETUP_STAGES:
                                setup_t0 = time.monotonic()
                            x.stage = ev["stage"]
                            x.hwm = max(x.hwm or 0, ev.get("hwm") or 0) or None
                            if on_stage:
                                on_stage(ev)
                        elif ev["event"] == "result":
                            x.result = ev
                now = time.monotonic()
                x.hwm = max(x.hwm or 0, vm_hwm(w.pid) or 0) or None
                x.vram.add(self.nvml.sample({w.pid}), w.device_base)
                rate = swap.thrashing(now, psutil.swap_memory().sin) if swap else None
                if rate is not None:
                    x.killed_for = (
                        f"swap: stopped while thrashing swap ({rate / 2**20:.0f} MiB/s swapped in, stage {x.stage})"
                    )
                    break
                if (
                    x.result is None
                    and x.stage in SETUP_STAGES
                    and setup_t0 is not None
                    and now - setup_t0 > self.load_timeout
                ):
                    what = "the model load" if x.stage == "load" else "filling the context to its depth"
                    x.killed_for = f"timeout: {what} took over {self.load_timeout:g} s (--load-timeout)"
                    break
                if x.result is None and x.stage not in SETUP_STAGES and now - t0 - setup_s > self.timeout:
                    x.killed_for = f"timeout: no result after {self.timeout:g} s (stage {x.stage})" + (
                        f"; the {setup_s:.0f} s of model load and context fill before it not counted"
                        if setup_s >= 1
                        else ""
                    )
                    break
                x.killed_for = self._thrashing_weights(model, refault0, x.stage) if self.limit and model else None
                if x.killed_for:
                    break
        except KeyboardInterrupt:
            x.interrupted = True
            x.killed_for = f"interrupted: stopped by Ctrl-C (stage {x.stage})"
        if self.limit and model and not x.killed_for:  # a result that came between two polls
            x.killed_for = self._thrashing_weights(model, refault0, x.stage)
        x.wall_s = time.monotonic() - t0
        x.swap_in_bytes = max(0, psutil.swap_memory().sin - sin0)
        keep = (
            x.result is not None
            and x.result["outcome"] == "ok"
            and self.reuse
            and x.killed_for is None
            and load_key is not None
        )
        if not keep:
            x.returncode, x.maxrss = self._reap(w, kill=x.killed_for is not None or x.result is None)
            if not x.interrupted:
                self._worker = self._spawn()  # the spare for the next trial
        else:
            w.load_key, w.host_only = load_key, host_only
        with open(w.log_path, "rb") as f:
            f.seek(log_offset)
            self.last_log = f.read().decode(errors="replace")
        x.log = self.last_log
        oom_killed = vmstat("oom_kill") > oom0 or bool(self.limit and self.limit.oom_kills() > cg_oom0)
        x.outcome, x.cause = (
            ("ok", "")
            if (x.result and x.result["outcome"] == "ok" and not x.killed_for)
            else classify(x.result, x.returncode, self.last_log, oom_killed, x.killed_for)
        )
        return x

    def run_job(self, job: dict, on_stage=None) -> "_Exchange":
        """Run a non-trial job (e.g. a quality pass: `{"kind": "quality", ...}`) in a fresh worker.

        The same isolation as a trial: timeout, swap watch, Ctrl-C, and a death classified with its cause.
        Raises KeyboardInterrupt after stopping the worker on Ctrl-C.
        """
        x = self._exchange({"mem_limit": self.mem_limit, **job}, None, on_stage, model=job.get("model"))
        if x.interrupted:
            raise KeyboardInterrupt
        return x

    # -- one trial ---------------------------------------------------------------------------------
    def run(self, cfg: TrialConfig, fault: str | None = None, need_bytes: int | None = None) -> TrialRecord:
        """One trial in a worker. `need_bytes`: the RAM its load needs (the planner's peak), which decides whether
        other loads' workers may keep waiting beside it."""
        rec = new_record(cfg, self.hw, self.build)
        if self.limit:
            rec.mem_limit_bytes, rec.mem_limit_by = self.mem_limit, self.limit.mechanism
        job = {"config": cfg.to_dict(), "fault": fault, "mem_limit": self.mem_limit}
        x = self._exchange(
            job, cfg.load_key(), model=cfg.model, host_only=keeps_host_only(cfg, self.build), need_bytes=need_bytes
        )
        result, killed_for = x.result, x.killed_for
        rec.wall_s = x.wall_s
        rec.swap_in_bytes = x.swap_in_bytes
        rec.exit_code = x.returncode
        rec.signal = -x.returncode if x.returncode is not None and x.returncode < 0 else None
        rec.outcome, rec.cause = x.outcome, x.cause
        if result:
            for k in (
                *SAMPLES,
                "load_ms",
                "peak_rss_bytes",
                "n_gpu_layers_effective",
                "overrides_applied",
                "flash_attn_resolved",
                "depth_fill_ms",
                "depth_restore_ms",
                "buffers",
            ):
                if k in result and not (killed_for and k in SAMPLES):  # a stopped trial measured nothing
                    setattr(rec, k, result[k])
        if rec.peak_rss_bytes is None:
            rec.peak_rss_bytes = x.peak_rss()
        rec.peak_vram_by_gpu, rec.vram_by = x.vram.peaks()
        rec.vram_device_by_gpu = [max(d, 0) for d in x.vram.device] if all(d >= 0 for d in x.vram.device) else []
        rec.peak_vram_bytes = sum(rec.peak_vram_by_gpu) if rec.peak_vram_by_gpu else None
        rec.model_loaded = x.loads
        rec.page_cache_pct = x.page_cache_pct
        if rec.outcome != "ok":
            rec.stderr_tail = tail(x.log)
        rec.finished_utc = utcnow()
        if x.interrupted:
            raise TrialInterrupted(rec)
        return rec

    def _thrashing_weights(self, model: str, refault0: int, stage: str) -> str | None:
        """'oom: ...' once the worker re-read more file pages than its model (and REFAULT_FLOOR) under the cgroup
        limit: the mmap'd weights do not fit, and the kernel evicts and re-reads them (it never fails such a
        fault). The floor keeps a few re-read library pages of a trial near the limit from counting."""
        again = self.limit.refaulted_bytes() - refault0
        try:
            size = os.path.getsize(model)
        except OSError:
            return None
        if again <= max(size, REFAULT_FLOOR):
            return None
        return (
            f"oom: the trial does not fit under --mem-limit {fmt_size(self.mem_limit)}: {fmt_size(again)} of "
            f"file pages (its mmap'd weights are {fmt_size(size)}) re-read from disk after the limit evicted "
            f"them (stage {stage})"
        )


@dataclass
class _Exchange:
    """What one job in a worker came to: its result event (if any), how it ended, and what it used."""

    result: dict | None = None
    outcome: str = "error"
    cause: str = ""
    killed_for: str | None = None
    stage: str = "start"
    hwm: int | None = None  # the worker's VmHWM, sampled while it lives
    vram: "_VramPeaks" = field(default_factory=lambda: _VramPeaks())
    loads: bool = True  # the worker loads the model for this job
    page_cache_pct: float | None = None
    interrupted: bool = False
    wall_s: float = 0.0
    swap_in_bytes: int = 0
    returncode: int | None = None
    maxrss: int | None = None
    log: str = ""

    def peak_rss(self) -> int | None:
        """The worker's own peak; ru_maxrss also counts the parent's RSS at spawn, so it is only a fallback."""
        if self.result and self.result.get("peak_rss_bytes"):
            return self.result["peak_rss_bytes"]
        return self.hwm or self.maxrss


@dataclass
class _VramPeaks:
    """A job's VRAM peaks per GPU from both NVML sources: the worker's own (when NVML lists its PID) and the
    device's used memory over the level before the worker started (valid only while nothing else uses the GPU)."""

    process: list[int] = field(default_factory=list)
    device: list[int] = field(default_factory=list)
    seen: bool = False

    def add(self, s: hardware.VramSample, base: list[int]) -> None:
        self.seen = self.seen or s.seen
        self.process = [max(a, b) for a, b in zip(self.process, s.process)] if self.process else list(s.process)
        over = [(d - b) if d >= 0 and b >= 0 else -1 for d, b in zip(s.device, base or [0] * len(s.device))]
        self.device = [max(a, b) for a, b in zip(self.device, over)] if self.device else over

    def peaks(self) -> tuple[list[int], str]:
        """(peak per GPU, "process" | "device" | "none"); unknown is an empty list, never zeros."""
        if self.seen:
            return self.process, "process"
        if self.device and all(d >= 0 for d in self.device):
            return [max(d, 0) for d in self.device], "device"
        return [], "none"


def all_layers(info: ModelInfo) -> int:
    """What llama.cpp offloads for "all layers": every block plus the output layer."""
    return info.n_layer + 1


def resolve(cfg: TrialConfig, info: ModelInfo | None = None) -> TrialConfig:
    """The config as it will really run: -1/99/999 → the real layer count, default threads → cores.

    Records then hold effective values, so comparisons and dominance checks see what ran.
    """
    info = info or read_model(cfg.model)
    ngl = cfg.n_gpu_layers
    ngl = all_layers(info) if ngl < 0 or ngl > all_layers(info) else ngl
    threads = cfg.n_threads or physical_cores()
    n_cpu_moe = min(cfg.n_cpu_moe, info.n_layer)
    # a partial layer past the last one, with every expert in host memory, or of a dense model places nothing
    part = cfg.moe_part if info.is_moe and not cfg.cpu_moe and n_cpu_moe < info.n_layer else "none"
    return dataclasses.replace(
        cfg,
        n_gpu_layers=ngl,
        n_threads=threads,
        n_threads_batch=cfg.n_threads_batch or threads,
        n_cpu_moe=n_cpu_moe,
        moe_part=part,
    )

"""The runner with real workers, real llama.cpp and real faults: every way a trial can die leaves a record.

Faults are injected inside the real worker (job["fault"]): it really SIGKILLs itself, dereferences NULL,
aborts, hangs, or runs out of memory under a real RLIMIT_DATA or memory cgroup. Nothing of the runner or
llama.cpp is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import worker_processes

from tuner.measure import memlimit, store
from tuner.measure.lock import LockBusy, measurement_lock
from tuner.measure.runner import Runner, classify, resolve
from tuner.model.synth import synthesize
from tuner.record import TrialConfig, TrialRecord

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
HANG_TIMEOUT = 5.0  # seconds before a hung trial is killed; the worker must reach "load" first, even on busy CPUs


def tiny_cfg(models: Path, **kw) -> TrialConfig:
    # one thread: the CPUs here are shared, and oversubscribed ggml threads spin-wait for seconds per token
    kw = {"n_prompt": 16, "n_gen": 4, "repetitions": 2, "n_threads": 1, **kw}
    return resolve(TrialConfig(model=str(models / "tiny-q8_0.gguf"), **kw))


def kib_status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.fixture(scope="module")
def runner():
    # One runner for the fault matrix: it must keep working after every kind of worker death.
    with Runner(timeout=120) as r:
        yield r


def test_clean_trial(runner, models):
    cfg = tiny_cfg(models, repetitions=3)
    rec = runner.run(cfg)
    assert rec.outcome == "ok" and rec.cause == ""
    assert len(rec.pp_samples) == len(rec.tg_samples) == len(rec.ttft_samples_ms) == 3
    assert all(x > 0 for x in rec.pp_samples + rec.tg_samples + rec.ttft_samples_ms)
    assert rec.load_ms is not None and rec.load_ms > 0
    assert rec.exit_code == 0 and rec.signal is None  # a non-reused worker exits cleanly after the trial
    assert rec.model_arch == "llama" and rec.model_n_layer == 2 and rec.model_file_type == "Q8_0"
    assert rec.hw_fingerprint and rec.build_fingerprint and rec.build.get("llama_cpp_python")
    assert rec.stderr_tail == ""
    assert 10 * MiB < rec.peak_rss_bytes < 1024 * MiB
    # the record survives its Parquet row
    back = TrialRecord.from_row(rec.to_row())
    assert back.pp_samples == rec.pp_samples and back.config == rec.config and back.hw == rec.hw


FAULTS = [
    # fault, outcome, words the cause must hold, signal
    ("sigkill", "crash", "killed by SIGKILL", signal.SIGKILL),
    ("segv", "crash", "killed by SIGSEGV", signal.SIGSEGV),
    ("abort", "crash", "killed by SIGABRT", signal.SIGABRT),
    ("exit", "error", "worker exited with code 3 and no result", None),
    ("alloc_fail", "oom", "insufficient memory", None),
    ("hang_load", "timeout", f"the model load took over {HANG_TIMEOUT:g} s (--load-timeout)", signal.SIGKILL),
    ("hang_decode", "timeout", f"no result after {HANG_TIMEOUT:g} s (stage warmup)", signal.SIGKILL),
]


@pytest.mark.parametrize("fault,outcome,cause,sig", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_leaves_a_record(runner, models, fault, outcome, cause, sig):
    runner.timeout = HANG_TIMEOUT if fault.startswith("hang") else 120
    runner.load_timeout = HANG_TIMEOUT if fault == "hang_load" else 3600  # a load is not the trial's timeout
    rec = runner.run(tiny_cfg(models), fault=fault)
    assert rec.outcome == outcome, (rec.cause, rec.stderr_tail)
    assert cause in rec.cause
    assert "\n" not in rec.cause
    if sig is not None:
        assert rec.signal == sig and rec.exit_code == -sig
    if fault == "alloc_fail":
        # the llama.cpp (ggml) allocation line is the cause, and the log tail is kept
        assert "ggml_aligned_malloc" in rec.cause and "ggml_aligned_malloc" in rec.stderr_tail
    if fault.startswith("hang"):
        assert rec.wall_s >= HANG_TIMEOUT
    assert rec.pp_samples == [] and rec.tg_samples == []
    # the peak is the worker's own (sampled VmHWM), not the parent's RSS that ru_maxrss would add
    assert rec.peak_rss_bytes is not None and 10 * MiB < rec.peak_rss_bytes < 1024 * MiB
    # the failed worker is gone (killed and reaped); only an idle spare for the next trial may be up
    spare = runner._worker.pid if runner._worker else None
    assert [c.pid for c in worker_processes() if c.pid != spare] == [], "a failed worker must be gone"
    row = rec.to_row()
    assert row["outcome"] == outcome and row["tg_ts_mean"] is None


def test_runner_keeps_working_after_faults(runner, models):
    runner.timeout = 120
    rec = runner.run(tiny_cfg(models))
    assert rec.outcome == "ok", rec.cause


def test_crash_peak_rss_is_the_workers_not_the_parents(models):
    """ru_maxrss of a child includes the parent's RSS at spawn time; the record must not report that."""
    ballast = bytearray(400 * MiB)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # touch every page: the parent's RSS is now > 400 MiB
    assert kib_status(os.getpid(), "VmRSS") > 400 * MiB
    with Runner(timeout=120) as r:
        rec = r.run(tiny_cfg(models), fault="segv")
    del ballast
    assert rec.outcome == "crash"
    assert rec.peak_rss_bytes < 300 * MiB, rec.peak_rss_bytes


def test_peak_rss_matches_the_kernels_high_water_mark(models):
    """rec.peak_rss_bytes vs VmHWM that the kernel reports for the (kept-alive) worker: within 2 %."""
    with Runner(timeout=120, reuse=True) as r:
        small = r.run(tiny_cfg(models))
        pid = r._worker.pid
        hwm_small = kib_status(pid, "VmHWM")
        # same load parameters: the same worker measures a config with a ~100 MiB KV cache
        big = r.run(tiny_cfg(models, n_ctx=100_000))
        assert r._worker.pid == pid, "reuse keeps the worker for the same load parameters"
        hwm_big = kib_status(pid, "VmHWM")
    assert small.outcome == big.outcome == "ok"
    assert abs(small.peak_rss_bytes - hwm_small) <= 0.02 * hwm_small, (small.peak_rss_bytes, hwm_small)
    assert abs(big.peak_rss_bytes - hwm_big) <= 0.02 * hwm_big, (big.peak_rss_bytes, hwm_big)
    # each trial gets its own high-water mark, and the KV cache shows in it
    assert big.peak_rss_bytes - small.peak_rss_bytes > 80 * MiB


def test_reuse_loads_once_and_restarts_after_a_failure(models):
    with Runner(timeout=120, reuse=True) as r:
        a = r.run(tiny_cfg(models))
        pid = r._worker.pid
        b = r.run(tiny_cfg(models, n_batch=8))  # context parameter: same worker, model kept
        assert r._worker.pid == pid
        c = r.run(tiny_cfg(models, use_mmap=False))  # load parameter: a fresh worker
        pid2 = r._worker.pid
        assert pid2 != pid
        d = r.run(tiny_cfg(models, use_mmap=False), fault="abort")
        e = r.run(tiny_cfg(models, use_mmap=False))
        assert r._worker.pid not in (pid, pid2)
    assert [x.outcome for x in (a, b, c, d, e)] == ["ok", "ok", "ok", "crash", "ok"]
    assert a.load_ms == b.load_ms, "a kept model reports the load it paid once"


def test_other_loads_wait_loaded_and_a_waiting_worker_uses_no_cpu(models):
    """A race alternates between loads: each load's worker waits with its model while another runs, and a
    waiting worker blocks on its pipe (no CPU taken from the trial being measured)."""
    import psutil

    with Runner(timeout=120, reuse=True) as r:
        a = r.run(tiny_cfg(models))
        pid_a = r._worker.pid
        b = r.run(tiny_cfg(models, use_mmap=False))
        assert r._worker.pid != pid_a and r.loaded_keys == [a.config.load_key(), b.config.load_key()]
        waiting = psutil.Process(pid_a)
        cpu0 = sum(waiting.cpu_times()[:2])
        c = r.run(tiny_cfg(models, use_mmap=False, n_batch=8))
        idle_cpu = sum(waiting.cpu_times()[:2]) - cpu0
        d = r.run(tiny_cfg(models, n_batch=8))
        assert r._worker.pid == pid_a
    assert [x.outcome for x in (a, b, c, d)] == ["ok"] * 4
    assert (a.model_loaded, b.model_loaded, c.model_loaded, d.model_loaded) == (True, True, False, False)
    assert d.load_ms == a.load_ms, "the waiting worker kept the model it loaded for the first trial"
    assert idle_cpu < 0.05, f"the waiting worker used {idle_cpu:.3f} s of CPU during another's trial"
    assert not _alive(pid_a), "closing the runner stops the waiting workers"


def test_waiting_workers_leave_when_the_next_load_needs_their_ram(models):
    """Least recently used first: beyond `keep_loaded`, or when the new load's need would eat the reserve."""
    with Runner(timeout=120, reuse=True, keep_loaded=1) as r:
        r.run(tiny_cfg(models))
        pid_a = r._worker.pid
        r.run(tiny_cfg(models, use_mmap=False))
        pid_b = r._worker.pid
        r.run(tiny_cfg(models, use_mlock=True))  # a third load: only one may wait, the older goes
        assert r._waiting and [w.pid for w in r._waiting.values()] == [pid_b]
        assert not _alive(pid_a)
        huge = 1 << 50
        r.run(tiny_cfg(models, use_mmap=False, use_mlock=True), need_bytes=huge)  # needs every byte: none waits
        assert not r._waiting and not _alive(pid_b)


def test_a_gpu_build_keeps_no_worker_waiting(models):
    """A worker of a GPU build holds a device context even at n_gpu_layers 0: it never waits beside another."""
    from tuner.measure import hardware

    with Runner(timeout=120, reuse=True, build={**hardware.build_info(), "gpu_offload": True}) as r:
        r.run(tiny_cfg(models))
        pid_a = r._worker.pid
        r.run(tiny_cfg(models, use_mmap=False))
        assert not r._waiting and not _alive(pid_a)
        r.run(tiny_cfg(models, use_mmap=False, n_batch=8))  # the same load still reuses its worker
        assert r.loaded_keys == [r._worker.load_key]


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_memory_limit_gives_every_trial_a_fresh_worker(models):
    """RLIMIT_DATA counts what a worker has reserved so far: a reused worker would meet the limit with less
    room than a fresh one, so under --mem-limit no worker is reused, whatever reuse says."""
    with Runner(timeout=120, reuse=True, mem_limit=400 * MiB) as r:
        a = r.run(tiny_cfg(models))
        pid = r._worker.pid  # the spare started for the next trial
        b = r.run(tiny_cfg(models))
        assert r._worker.pid != pid
    assert a.outcome == b.outcome == "ok"
    assert b.load_ms and b.exit_code == 0, "the second trial loaded the model in its own worker, which then exited"


@pytest.mark.parametrize("mmap", [True, False], ids=["huge-ctx", "no-mmap"])
def test_mem_limit_makes_allocation_fail_as_oom(models, mmap, host_only):
    """A real RLIMIT_DATA: a 1 M-token KV cache (~1 GiB), or an 84 MiB model read into RAM, cannot fit."""
    if mmap:
        cfg = tiny_cfg(models, n_ctx=1_000_000, n_gpu_layers=0)
        limit = 400 * MiB
    else:
        cfg = resolve(
            TrialConfig(
                model=str(models / "moe-q8_0.gguf"),
                use_mmap=False,
                n_prompt=8,
                n_gen=2,
                repetitions=1,
                n_threads=1,
                n_gpu_layers=0,
            )
        )
        limit = 150 * MiB  # the worker's own data segment (Python, numpy, llama.cpp) is ~100 MiB of it
    with Runner(timeout=120, mem_limit=limit) as r:
        rec = r.run(cfg)
    assert rec.outcome == "oom", (rec.cause, rec.stderr_tail)
    # the cause is llama.cpp's own allocation line
    assert any(w in rec.cause for w in ("failed to allocate", "insufficient memory", "unable to allocate")), rec.cause
    assert rec.cause in rec.stderr_tail or rec.cause.split(": ", 1)[-1] in rec.stderr_tail
    assert rec.exit_code == 0, "the worker reported the failure itself and exited"


def machine_has_memory_cgroups() -> bool:
    """Root, with a cgroup v1 memory hierarchy or a v2 one that lists the memory controller: what CI offers."""
    if os.geteuid() != 0:
        return False
    mounts = Path("/proc/self/mountinfo").read_text()
    if any(" - cgroup " in ln and "memory" in ln.rsplit(" ", 1)[-1].split(",") for ln in mounts.splitlines()):
        return True
    v2 = [ln.split()[4] for ln in mounts.splitlines() if " - cgroup2 " in ln]
    return any("memory" in (Path(m) / "cgroup.controllers").read_text().split() for m in v2)


def test_mem_limit_covers_mmapped_weights(models, host_only):
    """The default mmap: a 157 MiB f16 model (no repacking, so its weights stay file-backed) under 130 MiB.

    RLIMIT_DATA does not see a read-only file mapping, and the kernel never fails a file page fault over a cgroup
    limit: it evicts weight pages and reads them again (the trial would "run" at a few t/s). The runner counts
    those re-reads in the worker's cgroup and stops the trial as oom once they exceed the model's size.
    """
    model = synthesize(models, "moe", ("f16",))[0]
    assert model.stat().st_size > 150 * MiB
    cfg = resolve(TrialConfig(model=str(model), n_prompt=32, n_gen=16, repetitions=2, n_threads=1, n_gpu_layers=0))
    with Runner(timeout=120, mem_limit=130 * MiB) as r:
        lim = r.limit
        cgroup = lim.cgroup
        if machine_has_memory_cgroups():
            assert lim.version in (1, 2) and cgroup.is_dir() and lim.note == ""
            # the spare worker joins the cgroup before it execs Python (so before it imports anything)
            pid = r._worker.pid
            deadline = time.monotonic() + 30
            python = Path(sys.executable).resolve()
            while Path(f"/proc/{pid}/exe").resolve() != python and time.monotonic() < deadline:
                time.sleep(0.01)
            assert Path(f"/proc/{pid}/exe").resolve() == python
            assert cgroup.name in Path(f"/proc/{pid}/cgroup").read_text()
        rec = r.run(cfg)
        again = r.run(
            resolve(TrialConfig(model=str(model), n_prompt=32, n_gen=16, repetitions=2, n_threads=1, n_gpu_layers=0))
        )  # same model, same limit: still too small
    assert rec.mem_limit_bytes == 130 * MiB and rec.mem_limit_by == lim.mechanism
    if machine_has_memory_cgroups():
        assert rec.outcome == "oom", (rec.outcome, rec.cause)
        assert rec.cause.startswith("the trial does not fit under --mem-limit 130.00 MiB: "), rec.cause
        assert "(its mmap'd weights are 157.17 MiB) re-read from disk after the limit evicted them" in rec.cause
        assert rec.tg_samples == [] and rec.pp_samples == []  # a stopped trial measured nothing
        assert again.outcome == "oom"
        assert not cgroup.exists(), "the runner removes its cgroup on close"
    else:
        # no cgroup here: only RLIMIT_DATA, which the mapped weights escape, and the record and note say so
        assert lim.mechanism == memlimit.RLIMIT_ONLY and "does not cover llama.cpp's mmap" in lim.note
        assert rec.outcome == "ok"


def test_mem_limit_cgroup_lets_a_fitting_model_run(models, host_only):
    model = synthesize(models, "moe", ("f16",))[0]
    cfg = resolve(TrialConfig(model=str(model), n_prompt=32, n_gen=16, repetitions=2, n_threads=1, n_gpu_layers=0))
    with Runner(timeout=120, mem_limit=400 * MiB) as r:
        rec = r.run(cfg)
    assert rec.outcome == "ok", rec.cause
    assert rec.mem_limit_bytes == 400 * MiB and rec.mem_limit_by == r.limit.mechanism
    assert len(rec.tg_samples) == 2


def test_parent_process_exits_normally_after_real_faults(models, tmp_path):
    """A separate parent runs trials whose workers die by SIGKILL, SIGSEGV, abort; it must exit 0 itself."""
    out = tmp_path / "trials.parquet"
    code = textwrap.dedent(f"""
        import json, sys
        from tuner.measure import store
        from tuner.record import TrialConfig
        from tuner.measure.runner import Runner, resolve
        cfg = resolve(TrialConfig(model={str(models / "tiny-q8_0.gguf")!r}, n_prompt=8, n_gen=2,
                                        repetitions=1, n_threads=1))
        with Runner(timeout=60) as r:
            recs = [r.run(cfg, fault=f) for f in ("sigkill", "segv", "abort")]
        store.append({str(out)!r}, recs)
        print(json.dumps([x.outcome for x in recs]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["crash"] * 3
    rows = store.read(out)
    assert list(rows["outcome"]) == ["crash"] * 3
    assert list(rows["signal"]) == [9, 11, 6]


def test_a_killed_parent_leaves_no_waiting_worker_behind(models):
    """SIGKILL of the search: no close() runs, yet every worker (the last one and those waiting with their
    models) sees its job pipe close and exits, so nothing keeps a model in RAM after the parent."""
    code = textwrap.dedent(f"""
        import json, time
        from tuner.record import TrialConfig
        from tuner.measure.runner import Runner, resolve
        cfg = resolve(TrialConfig(model={str(models / "tiny-q8_0.gguf")!r}, n_prompt=8, n_gen=2,
                                        repetitions=1, n_threads=1))
        r = Runner(timeout=60, reuse=True)
        r.run(cfg)
        r.run(resolve(TrialConfig(**{{**cfg.to_dict(), "use_mmap": False, "overrides": ()}})))
        print(json.dumps([w.pid for w in r._waiting.values()] + [r._worker.pid]), flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        pids = json.loads(proc.stdout.readline())
        assert len(pids) == 2 and all(_alive(p) for p in pids), "one worker waits beside the last one"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        proc.kill()


def test_classify_kernel_oom_kill_and_signals():
    assert classify(None, -9, "", True, None) == (
        "oom",
        "killed by the kernel OOM killer (SIGKILL, oom_kill counter rose)",
    )
    assert classify(None, -9, "loading...\n", False, None) == ("crash", "killed by SIGKILL: loading...")
    outcome, cause = classify(None, -6, "x\nggml_aligned_malloc: insufficient memory (attempted 5 MB)\n", False, None)
    assert outcome == "oom" and cause == "SIGABRT after: ggml_aligned_malloc: insufficient memory (attempted 5 MB)"
    assert classify(None, 1, "CUDA error: out of memory\n", False, None) == ("oom", "CUDA error: out of memory")
    assert classify({"outcome": "load_error", "cause": "bad"}, 0, "", False, None) == ("load_error", "bad")
    assert classify(None, None, "", False, "timeout: no result after 3 s (stage load)") == (
        "timeout",
        "no result after 3 s (stage load)",
    )


# --- the host-wide measurement lock ---------------------------------------------------------------------------


def test_measurement_lock_is_released_when_its_holder_is_killed(tmp_path):
    code = textwrap.dedent("""
        import sys, time
        from tuner.measure.lock import measurement_lock
        with measurement_lock(wait=False, what="holder test"):
            print("held", flush=True)
            time.sleep(600)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockBusy, match=rf"holder test \(pid {holder.pid}\)"):
            with measurement_lock(wait=False):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        t0 = time.monotonic()
        with measurement_lock(wait=False, what="after the kill"):
            assert time.monotonic() - t0 < 5
            owner = Path(os.environ["TUNER_LOCK_FILE"]).with_suffix(".owner").read_text()
            assert owner == f"after the kill (pid {os.getpid()})"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert holder.returncode == -signal.SIGKILL


def test_a_worker_that_dies_while_idle_is_replaced(models):
    """The spare worker (started ahead of need) killed before its first trial: the next trial still runs."""
    import os
    import signal as sig

    from tuner.measure.runner import Runner

    cfg = TrialConfig(model=str(models / "tiny-q8_0.gguf"), n_prompt=16, n_gen=4, repetitions=2, n_threads=1)
    with Runner(timeout=60, reuse=True) as r:
        os.kill(r._worker.pid, sig.SIGKILL)
        time.sleep(0.3)
        assert r.run(cfg).outcome == "ok"
        os.kill(r._worker.pid, sig.SIGKILL)  # a kept worker dying between trials
        time.sleep(0.3)
        assert r.run(cfg).outcome == "ok"


def test_swap_watch_needs_a_full_window_above_the_limit():
    """The thrash detector's arithmetic (this machine has no swap device to thrash for real)."""
    from tuner.measure.runner import SwapWatch

    mib = 2**20
    w = SwapWatch(limit=64 * mib, window=3.0)
    # a burst of 500 MiB within one second is not yet a full window
    assert w.thrashing(0.0, 0) is None and w.thrashing(1.0, 500 * mib) is None
    # sustained 100 MiB/s over the window: thrashing, with the rate
    rate = None
    for t in range(2, 6):
        rate = w.thrashing(float(t), 500 * mib + (t - 1) * 100 * mib)
    assert rate is not None and 90 * mib < rate < 200 * mib
    # swap-in stops: once the window has slid past the burst, the verdict clears
    flat = 500 * mib + 4 * 100 * mib
    verdicts = [w.thrashing(float(t), flat) for t in range(6, 10)]
    assert verdicts[-1] is None

"""The worker process on its own: its JSON event protocol, model reuse, exit rules and its peak-RSS figure.

The worker is driven here the way the runner drives it (a pipe for events, JSON jobs on stdin), by a small
separate parent that reads the kernel's own accounting of the child (os.wait4 → ru_maxrss).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tuner.measure.runner import resolve
from tuner.measure.worker import classify_log, effective_gpu_layers, parse_overrides
from tuner.record import TrialConfig

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20

# A small parent (a bare interpreter: its own RSS is far below the worker's) that runs one worker over the
# given jobs, collects every event, then closes stdin and reaps the worker with wait4.
DRIVER = textwrap.dedent("""
    import json, os, subprocess, sys
    jobs = json.loads(sys.argv[1])
    rfd, wfd = os.pipe()
    env = dict(os.environ, GGML_NO_BACKTRACE="1")
    p = subprocess.Popen([sys.executable, "-m", "tuner.measure.worker", str(wfd)], stdin=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=(wfd,), env=env)
    os.close(wfd)
    events, buf = [], b""
    for job in jobs:
        p.stdin.write((json.dumps(job) + "\\n").encode()); p.stdin.flush()
        done = False
        while not done:
            data = os.read(rfd, 65536)
            if not data:
                break
            buf += data
            while b"\\n" in buf:
                line, buf = buf.split(b"\\n", 1)
                ev = json.loads(line)
                events.append(ev)
                done = done or ev["event"] == "result"
        if not done:
            break
    p.stdin.close()
    _, status, ru = os.wait4(p.pid, 0)
    print(json.dumps({"events": events, "exit": os.waitstatus_to_exitcode(status), "maxrss": ru.ru_maxrss * 1024}))
""")


def drive(jobs: list[dict]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(jobs)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def job(models: Path, fault: str | None = None, mem_limit: int | None = None, **kw) -> dict:
    kw = {"n_prompt": 16, "n_gen": 4, "repetitions": 2, "n_threads": 1, **kw}  # 1 thread: shared CPUs
    cfg = resolve(TrialConfig(model=str(models / "tiny-q8_0.gguf"), **kw))
    return {"config": cfg.to_dict(), "fault": fault, "mem_limit": mem_limit}


def results(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "result"]


def test_protocol_stages_results_and_model_reuse(models):
    out = drive([job(models), job(models, n_batch=8, repetitions=3)])
    stages = [e["stage"] for e in out["events"] if e["event"] == "stage"]
    # the second job has the same load parameters: no second load; pp and tg each in their own context,
    # sized for the test as llama-bench does (n_ctx not given)
    one = ["context", "warmup", "pp", "context", "warmup", "tg"]
    assert stages == ["start", "load", *one, "start", *one]
    r1, r2 = results(out["events"])
    assert r1["outcome"] == r2["outcome"] == "ok"
    assert len(r1["pp_samples"]) == 2 and len(r2["tg_samples"]) == 3 and len(r2["ttft_samples_ms"]) == 3
    assert r1["model_n_layer"] == 2
    assert r1["load_ms"] == r2["load_ms"] > 0
    assert out["exit"] == 0, "the worker exits cleanly on EOF"


def test_a_given_context_is_one_context_for_pp_and_tg(models):
    out = drive([job(models, n_ctx=64)])
    stages = [e["stage"] for e in out["events"] if e["event"] == "stage"]
    assert stages == ["start", "load", "context", "warmup", "pp", "tg"]
    (r,) = results(out["events"])
    assert len(r["pp_samples"]) == len(r["tg_samples"]) == len(r["ttft_samples_ms"]) == 2


def test_worker_peak_rss_matches_wait4_maxrss(models):
    """The worker's reported peak vs the kernel's ru_maxrss for the same process: within 2 %.

    A ~100 MiB KV cache puts the peak inside the trial, where the worker measures it.
    """
    out = drive([job(models, n_ctx=100_000)])
    (res,) = results(out["events"])
    assert res["outcome"] == "ok"
    assert res["peak_rss_bytes"] > 100 * MiB
    assert abs(res["peak_rss_bytes"] - out["maxrss"]) <= 0.02 * out["maxrss"], (res["peak_rss_bytes"], out["maxrss"])


def test_a_failed_job_is_reported_then_the_worker_exits(models, host_only):
    # a ~1 GiB KV cache under a 400 MiB data limit: context creation fails; the second job never runs
    out = drive([job(models, n_ctx=1_000_000, mem_limit=400 * MiB), job(models)])
    (res,) = results(out["events"])
    assert res["outcome"] == "oom"
    assert "failed to allocate" in res["cause"] or "insufficient memory" in res["cause"]
    assert res["peak_rss_bytes"] > 0
    assert out["exit"] == 0


def test_bad_override_is_a_load_error(models):
    out = drive([job(models, overrides=("blk\\.0\\.ffn=NOSUCHBUFFER",))])
    (res,) = results(out["events"])
    assert res["outcome"] == "load_error"
    assert "NOSUCHBUFFER" in res["cause"]


@pytest.mark.parametrize("requested,expected", [(-1, 3), (99, 3), (999, 3), (3, 3), (2, 2), (0, 0)])
def test_effective_gpu_layers_all_means_n_layer_plus_output(requested, expected):
    assert effective_gpu_layers(requested, 2, offload=True) == expected
    assert effective_gpu_layers(requested, 2, offload=False) == 0  # a CPU-only build offloads nothing


def test_classify_log_picks_llama_cpp_lines():
    log = (
        "llama_model_load: loading\nggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of "
        "size 1024\nllama_init_from_model: failed to initialize the context\n"
    )
    assert classify_log(log, "error", "fallback") == (
        "oom",
        "ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of size 1024",
    )
    assert classify_log("llama_model_load: error loading model: bad magic\n", "load_error", "x") == (
        "load_error",
        "llama_model_load: error loading model: bad magic",
    )
    assert classify_log("nothing useful\n", "error", "fallback") == ("error", "fallback")


def test_parse_overrides_reads_llama_cpp_lines():
    lines = [
        "tensor blk.0.ffn_up_exps.weight (1 MiB q8_0) buffer type overridden to CPU\n",
        "load_tensors: something else\n",
    ]
    assert parse_overrides(lines) == ["blk.0.ffn_up_exps.weight=CPU"]

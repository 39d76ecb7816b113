"""`tuner bench` end to end: real model, real worker, a Parquet row, llama-bench style output."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tuner.cli import cli
from tuner.measure import hardware, store
from tuner.model.meta import read_model
from tuner.record import TrialRecord
from tuner.units import physical_cores

ROOT = Path(__file__).resolve().parents[1]
TUNER = Path(sys.executable).with_name("tuner")
# one thread: the CPUs here are shared, and oversubscribed ggml threads spin-wait for seconds per token
SHAPE = ["-t", "1", "-p", "16", "-n", "4", "-r", "2"]


def invoke(*args):
    return CliRunner().invoke(cli, ["bench", *map(str, args)])


@pytest.mark.parametrize("ngl", ["-1", "99", "999"])
def test_all_layers_is_recorded_as_the_real_count(models, tmp_path, ngl):
    out = tmp_path / "r.parquet"
    res = invoke(models / "tiny-q8_0.gguf", "-ngl", ngl, *SHAPE, "-o", out)
    assert res.exit_code == 0, res.output
    (row,) = store.read(out).to_dict("records")
    assert row["n_gpu_layers"] == 3  # n_layer (2) + the output layer, as llama.cpp counts "all"
    offload = hardware.build_info()["gpu_offload"]
    assert row["n_gpu_layers_effective"] == (3 if offload else 0)  # what the worker's llama.cpp really did
    assert res.stdout.splitlines()[2].split("|")[4].strip() == "3"  # the ngl column of the table


def test_bench_table_row_and_summary(models, tmp_path):
    out = tmp_path / "r.parquet"
    res = invoke(models / "tiny-q8_0.gguf", "-t", "1", "-b", "64", "-ub", "32", *SHAPE, "-o", out)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[:5]]
    assert cells[0] == ["model", "size", "params", "ngl", "threads", "n_batch", "n_ubatch", "fa", "test", "t/s"]
    assert [c[8] for c in cells[2:]] == ["pp16", "tg4", "ttft p16"]
    assert cells[2][:8] == ["tuner-synth-tiny Q8_0", "1.48 MiB", "1.44 M", "3", "1", "64", "32", "auto"]
    assert "peak RSS" in lines[5] and "MiB" in lines[5]
    assert f"appended to {out}" in res.stderr
    df = store.read(out)
    assert len(df) == 1
    r = df.iloc[0]
    assert r["outcome"] == "ok" and r["n_threads"] == 1 and r["n_threads_batch"] == 1
    assert (r["n_batch"], r["n_ubatch"], r["n_prompt"], r["n_gen"], r["repetitions"]) == (64, 32, 16, 4, 2)
    assert len(r["pp_samples"]) == 2 and r["pp_ts_mean"] > 0 and r["tg_ts_mean"] > 0
    # the table shows the same mean the row holds
    assert f"{r['tg_ts_mean']:.2f} ± {r['tg_ts_sd']:.2f}" in lines[3]
    assert r["model_file_type"] == "Q8_0" and r["peak_rss_bytes"] > 0


def test_default_threads_are_physical_cores(models, tmp_path):
    out = tmp_path / "r.parquet"
    assert invoke(models / "tiny-q8_0.gguf", "-p", "8", "-n", "1", "-r", "1", "-o", out).exit_code == 0
    assert store.read(out).iloc[0]["n_threads"] == physical_cores()


def test_json_record_then_rerun_from_it_as_config(models, tmp_path):
    out = tmp_path / "r.parquet"
    res = invoke(
        models / "tiny-q8_0.gguf", "-c", "256", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on", *SHAPE, "-o", out, "--json"
    )
    assert res.exit_code == 0, res.output
    rec = TrialRecord.from_json(res.stdout)
    assert rec.outcome == "ok" and rec.config.n_ctx == 256 and rec.config.type_k == "q8_0"
    saved = tmp_path / "rec.json"
    saved.write_text(res.stdout)
    # the saved record re-measures the same config; the command line still wins over the file
    res2 = CliRunner().invoke(cli, ["bench", "--config", str(saved), "-r", "1", "-o", str(out), "--json"])
    assert res2.exit_code == 0, res2.output
    rec2 = TrialRecord.from_json(res2.stdout)
    assert rec2.config == dataclasses.replace(rec.config, repetitions=1)
    assert len(store.read(out)) == 2


def test_failed_trial_is_recorded_and_exits_1(models, tmp_path, host_only):
    out = tmp_path / "r.parquet"
    res = invoke(models / "tiny-q8_0.gguf", "-c", "1000000", "--mem-limit", "400MiB", *SHAPE, "-o", out)
    assert res.exit_code == 1, res.output
    row = store.read(out).iloc[0]
    assert row["outcome"] == "oom"
    assert "allocate" in row["cause"] or "insufficient memory" in row["cause"]
    assert "oom:" in res.stdout  # the table line says what happened
    assert "--- worker stderr (tail) ---" in res.stderr and "failed to allocate" in res.stderr


def test_model_path_with_spaces_and_unicode(models, tmp_path):
    d = tmp_path / "my models"
    d.mkdir()
    m = d / "modèle ü.gguf"
    shutil.copy(models / "tiny-q8_0.gguf", m)
    out = tmp_path / "résultats dir" / "r.parquet"
    res = invoke(m, *SHAPE, "-o", out)
    assert res.exit_code == 0, res.output
    row = store.read(out).iloc[0]
    assert row["outcome"] == "ok" and row["model"] == str(m)
    assert row["model_hash"] == read_model(models / "tiny-q8_0.gguf").content_hash


def test_real_console_script(models, tmp_path):
    """The installed `tuner` entry point, in its own process: exit code, stdout table, stderr notes."""
    out = tmp_path / "r.parquet"
    proc = subprocess.run(
        [str(TUNER), "bench", str(models / "tiny-q4_k_m.gguf"), *SHAPE, "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tuner-synth-tiny Q4_K_M" in proc.stdout and "tg4" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert store.read(out).iloc[0]["model_file_type"] == "Q4_K_M"


def test_no_wait_when_the_rig_is_busy(models, tmp_path):
    from tuner.measure.lock import measurement_lock

    out = tmp_path / "r.parquet"
    with measurement_lock(wait=False, what="another bench"):
        res = invoke(models / "tiny-q8_0.gguf", *SHAPE, "-o", out, "--no-wait")
    assert res.exit_code == 75, res.output
    assert res.stderr.startswith("tuner: another measurement is running (another bench")
    assert not out.exists(), "no trial ran, nothing written"


def test_help_has_an_example():
    res = CliRunner().invoke(cli, ["bench", "--help"])
    assert res.exit_code == 0 and "Example" in res.output and "-ngl" in res.output


def test_ctrl_c_during_bench_records_the_trial_as_interrupted(models, tmp_path):
    import signal as sig
    import subprocess
    import sys
    import time as _time
    from pathlib import Path as _P

    out = tmp_path / "b.parquet"
    tuner = str(_P(sys.executable).with_name("tuner"))
    model = models / "tiny-q8_0.gguf"
    # as from a terminal: a suite started in the background of a non-interactive shell inherits SIGINT ignored,
    # and a process that starts with it ignored never sees Ctrl-C
    p = subprocess.Popen(
        [tuner, "bench", str(model), "-t", "1", "-p", "512", "-n", "4096", "-r", "40", "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: sig.signal(sig.SIGINT, sig.SIG_DFL),
    )
    # Ctrl-C mid-trial: once the worker has mapped the model, a job is running (a spare worker maps nothing)
    deadline = _time.monotonic() + 120
    while _time.monotonic() < deadline and not _maps_file(p.pid, model):
        _time.sleep(0.05)
    assert _maps_file(p.pid, model), "the bench never started its trial"
    p.send_signal(sig.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-1500:]
    assert "Traceback" not in err and "interrupted" in err
    from tuner.measure import store as _store

    rec = _store.records(out)[0]
    assert rec.outcome == "interrupted" and "Ctrl-C" in rec.cause


def _maps_file(parent: int, path) -> bool:
    """Whether a process under `parent` has `path` mapped (llama.cpp mmaps the model while it loads it)."""
    import psutil

    target = str(path)
    try:
        kids = psutil.Process(parent).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for k in kids:
        try:
            if target in Path(f"/proc/{k.pid}/maps").read_text():
                return True
        except OSError:
            pass
    return False

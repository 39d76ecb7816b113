"""Bad input to `tuner bench`: one line `tuner: error: ...` on stderr, exit 2, no traceback, nothing written.

Each case runs through Click's CliRunner; a few also run through the real `tuner` console script in its own
process, to prove no traceback reaches a terminal.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from tuner.cli import cli
from tuner.measure import store
from tuner.record import TrialConfig, TrialRecord

TUNER = Path(sys.executable).with_name("tuner")


@pytest.fixture(scope="module")
def bad(tmp_path_factory, models) -> dict[str, Path]:
    """Every kind of bad file, made once."""
    d = tmp_path_factory.mktemp("bad input")
    tiny = (models / "tiny-q8_0.gguf").read_bytes()
    files = {
        "dir": d / "a folder.gguf",
        "text": d / "notes.gguf",
        "zero": d / "zero.gguf",
        "truncated": d / "truncated.gguf",
        "headless": d / "headless.gguf",
        "clip": d / "clip.gguf",
        "madeup": d / "frob.gguf",
        "shard": d / "big-00001-of-00002.gguf",
        "afile": d / "a-regular-file",
        "notparquet": d / "results.parquet",
        "llamabench": d / "llama-bench.json",
        "badjson": d / "broken.json",
        "unknownjson": d / "unknown.json",
        "badtoml": d / "broken.toml",
        "unknowntoml": d / "unknown.toml",
    }
    files["dir"].mkdir()
    files["text"].write_text("this is not a model\n")
    files["zero"].write_bytes(b"")
    files["truncated"].write_bytes(tiny[:5000])  # cut inside the vocabulary array
    files["headless"].write_bytes(tiny[: len(tiny) // 2])  # header intact, tensor data cut
    for key, arch in (("clip", "clip"), ("madeup", "frobnicator")):
        w = gguf.GGUFWriter(str(files[key]), arch)
        w.add_block_count(2)
        w.add_tensor("v.blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    files["shard"].write_bytes(tiny)  # shard 2 of 2 is missing
    files["afile"].write_text("x")
    files["notparquet"].write_text("trial,outcome\n1,ok\n")
    # what `llama-bench -o json` writes: a list of result objects, not a tuner config
    files["llamabench"].write_text(
        json.dumps(
            [
                {
                    "build_commit": "abc",
                    "model_filename": "m.gguf",
                    "n_prompt": 512,
                    "n_gen": 0,
                    "avg_ts": 100.0,
                    "samples_ts": [100.0],
                }
            ]
        )
    )
    files["badjson"].write_text('{"config": {"model": ')
    files["unknownjson"].write_text(json.dumps({"config": {"model": "m.gguf", "n_threadz": 4}}))
    files["badtoml"].write_text("[space]\nn_threads = [1, 2\n")
    files["unknowntoml"].write_text("n_threads = 2\nturbo_mode = true\n")
    return files


@pytest.fixture
def results(tmp_path) -> Path:
    """An existing results file with one row: every failed command must leave it byte for byte as it was."""
    p = tmp_path / "results" / "trials.parquet"
    store.append(p, [TrialRecord(config=TrialConfig(model="m.gguf"), outcome="ok", trial_number=0)])
    return p


TINY = "{models}/tiny-q8_0.gguf"
# (id, argv after `tuner bench` with {placeholders}, words the one-line message must hold)
CASES = [
    ("missing-file", ["{nowhere}/model.gguf"], "model not found"),
    ("directory", ["{dir}"], "is a directory"),
    ("not-gguf", ["{text}"], "not a GGUF file"),
    ("zero-bytes", ["{zero}"], "empty (0 bytes)"),
    ("truncated-header", ["{truncated}"], "truncated or damaged GGUF"),
    ("truncated-data", ["{headless}"], "truncated or damaged GGUF"),
    ("arch-clip", ["{clip}"], "unsupported architecture 'clip'"),
    ("arch-made-up", ["{madeup}"], "unsupported architecture 'frobnicator'"),
    ("missing-shard", ["{shard}"], "missing shard(s) big-00002-of-00002.gguf"),
    ("threads-zero", [TINY, "-t", "0"], "'-t' / '--threads': must be at least 1, got 0"),
    ("reps-zero", [TINY, "-r", "0"], "must be at least 1, got 0"),
    ("batch-negative", [TINY, "-b", "-4"], "must be at least 1, got -4"),
    ("prompt-negative", [TINY, "-p", "-1"], "must not be negative, got -1"),
    ("ctx-negative", [TINY, "-c", "-1"], "must not be negative"),
    ("ngl-below-minus-1", [TINY, "-ngl", "-2"], "must be -1 (all layers) or more, got -2"),
    ("ngl-not-a-number", [TINY, "-ngl", "all"], "'all' is not a valid integer"),
    ("kv-type", [TINY, "-ctk", "q3_k"], "'q3_k' is not one of"),
    ("timeout-zero", [TINY, "--timeout", "0"], "--timeout"),
    ("mem-limit-zero", [TINY, "--mem-limit", "0"], "must be more than 0 bytes"),
    ("mem-limit-garbage", [TINY, "--mem-limit", "lots"], "not a size: 'lots'"),
    ("override-no-buffer", [TINY, "-ot", "exps"], "expected PATTERN=BUFFER"),
    ("tensor-split-garbage", [TINY, "-ts", "3:1"], "bad --tensor-split '3:1'"),
    ("results-parent-is-a-file", [TINY, "-o", "{afile}/sub/trials.parquet"], "cannot create results folder"),
    ("results-not-parquet", [TINY, "-o", "{notparquet}"], "not a readable Parquet file"),
    ("config-llama-bench-json", ["--config", "{llamabench}"], "is not a tuner config"),
    ("config-broken-json", ["--config", "{badjson}"], "is not valid JSON"),
    ("config-unknown-param-json", ["--config", "{unknownjson}"], "unknown parameter(s) n_threadz"),
    ("config-malformed-toml", ["--config", "{badtoml}"], "malformed TOML"),
    ("config-unknown-param-toml", ["--config", "{unknowntoml}"], "unknown parameter(s) turbo_mode"),
    ("config-missing", ["--config", "{nowhere}/c.toml"], "config file not found"),
    ("no-model", [], "no model given"),
    ("unknown-option", [TINY, "--turbo"], "No such option '--turbo'"),
]


def argv(case_args: list[str], bad: dict[str, Path], models: Path, results: Path, tmp_path: Path) -> list[str]:
    subs = {**{k: str(v) for k, v in bad.items()}, "models": str(models), "nowhere": str(tmp_path / "nowhere")}
    args = [a.format(**subs) for a in case_args]
    if "-o" not in args:
        args += ["-o", str(results)]
    return ["bench", "-t", "1", "-p", "8", "-n", "2", "-r", "1", *args]  # the case's own values come last and win


def snapshot(*paths: Path) -> dict:
    """Bytes of every file under the given folders (what 'nothing half-written' compares)."""
    out = {}
    for root in paths:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.name.endswith(".lock"):
                out[str(p)] = p.read_bytes()
    return out


def check_one_line_error(exit_code: int, stderr: str, stdout: str, words: str) -> None:
    assert exit_code == 2, (exit_code, stdout, stderr)
    assert "Traceback" not in stderr + stdout
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("tuner: error: "), stderr
    assert words in lines[0], (words, lines[0])


@pytest.mark.parametrize("case_args,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_cli(bad, models, results, tmp_path, case_args, words):
    before = snapshot(results.parent, bad["afile"].parent)
    res = CliRunner().invoke(cli, argv(case_args, bad, models, results, tmp_path))
    check_one_line_error(res.exit_code, res.stderr, res.stdout, words)
    assert snapshot(results.parent, bad["afile"].parent) == before, "a failed command must write nothing"
    assert not (tmp_path / "nowhere").exists()


SUBPROCESS_CASES = [
    "truncated-header",
    "arch-clip",
    "ngl-below-minus-1",
    "results-not-parquet",
    "config-llama-bench-json",
    "config-malformed-toml",
]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_real_process(bad, models, results, tmp_path, case_id):
    case_args, words = next(c[1:] for c in CASES if c[0] == case_id)
    before = snapshot(results.parent, bad["afile"].parent)
    proc = subprocess.run(
        [str(TUNER), *argv(case_args, bad, models, results, tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    check_one_line_error(proc.returncode, proc.stderr, proc.stdout, words)
    assert snapshot(results.parent, bad["afile"].parent) == before


# `tuner search` (--dry-run plans a rig; nothing is measured or written either way)
SEARCH_CASES = [
    ("gpus-malformed", ["--dry-run", "--gpus", "24GB,lots"], "not a size: 'lots'"),
    ("gpus-zero", ["--dry-run", "--gpus", "0"], "every size must be above 0"),
    ("gpus-without-dry-run", ["--gpus", "24GiB"], "--gpus describes a rig to plan for: it needs --dry-run"),
    ("ram-without-dry-run", ["--ram", "256GiB"], "--ram describes a rig to plan for: it needs --dry-run"),
    (
        "tensor-split-more-than-gpus",
        ["--dry-run", "--gpus", "24GiB,24GiB", "--tensor-split", "1/1,2/1/1"],
        "--tensor-split 2/1/1: 3 shares for 2 GPU(s)",
    ),
    ("tensor-split-no-gpu", ["--tensor-split", "3/1"], "--tensor-split 3/1: 2 shares for 0 GPU(s)"),
    ("tensor-split-garbage", ["--dry-run", "--gpus", "24GiB,24GiB", "-ts", "3:1"], "bad --tensor-split '3:1'"),
    (
        "split-mode-unknown",
        ["--dry-run", "--gpus", "24GiB", "--split-mode", "diagonal"],
        "split_mode: unknown value(s) diagonal",
    ),
    ("json-without-dry-run", ["--json"], "--json prints a dry run's plan: add --dry-run"),
]


@pytest.mark.parametrize("case_args,words", [c[1:] for c in SEARCH_CASES], ids=[c[0] for c in SEARCH_CASES])
def test_bad_input_search(models, tmp_path, case_args, words):
    out = tmp_path / "results"
    res = CliRunner().invoke(
        cli,
        [
            "search",
            "-m",
            str(models / "tiny-q8_0.gguf"),
            "--results",
            str(out),
            "--no-wait",
            "--lock-file",
            str(tmp_path / "lock"),
            *case_args,
        ],
    )
    check_one_line_error(res.exit_code, res.stderr, res.stdout, words)
    assert not out.exists(), "a refused search writes nothing"


def test_unsupported_arch_library_error(bad):
    from tuner.model.meta import ModelError, read_model

    with pytest.raises(ModelError, match=r"unsupported architecture 'clip' \(not a llama.cpp text model\)"):
        read_model(bad["clip"])

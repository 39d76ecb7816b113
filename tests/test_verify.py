"""`tuner verify`: a tiny real study served by a real llama_cpp.server (a worker process), measured by a streaming
HTTP client; bad input is one line, exit 2, nothing written; a server that does not come up is exit 1 and recorded.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import HOST_ONLY

from tuner.cli import cli
from tuner.report.load import load_study
from tuner.report.render import study_blocks, to_markdown
from tuner.search import verify as verifylib

LLAMA_SERVER = Path(os.environ.get("TUNER_LLAMA_SERVER", "/tmp/llcpp/build/bin/llama-server"))


def run(args, **kw):
    return CliRunner().invoke(cli, args, **kw)


@pytest.fixture(scope="module")
def study(models, tmp_path_factory) -> Path:
    """A real two-config study of the tiny model at a tiny test shape (seconds), CPU only."""
    tmp = tmp_path_factory.mktemp("verify")
    args = ["search", "-m", str(models / "tiny-q8_0.gguf"), "-p", "24", "-n", "8", "-r", "2", "--ngl", "0"]
    args += ["--threads", "1:2", "--n-trials", "2", "--no-auto-space", "--no-quality", "--drift-every", "0"]
    args += ["--results", str(tmp), "--study", "tiny"]
    res = run(args, env={"TUNER_LOCK_FILE": str(tmp / "lock"), **HOST_ONLY})
    assert res.exit_code == 0, res.output
    return tmp / "tiny"


def copy_study(study: Path, dest: Path, **extra) -> Path:
    """The study's recommendation alone (what verify reads), with `extra` keys set in recommended.json."""
    dest.mkdir()
    rec = json.loads((study / "recommended.json").read_text())
    rec.update(extra)
    (dest / "recommended.json").write_text(json.dumps(rec))
    return dest


def test_verify_serves_the_recommendation_and_measures_it_from_a_client(study):
    res = run(["verify", str(study), "--requests", "3"], env=HOST_ONLY)
    assert res.exit_code == 0, res.output
    out = json.loads((study / "verify.json").read_text())
    assert out["server"] == "llama_cpp.server" and out["verdict"] == "ok"
    assert out["requests_ok"] == out["requests_sent"] == 3
    assert out["client_tg_tps"] > 0 and out["client_ttft_ms"] > 0
    rec = json.loads((study / "recommended.json").read_text())
    assert out["recommended_trial"] == rec["trial_number"]
    # the served kwargs are the recommended Llama(**kwargs)
    served = out["settings"]["models"][0]
    kwargs = rec["forms"]["llama_cpp_python"]
    assert served["model"] == kwargs["model_path"]
    assert {k: served[k] for k in kwargs if k != "model_path"} == {k: v for k, v in kwargs.items() if k != "model_path"}
    # prompts of the study's test shape as the server tokenizes them (never more), every request n_gen tokens
    assert out["test_shape"]["n_prompt"] == 24 and max(out["test_shape"]["prompt_tokens"]) <= 24
    assert all(r["n_gen"] == 8 and r["ok"] for r in out["levels"][0]["per_request"])
    st = out["study_figures"]
    assert out["ratio"]["tg"] == pytest.approx(out["client_tg_tps"] / st["tg_tps"])
    assert out["ratio"]["ttft"] == pytest.approx(out["client_ttft_ms"] / st["ttft_ms"])
    assert len(out["levels"]) == 1  # a study without --parallel: one at a time only
    # the config measured bare before and after serving: the ratio against this machine now as well
    now = out["bare_now"]
    assert [r["outcome"] for r in now["runs"]] == ["ok", "ok"] and now["tg_tps"] > 0
    assert out["ratio_now"]["tg"] == pytest.approx(out["client_tg_tps"] / now["tg_tps"])
    assert "bare now" in res.output
    # what the server adds is said, in the output and the file
    assert "HTTP" in res.output and "sampling" in res.output and "detokenization" in res.output
    assert "HTTP" in out["server_adds"]
    # and the report shows it
    md = to_markdown("r", study_blocks(load_study(study), [], top=3), "svg", study)
    assert "Served (tuner verify)" in md and "llama_cpp.server served trial" in md and "client / study" in md
    assert "bare now" in md


def test_a_parallel_study_is_also_served_n_at_a_time(study, tmp_path):
    """recommended.json's "parallel" (a --parallel search): N requests at a time after the sequential ones."""
    d = copy_study(
        study, tmp_path / "par", parallel={"n_seq": 2, "aggregate_tg_tps": 1000.0, "per_stream_tg_tps": 500.0}
    )
    res = run(["verify", str(d), "--requests", "2", "--warmup", "0", "--no-bare", "--json"], env=HOST_ONLY)
    assert res.exit_code == 0, res.output
    out = json.loads((d / "verify.json").read_text())
    assert [lv["concurrency"] for lv in out["levels"]] == [1, 2]
    assert out["requests_sent"] == out["requests_ok"] == 2 + 2 * 2
    par = out["levels"][1]
    assert par["requests"] == 4 and par["aggregate_tg_tps"] > 0
    assert out["ratio"]["aggregate_tg"] == pytest.approx(par["aggregate_tg_tps"] / 1000.0)
    assert out["ratio"]["per_stream_tg"] == pytest.approx(par["client_tg_tps"] / 500.0)
    # the study's figures are two streams' together: one request at a time is set against none of them
    assert out["ratio"]["tg"] is None and out["ratio"]["ttft"] is None
    assert any("one request at a time" in n for n in out["notes"])  # llama_cpp.server queues them
    assert "bare_now" not in out and json.loads(res.output[res.output.index("{") :]) == out


def one_line_exit_2(res, *needles):
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    for n in needles:
        assert n in res.output, res.output


def test_a_folder_without_a_recommendation(tmp_path):
    one_line_exit_2(run(["verify", str(tmp_path)]), "no recommended.json", "tuner search")
    one_line_exit_2(run(["verify", str(tmp_path / "nothing")]), "no study folder")
    (tmp_path / "recommended.json").write_text("{not json")
    one_line_exit_2(run(["verify", str(tmp_path)]), "cannot read")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recommended.json"]


def test_a_port_in_use(study, tmp_path):
    d = copy_study(study, tmp_path / "s")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        one_line_exit_2(run(["verify", str(d), "--port", str(port)]), f"cannot serve on 127.0.0.1:{port}", "in use")
    assert not (d / "verify.json").exists()


def test_a_missing_llama_server_binary(study, tmp_path):
    d = copy_study(study, tmp_path / "s")
    one_line_exit_2(run(["verify", str(d), "--llama-server", str(tmp_path / "no-such")]), "no such executable")
    (tmp_path / "not-exec").write_text("")
    one_line_exit_2(run(["verify", str(d), "--llama-server", str(tmp_path / "not-exec")]), "no such executable")
    assert not (d / "verify.json").exists()


def test_a_server_that_does_not_come_up_is_exit_1_and_recorded(study, tmp_path):
    """A real process that dies at start (as a llama-server refusing a flag does): its output in one line."""
    d = copy_study(study, tmp_path / "s")
    fake = tmp_path / "llama-server"
    fake.write_text('#!/bin/sh\necho "error: invalid argument: $1" >&2\nexit 1\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    res = run(["verify", str(d), "--llama-server", str(fake)])
    assert res.exit_code == 1, res.output
    assert len(res.output.strip().splitlines()) >= 1 and "Traceback" not in res.output
    assert "llama-server exited with code 1 before serving: error: invalid argument: -m" in res.output
    out = json.loads((d / "verify.json").read_text())
    assert out["verdict"] == "failed" and out["requests_ok"] == 0 and "invalid argument" in out["error"]
    assert out["command"][0] == str(fake) and out["command"][1:3] == ["-m", out["command"][2]]


@pytest.mark.skipif(not LLAMA_SERVER.is_file(), reason=f"no llama-server binary at {LLAMA_SERVER} (TUNER_LLAMA_SERVER)")
def test_the_printed_llama_server_line_serves(study, tmp_path):
    """The printed command line run by a real llama-server built from the vendored source (TUNER_LLAMA_SERVER)."""
    d = copy_study(study, tmp_path / "s")
    res = run(["verify", str(d), "--llama-server", str(LLAMA_SERVER), "--requests", "2", "--no-bare"], env=HOST_ONLY)
    assert res.exit_code == 0, res.output
    out = json.loads((d / "verify.json").read_text())
    rec = json.loads((d / "recommended.json").read_text())
    assert out["server"] == "llama-server" and out["verdict"] == "ok" and out["requests_ok"] == 2
    assert out["command"][1:-4] == rec["forms"]["llama_server_argv"][1:]  # the printed line, then host and port
    assert out["client_tg_tps"] > 0 and all(r["n_gen"] == 8 for r in out["levels"][0]["per_request"])


def test_library_concurrency():
    assert verifylib.study_concurrency({"config": {}}) == 1
    assert verifylib.study_concurrency({"config": {}, "parallel": {"n_seq": 4}}) == 4

"""llama.cpp's RPC backend as devices: real `tuner rpc-server` processes on 127.0.0.1, real trials over them.

Each server is this machine's CPU served as a device of a given size (`--mem`): what it reports and what its
buffers may take agree, so a model share that does not fit fails as on a too-small GPU.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tuner import ports
from tuner.measure import hardware, rpc, store
from tuner.measure.runner import Runner, resolve
from tuner.record import TrialConfig
from tuner.units import parse_size

TUNER = str(Path(sys.executable).with_name("tuner"))
MiB = 1 << 20
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")  # client and servers on 2 cores: no spinning at barriers


def Server(mem: str | None, tmp: Path) -> rpc.LocalServer:  # noqa: N802 - reads as the class it returns
    """A `tuner rpc-server` of `mem` (e.g. "40MiB") on a free port, logging into tmp."""
    return rpc.LocalServer(parse_size(mem) if mem else None, tmp)


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rpc")
    servers = [Server("64MiB", tmp), Server("64MiB", tmp)]
    yield servers
    for s in servers:
        s.stop()


def bench_args(model: Path, rpc_arg: str, out: Path, *extra: str) -> list[str]:
    """`tuner bench` of a short test (-t 1 -p 16 -n 4 -r 1) over RPC servers, its record printed as JSON."""
    return [
        "bench",
        str(model),
        *extra,
        "-t",
        "1",
        "-p",
        "16",
        "-n",
        "4",
        "-r",
        "1",
        "--rpc",
        rpc_arg,
        "-o",
        str(out),
        "--json",
    ]


def run(*args, timeout=300):
    return subprocess.run([TUNER, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def test_endpoints_parse_as_llama_server_spells_them():
    assert rpc.parse_endpoints("127.0.0.1:50052, 10.0.0.2:50053") == ("127.0.0.1:50052", "10.0.0.2:50053")
    assert rpc.parse_endpoints("") == ()
    for bad in ("127.0.0.1", "host:", ":50052", "h:99999", "h:1,h:1"):
        with pytest.raises(rpc.RpcError):
            rpc.parse_endpoints(bad)


def test_hw_lists_each_server_as_a_device_of_its_size(two_servers):
    res = run("hw", "--json", "--rpc", ",".join(s.endpoint for s in two_servers))
    assert res.returncode == 0, res.stderr
    devices = json.loads(res.stdout)["devices"]
    remote = [d for d in devices if d["backend"] == "RPC"]
    # llama.cpp's own list: each server a GPU-type device named by its endpoint, of the size it was given
    assert [d["description"] for d in remote] == [s.endpoint for s in two_servers]
    assert all(d["type"] == "gpu" and d["total"] == 64 * MiB for d in remote)
    assert any(d["type"] == "cpu" for d in devices)


def test_bench_splits_the_layers_over_two_servers(two_servers, models, tmp_path):
    out = tmp_path / "b.parquet"
    res = run(
        *bench_args(
            models / "moe-q8_0.gguf", ",".join(s.endpoint for s in two_servers), out, "-ngl", "99", "-ts", "1/1"
        )
    )
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["outcome"] == "ok" and rec["config"]["rpc"] == ",".join(s.endpoint for s in two_servers)
    # llama.cpp's own buffers, per device: both servers hold a share of the weights, a KV cache and compute
    for s in two_servers:
        (name,) = [b for b in rec["buffers"] if b.endswith(f"[{s.endpoint}]")]
        assert rec["buffers"][name]["model"] > 0 and rec["buffers"][name]["kv"] > 0
        assert rec["buffers"][name]["compute"] > 0
    assert rec["n_gpu_layers_effective"] == rec["model_n_layer"] + 1


def test_a_device_too_small_fails_the_trial_as_oom_and_the_server_goes_on(models, tmp_path):
    small = Server("16MiB", tmp_path)  # the MoE's weights are ~83 MiB
    try:
        out = tmp_path / "b.parquet"
        args = bench_args(models / "moe-q8_0.gguf", small.endpoint, out)
        res = run(*args, "-ngl", "99")
        assert res.returncode == 1
        rec = json.loads(res.stdout)
        assert rec["outcome"] == "oom" and f"unable to allocate RPC0[{small.endpoint}] buffer" in rec["cause"]
        assert "refused a buffer" in small.log.read_text()
        assert small.proc.poll() is None  # still serving
        res = run(*args, "-ngl", "1")  # one layer: fits the device
        assert res.returncode == 0, res.stderr
        rec = json.loads(res.stdout)
        (name,) = [b for b in rec["buffers"] if b.startswith("RPC")]
        assert 0 < rec["buffers"][name]["model"] < 16 * MiB
    finally:
        small.stop()


def test_a_server_that_died_is_a_failed_trial_and_the_runner_goes_on(models, tmp_path):
    gone = Server(None, tmp_path)
    gone.stop()  # it was there when the search started; now nothing listens
    cfg = resolve(
        TrialConfig(
            model=str(models / "tiny-q8_0.gguf"), n_threads=1, n_prompt=8, n_gen=2, repetitions=1, rpc=gone.endpoint
        )
    )
    with Runner(timeout=120) as r:
        rec = r.run(cfg)
        assert rec.outcome == "crash" and rec.signal == signal.SIGABRT
        assert "failed to connect" in rec.cause.lower(), rec.cause
        again = r.run(
            resolve(TrialConfig(model=str(models / "tiny-q8_0.gguf"), n_threads=1, n_prompt=8, n_gen=2, repetitions=1))
        )
        assert again.ok


def test_rpc_server_bad_input_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        res = run("rpc-server", "--port", str(busy), timeout=60)
    assert (
        res.returncode == 2 and res.stderr.startswith("tuner: error: cannot serve on") and res.stderr.count("\n") == 1
    ), res.stderr
    res = run("rpc-server", "--port", str(ports.free_port()), "--mem", "100TiB", timeout=60)
    assert res.returncode == 2 and "more than this host's RAM" in res.stderr and res.stderr.count("\n") == 1
    res = run("rpc-server", "--port", str(ports.free_port()), "--sizing-only", timeout=60)
    assert res.returncode == 2 and "--sizing-only needs --mem" in res.stderr and res.stderr.count("\n") == 1


def test_a_sizing_only_server_is_a_device_of_its_size_that_holds_nothing(models, tmp_path):
    # 100 TiB, far past this host's RAM: llama.cpp sees a device of that size; a real load is refused at its first
    # buffer, as a failed trial, and the server goes on
    stand_in = rpc.LocalServer(100 << 40, tmp_path, sizing_only=True)
    try:
        (dev,) = hardware.rpc_devices((stand_in.endpoint,))
        assert dev["total"] == dev["free"] == 100 << 40
        out = tmp_path / "b.parquet"
        res = run(*bench_args(models / "moe-q8_0.gguf", stand_in.endpoint, out), "-ngl", "99")
        rec = json.loads(res.stdout)
        assert res.returncode == 1 and rec["outcome"] == "oom", rec["cause"]
        assert "this device only sizes" in stand_in.log.read_text() and stand_in.proc.poll() is None
    finally:
        stand_in.stop()


def test_bench_refuses_a_malformed_or_unreachable_endpoint_before_anything_runs(models, tmp_path):
    out = tmp_path / "b.parquet"
    for endpoint, words in (("127.0.0.1", "expected HOST:PORT"), (f"127.0.0.1:{ports.free_port()}", "no RPC server")):
        res = run("bench", str(models / "tiny-q8_0.gguf"), "--rpc", endpoint, "-o", str(out), timeout=60)
        assert res.returncode == 2 and words in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not out.exists()


def test_a_search_over_two_small_servers_lands_in_the_hybrid_region(models, tmp_path):
    # two 40 MiB devices: the MoE's dense weights, KV cache and buffers fit, its 76.5 MiB of experts do not
    servers = [Server("40MiB", tmp_path), Server("40MiB", tmp_path)]
    try:
        rpc_arg = ",".join(s.endpoint for s in servers)
        common = [
            "search",
            "-m",
            str(models / "moe-q8_0.gguf"),
            "--rpc",
            rpc_arg,
            "-p",
            "16",
            "-n",
            "4",
            "-r",
            "1",
            "--headroom",
            "2MiB",
            "-c",
            "512",
            "-ub",
            "512",
            "-fa",
            "on",
            "-t",
            "1",
            "-tb",
            "1",
            "--results",
            str(tmp_path),
            "--fit-target",
            "2",  # llama-server's margin scaled to the devices, as --headroom
        ]
        res = run(*common, "--dry-run", "--json")
        assert res.returncode == 0, res.stderr
        plan = json.loads(res.stdout)
        dims = plan["dimensions"]
        n_all = 7  # 6 blocks + the output layer
        assert dims["n_gpu_layers"] == [n_all] and min(dims["n_cpu_moe"]) >= 0, dims
        assert dims["moe_part"] == ["none", "down", "gate_down", "ffn"], dims  # finer than whole layers
        assert [g["vram_total"] for g in plan["rig"]["gpus"]] == [40 * MiB, 40 * MiB]
        listed = {b["label"]: b for b in plan["baselines"]}
        fitted = listed["llama-server default (--fit)"]
        # fit's placement over the two servers: experts of some layers (or part of one) in host RAM
        assert fitted["fit_status"] == "success" and "-ot" in fitted["fit_flags"], fitted
        assert fitted["space_point"]["n_cpu_moe"] + (fitted["space_point"]["moe_part"] != "none") >= 1
        # the compute buffers of its placements came from llama.cpp, asked before anything ran
        (asked,) = [n for n in plan["notes"] if n.startswith("llama.cpp sized the compute buffers of")]
        assert int(asked.split(" of ")[1].split()[0]) > 0 and "unanswered" not in asked, asked

        res = run(*common, "--study", "rig", "--n-trials", "6", "--no-confirm", timeout=600)
        assert res.returncode == 0, res.stderr
        rec = json.loads((tmp_path / "rig" / "recommended.json").read_text())
        cfg = rec["config"]
        assert cfg["n_gpu_layers"] == n_all and (cfg["n_cpu_moe"] >= 1 or cfg["moe_part"] != "none" or cfg["overrides"])
        assert f"--rpc {rpc_arg}" in rec["forms"]["llama_server"]
        recs = store.records(tmp_path / "rig")
        by_label = {r.baseline: r for r in recs if r.baseline}
        defaults = by_label["llama.cpp defaults"]
        # all layers and every expert on 2 x 40 MiB: the device runs out, a failed trial with llama.cpp's cause
        assert defaults.outcome == "oom" and "RPC0[" in defaults.cause
        # llama-server's own placement measured as it is (its -ot overrides), and the community recipe
        fitted_rec = by_label["llama-server default (--fit)"]
        assert fitted_rec.ok and fitted_rec.config.overrides, fitted_rec.cause
        assert fitted_rec.config.tensor_split == fitted["config"]["tensor_split"]
        assert by_label["community recipe (-ngl 99, the fewest --n-cpu-moe that fits)"].config.n_cpu_moe >= 1
        assert rec["baselines"]["llama-server default (--fit)"]["outcome"] == "ok"
        for r in recs:
            if r.ok:  # what llama.cpp allocated on each device stayed within the device
                on_rpc = {k: sum(v.values()) for k, v in r.buffers.items() if k.startswith("RPC")}
                assert on_rpc and all(n <= 40 * MiB for n in on_rpc.values()), on_rpc
    finally:
        for s in servers:
            s.stop()


def test_estimate_plans_each_server_as_its_own_device(two_servers, models):
    rpc_arg = ",".join(s.endpoint for s in two_servers)
    res = run("estimate", str(models / "moe-q8_0.gguf"), "--rpc", rpc_arg, "--ctx", "512", "--headroom", "0", "--json")
    assert res.returncode == 0, res.stderr
    est = json.loads(res.stdout)[0]
    # each server by the name llama.cpp gives its buffers, at the size it reports (--mem)
    assert [d["name"] for d in est["devices"]] == [f"RPC0[{s.endpoint}]" for s in two_servers]
    assert [d["vram"] for d in est["devices"]] == [64 * MiB, 64 * MiB]
    row = est["contexts"][0]
    # judged per device, never as one pool: every device's share within its own 64 MiB
    assert len(row["gpu_by_device"]) == 2 and all(0 < v <= 64 * MiB for v in row["gpu_by_device"]), row
    assert row["min_n_cpu_moe"] is not None
    res = run("estimate", str(models / "moe-q8_0.gguf"), "--rpc", f"127.0.0.1:{ports.free_port()}")
    assert res.returncode == 2 and "no RPC server" in res.stderr and "Traceback" not in res.stderr


def test_quality_runs_its_passes_on_the_servers_devices(two_servers, models, tmp_path):
    rpc_arg = ",".join(s.endpoint for s in two_servers)
    ref, q = models / "tiny-f16.gguf", models / "tiny-q4_k_m.gguf"
    common = ["quality", "-m", str(ref), "-m", str(q), "-c", "64", "-t", "1", "--no-cache", "--json"]
    over_rpc = run(*common, "-ngl", "99", "--rpc", rpc_arg, "--results", str(tmp_path / "a"))
    assert over_rpc.returncode == 0, over_rpc.stderr
    local = run(*common, "-ngl", "0", "--results", str(tmp_path / "b"))
    assert local.returncode == 0, local.stderr
    a, b = (json.loads(r.stdout) for r in (over_rpc, local))
    # the same files, the same text: the KL divergence does not depend on which device computed it
    assert a[1]["kld_mean"] > 0 and a[1]["kld_mean"] == pytest.approx(b[1]["kld_mean"], rel=0.05)
    res = run("quality", "-m", str(q), "--rpc", f"127.0.0.1:{ports.free_port()}")
    assert res.returncode == 2 and "no RPC server" in res.stderr and "Traceback" not in res.stderr

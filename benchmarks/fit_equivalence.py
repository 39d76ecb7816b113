#!/usr/bin/env python3
"""tuner's port of llama.cpp's --fit (tuner.plan.fit) against `llama-fit-params` built from the same llama.cpp.

Devices: RPC servers (`ggml-rpc-server`) on this host, each a "GPU" to llama.cpp that reports the host's RAM as its
free memory; a `--fit-target` margin of (host RAM - wanted size) makes it a device of the wanted size for the fit
(tests/data/fit_equivalence.json records what this saw). For each model shape × devices × margins × context, it
runs llama-fit-params and the port and compares the printed flags as strings, twice:

- `planner`: the port on the planner's memory figures (what `tuner search --gpus ... --dry-run` can do: no
  devices, no weights);
- `llama`: the port on llama.cpp's own no_alloc figures for each measurement it asks for (`llama-fit-params
  --fit-print on` with the same -c/-ngl/-ts/-ot: whole MiB), which separates the search from the figures;
- `stand_in`: a described rig as `tuner search --gpus ... --dry-run` plans it now: GPUs CUDA0.. of (size + 1024)
  MiB at the default margin, the port on llama.cpp's figures from sizing-only `tuner rpc-server`s standing in for
  them (tuner.plan.llama_sizes.LlamaSizes.stand_in), against llama-fit-params on those same servers.

Shapes: the synthetic `moe` (8 layers... see tuner.model.synth) and `dense` models, and sparse files of the
oracle's large MoE shapes (real headers, data regions that are holes: llama.cpp sizes them with no_alloc, never
reading a weight).

    python benchmarks/fit_equivalence.py --fit-params /tmp/llcpp/build/bin/llama-fit-params \
        --rpc-server /tmp/llcpp/build/bin/ggml-rpc-server          # ~10 min on 2 cores

Writes benchmarks/results/fit-equivalence-*.json (and, with --fixtures, the test fixture); exits 1 when a
`planner` comparison differs and --strict is given.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import model_facts, save  # noqa: E402
from tuner.model.meta import read_model  # noqa: E402
from tuner.plan import fit as F  # noqa: E402
from tuner.plan import oracle, planner  # noqa: E402
from tuner.plan.llama_sizes import LlamaSizes  # noqa: E402
from tuner.record import TrialConfig  # noqa: E402

MiB = 1 << 20
CACHE = Path(os.environ.get("TUNER_TEST_MODELS", Path.home() / ".cache" / "tuner-test-models"))
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "fit_equivalence.json"
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", GGML_NO_BACKTRACE="1")


def host_ram() -> int:
    """What a CPU device (an RPC server on this host) reports as free and total: ggml-cpu's
    sysconf(_SC_PHYS_PAGES) × sysconf(_SC_PAGE_SIZE)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class RpcServers:
    """`ggml-rpc-server -p PORT` per endpoint on 127.0.0.1, stopped (by their own pids) on exit."""

    def __init__(self, binary: str, ports: list[int]):
        self.binary, self.ports, self.procs = binary, ports, []

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def __enter__(self):
        for p in self.ports:
            self.procs.append(
                subprocess.Popen(
                    [self.binary, "-p", str(p), "-t", "1"],
                    env=ENV,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for p, proc in zip(self.ports, self.procs):
            for _ in range(100):
                if proc.poll() is not None:
                    raise RuntimeError(f"ggml-rpc-server on port {p} exited with {proc.returncode}")
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", p)) == 0:
                        break
                time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def fit_params_cmd(
    binary: str,
    model: str,
    endpoints: list[str],
    margins_mib: list[int] | None = None,
    n_ctx: int | None = None,
    n_ctx_min: int | None = None,
    extra: list[str] = (),
) -> list[str]:
    cmd = [binary, "-m", model, "--rpc", ",".join(endpoints)]  # --rpc first: -ot looks devices up as it parses
    if margins_mib is not None:
        cmd += ["-fitt", ",".join(str(m) for m in margins_mib)]
    if n_ctx is not None:
        cmd += ["-c", str(n_ctx)]
    if n_ctx_min is not None:
        cmd += ["-fitc", str(n_ctx_min)]
    return cmd + list(extra)


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def llama_breakdown(binary: str, info, model: str, endpoints: list[str], calls: list) -> F.Breakdown:
    """llama.cpp's own per-device figures for a config: `llama-fit-params --fit-print on -v` with the config's
    -c/-ngl/-ts/-ot. It prints model, context and compute in whole MiB (floored) and logs each compute buffer to
    0.01 MiB: the compute comes from the log; model and context from the planner (exact: every tensor's size from
    the header, padded as llama.cpp pads it; the KV cache) and are checked against llama.cpp's floored figures
    (a mismatch is recorded in `calls`)."""
    devices = F.rpc_devices(endpoints, host_ram())

    def breakdown(cfg: TrialConfig) -> list[F.Usage]:
        extra = ["-fitp", "on", "-v", "-ngl", str(cfg.n_gpu_layers)]
        if cfg.tensor_split:
            extra += ["-ts", cfg.tensor_split]
        if cfg.overrides:
            extra += ["-ot", ",".join(cfg.overrides)]
        cmd = fit_params_cmd(binary, model, endpoints, n_ctx=cfg.n_ctx, extra=extra)
        p = run(cmd)
        rows = [ln.split() for ln in p.stdout.splitlines() if ln.strip()]
        if p.returncode != 0 or len(rows) != len(endpoints) + 1:
            raise F.FitError(f"llama-fit-params --fit-print failed ({p.returncode}): {p.stderr[-300:]}")
        logged = {b: round(float(m) * MiB) for b, m in COMPUTE_RE.findall(p.stderr)}
        mine = F.device_usage(cfg, info, [d.free for d in devices], tuple(d.name for d in devices), no_alloc=True)
        out, mismatch = [], []
        for i, (r, u) in enumerate(zip(rows, mine)):
            name = devices[i].name if i < len(devices) else "CPU"
            # the host's figures do not enter a fit with devices (and llama.cpp's no_alloc host "model" is not the
            # file's host share): only the devices' are checked
            if i < len(devices) and (u.model // MiB, u.context // MiB) != (int(r[-3]), int(r[-2])):
                mismatch.append(
                    {
                        "device": name,
                        "llama_mib": [int(r[-3]), int(r[-2])],
                        "planner_mib": [u.model // MiB, u.context // MiB],
                    }
                )
            out.append(F.Usage(u.model, u.context, logged.get(name, int(r[-1]) * MiB)))
        calls.append(
            {
                "args": shlex.join(cmd[3:]),
                "compute_llama": [x.compute for x in out],
                "compute_planner": [x.compute for x in mine],
                "mismatch": mismatch,
            }
        )
        return out

    return breakdown


def stand_in(binary: str, info, model: str, case: dict) -> dict:
    """The case as a described rig: GPUs of (size + 1024) MiB, fitted at the default margin by the port on
    llama.cpp's figures from sizing-only servers standing in for them (what `tuner search --gpus` does), and by
    llama-fit-params on the same servers (its RPC names read back as CUDA0..)."""
    totals = [(d + 1024) * MiB for d in case["device_mib"]]
    names = [f"CUDA{i}" for i in range(len(totals))]
    sizes = LlamaSizes.stand_in(totals, names)
    try:
        eps = sizes.rpc.split(",")
        # first llama-fit-params, then the port: a server serves one client at a time
        p = run(fit_params_cmd(binary, model, eps, None, case["n_ctx"] or None))
        line = p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else None
        for theirs, ours in zip(sizes.names, names):
            line = line.replace(theirs, ours) if line else line
        devices = [F.DeviceMemory(free=t, total=t, name=n) for t, n in zip(totals, names)]
        t0 = time.perf_counter()
        res = F.fit(
            info,
            devices,
            F.server_config(model, n_ctx=case["n_ctx"]),
            1024 * MiB,
            breakdown=F.planner_breakdown(info, devices, sizes),
        )
        took = time.perf_counter() - t0
    finally:
        sizes.freeze()
    flags = res.to_flags() if res.ok else None
    out = {"stand_in_llama": line, "stand_in_equal": flags == line, "stand_in_s": round(took, 2)}
    out.update({} if flags == line else {"stand_in": flags, "stand_in_unanswered": sizes.summary()["unanswered"]})
    return out


COMPUTE_RE = re.compile(r"sched_reserve:\s+(\S+) compute buffer size =\s+([\d.]+) MiB")


def shapes(out: Path, which: list[str]) -> list[dict]:
    """The models compared: name, path, what it is."""
    from tuner.model.synth import synthesize  # noqa: PLC0415 - loads llama_cpp (the quantizer): only here

    found = []
    if "moe" in which:
        found.append(
            {
                "shape": "moe",
                "path": str(synthesize(CACHE, "moe", ("q8_0",))[0]),
                "what": "synthetic Mixtral-style MoE (tuner synth moe, q8_0)",
            }
        )
    if "dense" in which:
        found.append(
            {
                "shape": "dense",
                "path": str(synthesize(CACHE, "dense", ("q4_0",))[0]),
                "what": "synthetic dense llama (tuner synth dense, q4_0)",
            }
        )
    for arch in ("qwen3moe", "gpt-oss", "deepseek2", "glm4moe", "llama"):
        if arch in which:
            found.append(
                {
                    "shape": arch,
                    "path": str(oracle.model_file(arch, out)),
                    "what": f"sparse {oracle.shape(arch).name} (real header, no weights)",
                }
            )
    return found


def cases(path: str, ram_mib: int) -> list[dict]:
    """Devices (MiB each; None: llama.cpp's default margin of 1024 MiB on the whole reported RAM) and context (0:
    unset) per model: sizes where the fit has work to do, never above what a server reports (the host's RAM)."""
    info = read_model(path)
    total = sum(t.n_bytes for t in info.tensors) // MiB
    out = []
    for n_dev in (1, 2):
        if total < ram_mib // 4:  # small models: fractions of the weights + a 4096-cell KV cache
            kv = (
                sum(planner.kv_layer_bytes(TrialConfig(model=path, n_ctx=4096), info, il) for il in range(info.n_layer))
                // MiB
            )
            fracs = (0.15, 0.3, 0.45, 0.6, 0.75, 1.2) if info.is_moe else (0.2, 0.35, 0.5, 0.7, 0.85, 1.2)
            sizes = [max(int((total + kv) * f / n_dev), 1) for f in fracs]
        else:  # large models: real GPU sizes, up to the default margin's
            sizes = [6144, 12288, 20480, None]
        for dev in sizes:
            for ctx in (0, 4096):
                out.append({"n_dev": n_dev, "device_mib": [dev] * n_dev, "n_ctx": ctx})
    if total < ram_mib // 4:  # unequal devices; room for the weights and part of the trained context (n_ctx between)
        out.append({"n_dev": 2, "device_mib": [int(total * 0.4), int(total * 0.15)], "n_ctx": 4096})
        full = (
            total
            + sum(
                planner.kv_layer_bytes(TrialConfig(model=path, n_ctx=info.n_ctx_train), info, il)
                for il in range(info.n_layer)
            )
            // MiB
        )
        for f in (0.3, 0.6):
            out.append({"n_dev": 1, "device_mib": [int(full * f)], "n_ctx": 0})
            out.append({"n_dev": 2, "device_mib": [int(full * f / 2)] * 2, "n_ctx": 0})
    else:
        out.append({"n_dev": 2, "device_mib": [16384, 8192], "n_ctx": 4096})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fit-params", required=True, help="llama-fit-params built from the vendored llama.cpp")
    ap.add_argument("--rpc-server", required=True, help="ggml-rpc-server from the same build")
    ap.add_argument(
        "--shape", action="append", help="moe, dense, qwen3moe, gpt-oss, deepseek2, glm4moe, llama (default: all)"
    )
    ap.add_argument("--ports", default="50152,50153")
    ap.add_argument("--no-llama", action="store_true", help="skip the port on llama.cpp's own figures (slow)")
    ap.add_argument("--no-stand-in", action="store_true", help="skip the described rig on sizing-only servers")
    ap.add_argument("--fixtures", action="store_true", help=f"also write the test fixture {FIXTURE}")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a planner comparison differs")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    which = args.shape or ["moe", "dense", "qwen3moe", "gpt-oss", "deepseek2", "glm4moe", "llama"]
    ram = host_ram()
    version = run([args.fit_params, "--version"])
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="fit-eq-") as tmp,
        RpcServers(args.rpc_server, [int(p) for p in args.ports.split(",")]) as srv,
    ):
        endpoints = srv.endpoints
        for m in shapes(Path(tmp), which):
            info = read_model(m["path"])
            for c in cases(m["path"], ram // MiB):
                eps = srv.endpoints[: c["n_dev"]]
                margins_mib = [1024 if d is None else ram // MiB - d for d in c["device_mib"]]
                c["device_mib"] = [ram // MiB - mm for mm in margins_mib]
                cmd = fit_params_cmd(args.fit_params, m["path"], eps, margins_mib, c["n_ctx"] or None)
                t0 = time.perf_counter()
                p = run(cmd)
                took = time.perf_counter() - t0
                line = p.stdout.strip().splitlines()[-1] if p.returncode == 0 and p.stdout.strip() else None
                devices = F.rpc_devices(eps, ram)
                cfg = F.server_config(m["path"], n_ctx=c["n_ctx"])
                t0 = time.perf_counter()
                port = F.fit(info, devices, cfg, [mm * MiB for mm in margins_mib])
                took_port = time.perf_counter() - t0
                row = {
                    "shape": m["shape"],
                    **c,
                    "margins_mib": margins_mib,
                    "command": shlex.join(["llama-fit-params"] + cmd[1:]).replace(m["path"], m["shape"] + ".gguf"),
                    "llama_rc": p.returncode,
                    "llama": line,
                    "llama_s": round(took, 2),
                    "planner": port.to_flags() if port.ok else None,
                    "planner_status": port.status,
                    "planner_measured": port.n_measured,
                    "planner_s": round(took_port, 3),
                }
                row["planner_equal"] = row["planner"] == line
                if not args.no_llama:
                    calls: list = []
                    bd = llama_breakdown(args.fit_params, info, m["path"], eps, calls)
                    try:
                        own = F.fit(info, devices, cfg, [mm * MiB for mm in margins_mib], breakdown=bd)
                        row["llama_figures"] = own.to_flags() if own.ok else None
                        row["llama_figures_status"] = own.status
                    except F.FitError as e:
                        row["llama_figures"], row["llama_figures_status"] = None, f"error: {e}"
                    row["llama_figures_equal"] = row["llama_figures"] == line
                    if row["llama_figures_equal"]:
                        del row["llama_figures"]  # the same string as "llama"
                    row["llama_figures_measured"] = len(calls)
                    row["model_context_mismatches"] = [c for c in calls if c["mismatch"]]
                    row["compute_error_max_mib"] = (
                        round(
                            max(
                                abs(a - b)
                                for c in calls
                                for a, b in zip(c["compute_llama"][:-1], c["compute_planner"][:-1])
                            )
                            / MiB,
                            2,
                        )
                        if calls
                        else None
                    )
                if not args.no_stand_in:
                    row.update(stand_in(args.fit_params, info, m["path"], c))
                if not row["planner_equal"]:
                    row["planner_trace"] = port.trace
                rows.append(row)
                if row["planner_equal"]:
                    row["planner"] = "=="  # the same string as "llama" (kept short)
                own = "" if args.no_llama else f"(llama figures {'==' if row['llama_figures_equal'] else '!='}) "
                own += "" if args.no_stand_in else f"(stand-in {'==' if row['stand_in_equal'] else '!='}) "
                print(
                    f"{m['shape']:<9} {c['n_dev']}x{c['device_mib'][0]:>6} MiB c={c['n_ctx']:<5} "
                    f"{'==' if row['planner_equal'] else '!='} {own}{line}"
                    + ("" if row["planner_equal"] else f"\n{'':>34}port: {row['planner']}"),
                    flush=True,
                )
        models = {
            m["shape"]: {**model_facts(m["path"]), "what": m["what"], "path": m["shape"] + ".gguf"}
            for m in shapes(Path(tmp), which)
        }
    summary = {"cases": len(rows), "planner_equal": sum(r["planner_equal"] for r in rows)}
    if not args.no_llama:
        summary["llama_figures_equal"] = sum(r["llama_figures_equal"] for r in rows)
    if not args.no_stand_in:
        summary["stand_in_equal"] = sum(r["stand_in_equal"] for r in rows)
    result = {
        "host_ram": ram,
        "endpoints": endpoints,
        "llama_fit_params_version": (version.stdout + version.stderr).strip(),
        "rpc_server": Path(args.rpc_server).name,
        "models": models,
        "summary": summary,
        "rows": rows,
    }
    path = save("fit-equivalence", result, echo=False)
    print(summary, file=sys.stderr)
    if args.fixtures:
        _write_fixture(result, path)
    return 1 if args.strict and summary["planner_equal"] < summary["cases"] else 0


def _write_fixture(result: dict, source: Path) -> None:
    import json  # noqa: PLC0415 - only the fixture writer

    keep = (
        "shape",
        "n_dev",
        "device_mib",
        "n_ctx",
        "margins_mib",
        "command",
        "llama_rc",
        "llama",
        "planner",
        "planner_equal",
        "llama_figures_equal",
        "stand_in_llama",
        "stand_in_equal",
        "stand_in",
    )
    fx = {
        "source": str(source.relative_to(Path(__file__).resolve().parents[1])),
        "host_ram": result["host_ram"],
        "endpoints": result["endpoints"],
        "llama_fit_params_version": result["llama_fit_params_version"],
        "models": {
            k: {kk: v[kk] for kk in ("arch", "file_type", "size_bytes", "n_params", "what")}
            for k, v in result["models"].items()
        },
        "cases": [
            {k: r[k] for k in keep if k in r and not (k == "planner" and r["planner_equal"])} for r in result["rows"]
        ],
    }
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(fx, indent=1) + "\n")
    print(f"wrote {FIXTURE}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

"""`tuner bench` as a library: resolve one config against its model, measure it, print it llama-bench style."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from tuner.errors import TunerError
from tuner.measure import rpc, store
from tuner.measure.lock import measurement_lock
from tuner.measure.runner import Runner, TrialInterrupted, resolve
from tuner.model.meta import read_model
from tuner.plan import planner, roofline
from tuner.record import TrialConfig, TrialRecord, invalid_reason, parse_tensor_split
from tuner.tables import markdown_table
from tuner.units import fmt_params, fmt_size


def table(recs: list[TrialRecord]) -> str:
    """A llama-bench style markdown table: one line per test (pp512, tg128, ttft), mean ± sd.

    llama-bench's GitHub markdown layout (padded columns, alignment colons): users put the two side by side."""
    head = ["model", "size", "params", "ngl", "threads", "n_batch", "n_ubatch", "fa", "test", "t/s"]
    rows = []
    for r in recs:
        c = r.config
        base = [
            f"{r.model_name or c.model} {r.model_file_type}",
            fmt_size(r.model_size_bytes),
            fmt_params(r.model_n_params),
            str(c.n_gpu_layers),
            str(c.n_threads),
            str(c.n_batch),
            str(c.n_ubatch),
            c.flash_attn,
        ]
        depth = f" @ d{c.n_depth}" if c.n_depth else ""
        if not r.ok:
            rows.append(base + ["-", f"{r.outcome}: {r.cause[:60]}"])
            continue
        for name, n, unit in (("pp", c.n_prompt, "t/s"), ("tg", c.n_gen, "t/s"), ("ttft", c.n_prompt, "ms")):
            mean, sd = r.metric(name)
            if mean is not None:
                label = f"ttft p{n}" if name == "ttft" else f"{name}{n}"
                rows.append(base + [label + depth, f"{mean:.2f} ± {sd:.2f}" + (" ms" if unit == "ms" else "")])
    return markdown_table(head, rows, right={1, 2, 3, 4, 5, 6, 9})


def summary(r: TrialRecord) -> str:
    """Memory and load figures that llama-bench does not print."""
    parts = [
        f"load {r.load_ms:.0f} ms" if r.load_ms is not None else None,
        f"peak RSS {fmt_size(r.peak_rss_bytes)}",
        f"peak VRAM {fmt_size(r.peak_vram_bytes)}" if r.peak_vram_bytes is not None else None,
        f"swap-in {fmt_size(r.swap_in_bytes)}" if r.swap_in_bytes else None,
        f"tg {100 * r.metric('tg')[0] / r.tg_roofline_ts:.0f}% of the bandwidth bound"
        if r.tg_roofline_ts and r.metric("tg")[0]
        else None,
        f"wall {r.wall_s:.1f} s" if r.wall_s is not None else None,
    ]
    return ", ".join(p for p in parts if p)


class BenchError(TunerError):
    """Bad input for one measurement: a one-line message naming the problem."""


@dataclasses.dataclass
class BenchResult:
    record: TrialRecord
    out: object  # the Parquet file the record was appended to (a Path)
    interrupted: bool = False  # Ctrl-C: the trial was stopped and recorded as such


def measure(
    model: str,
    out="results/bench.parquet",
    timeout: float = 600.0,
    mem_limit: int | None = None,
    no_wait: bool = False,
    lock_file: str | None = None,
    load_timeout: float | None = None,
    **params,
) -> BenchResult:
    """`tuner bench` as a call: resolve one config against its model, measure it in a worker, append the record.

    params are TrialConfig fields (n_threads=2, n_prompt=512, overrides=("exps=CPU",), ...); None means the
    default. The planner's prediction (calibrated on earlier trials in `out`) and the bandwidth bound are added.
    Raises BenchError (or ModelError, LockBusy, StoreError) before anything runs.
    """
    info = read_model(model)
    given = {k: v for k, v in params.items() if v is not None and v != ()}
    if "overrides" in given:
        given["overrides"] = tuple(given["overrides"])
    for item in given.get("overrides", ()):
        if "=" not in item or not item.split("=", 1)[0]:
            raise BenchError(f"bad --override-tensor {item!r}: expected PATTERN=BUFFER")
    if given.get("tensor_split"):
        try:  # caught here, not as a failed trial inside the worker
            parse_tensor_split(given["tensor_split"])
        except ValueError as e:
            raise BenchError(f"bad --tensor-split {given['tensor_split']!r}: {e}") from None
    cfg = resolve(TrialConfig(model=model, **given), info)
    if cfg.rpc:  # checked here: llama.cpp aborts the worker that finds a server unreachable
        endpoints = rpc.parse_endpoints(cfg.rpc)
        rpc.check_reachable(endpoints)
        cfg = dataclasses.replace(cfg, rpc=",".join(endpoints))  # llama-server's spelling, as the worker reads it
    if invalid_reason(cfg):
        raise BenchError(invalid_reason(cfg))
    out = store.check_writable(out)
    with measurement_lock(wait=not no_wait, what=f"tuner bench {Path(model).name}", path=lock_file):
        with Runner(
            timeout=timeout, mem_limit=mem_limit, **({"load_timeout": load_timeout} if load_timeout else {})
        ) as runner:
            if runner.limit and runner.limit.note:  # how --mem-limit is enforced on this machine
                print(f"note: {runner.limit.note}", file=sys.stderr)
            try:
                rec = runner.run(cfg)
            except TrialInterrupted as e:
                store.append(out, [e.record])
                return BenchResult(e.record, out, interrupted=True)
        # planner prediction (calibrated on this rig's earlier trials in `out`) and the bandwidth bound
        roofline.annotate(rec, info, planner.Calibration.from_store([out], rec.hw_fingerprint))
    store.append(out, [rec])
    return BenchResult(rec, out)

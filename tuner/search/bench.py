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
        # --parallel N: aggregate of the N sequences (llama-batched-bench's S_PP, S_TG), then one sequence's
        tests = [("pp", c.n_prompt, "t/s"), ("tg", c.n_gen, "t/s"), ("ttft", c.n_prompt, "ms")]
        if c.n_seq:
            tests[2:2] = [("pp_stream", c.n_prompt, "t/s"), ("tg_stream", c.n_gen, "t/s")]
        for name, n, unit in tests:
            mean, sd = r.metric(name)
            if mean is not None:
                label = f"ttft p{n}" if name == "ttft" else f"{name[:2]}{n}"
                if c.n_seq:
                    label += " per stream" if name.endswith("_stream") else f" x{c.n_seq}"
                    label += " kvu" if c.kv_unified else ""
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
        f"TTFT per stream {', '.join(f'{x:.0f}' for x in r.ttft_stream_ms)} ms" if r.ttft_stream_ms else None,
    ]
    return ", ".join(p for p in parts if p)


class BenchError(TunerError):
    """Bad input for one measurement: a one-line message naming the problem."""


@dataclasses.dataclass
class BenchResult:
    record: TrialRecord
    out: object  # the Parquet file the record was appended to (a Path)
    interrupted: bool = False  # Ctrl-C: the trial was stopped and recorded as such


def config(model: str, **params) -> tuple[TrialConfig, object]:
    """One config of `tuner bench` resolved against its model, with the model's ModelInfo; raises BenchError for
    input llama.cpp would refuse (a --parallel count whose sequences cannot fit the context, ...)."""
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
        endpoints = rpc.reachable(cfg.rpc)
        cfg = dataclasses.replace(cfg, rpc=",".join(endpoints))  # llama-server's spelling, as the worker reads it
    if invalid_reason(cfg):
        raise BenchError(invalid_reason(cfg))
    return cfg, info


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

    params are TrialConfig fields (n_threads=2, n_prompt=512, overrides=("exps=CPU",), n_seq=4, ...); None means
    the default. The planner's prediction (calibrated on earlier trials in `out`) and the bandwidth bound are
    added. Raises BenchError (or ModelError, LockBusy, StoreError) before anything runs.
    """
    cfg, info = config(model, **params)
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


RUN_KWARGS = ("timeout", "mem_limit", "no_wait", "lock_file", "load_timeout")


def measure_parallel(model: str, counts, out="results/bench.parquet", **kwargs) -> list[BenchResult]:
    """`tuner bench --parallel 1,2,4`: one trial per count (as llama-batched-bench -npl 1,2,4), every count checked
    before any runs (a count whose sequences cannot fit the context is refused: nothing measured or written).
    kwargs: measure's. Stops at an interrupted trial."""
    params = {k: v for k, v in kwargs.items() if k not in RUN_KWARGS}
    for n in counts:
        config(model, **{**params, "n_seq": n})
    store.check_writable(out)
    results = []
    for n in counts:
        results.append(measure(model, out, **{**kwargs, "n_seq": n}))
        if results[-1].interrupted:
            break
    return results

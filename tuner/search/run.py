"""`tuner search` and `tuner recommend` as library calls: one function runs a whole search.

    from tuner.search.run import run_search
    result = run_search(["models/dense-q4_k_m.gguf"], n_trials=10, n_gpu_layers="0:13", n_ctx="4096,8192")
    result.recommendation, result.study_dir
    run_search(models, SearchOptions(n_trials=10, specs={"n_ctx": "4096,8192"}))  # the same, as one object

The Click commands in tuner/cli/ only parse options, call these and print.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tuner.errors import TunerError
from tuner.measure import hardware, store
from tuner.measure import rpc as rpclib
from tuner.measure.lock import measurement_lock
from tuner.measure.runner import Runner, TrialInterrupted
from tuner.model.meta import read_model
from tuner.model.synth import synthesize
from tuner.plan.llama_sizes import LlamaSizes
from tuner.quality.measure import DEFAULT_MAX_KLD, Budget, Settings, StudyQuality, combinations
from tuner.quality.measure import measure as measure_files
from tuner.quality.results import Cache
from tuner.record import TrialConfig, TrialRecord, parse_tensor_split
from tuner.search import baselines
from tuner.search import feasible as fitlib
from tuner.search import prior as priorlib
from tuner.search import recommend as recommendlib
from tuner.search import space as spacelib
from tuner.search.confirm import MIN_ROUNDS
from tuner.search.ledger import redact
from tuner.search.loop import Search, StopOnSignal
from tuner.search.options import DEFAULT_N_TRIALS, Limits, SearchOptions
from tuner.search.space import SpaceError
from tuner.units import fmt_size, headroom_bytes


class SearchError(TunerError):
    """Bad input for a search: a one-line message naming the problem."""


@dataclass
class SearchResult:
    """What a search left: the recommendation (None when no config completed) and where everything is."""

    study_dir: Path
    recommendation: dict | None
    interrupted: bool = False  # Ctrl-C twice (or the trial was aborted): the recommendation covers what ran
    stopped: bool = False  # Ctrl-C once: stopped after the current trial
    finished: str = ""  # why the search ended before its budget (e.g. every config of the space is measured)
    plan: dict | None = None  # a dry run's space and verdicts (tuner.search.feasible.plan)


def study_name(models: list[str]) -> str:
    """The default study name: the first model's file name without .gguf and the shard suffix."""
    stem = Path(models[0]).name.removesuffix(".gguf")
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", stem)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem) + (f"+{len(models) - 1}" if len(models) > 1 else "")


def check_limits(hwinfo, max_ram, max_vram, headroom) -> None:
    """Limits that leave no memory at all are a typo, not a search."""

    if headroom_bytes(headroom, hwinfo.ram_total) >= hwinfo.ram_total:
        raise SearchError(f"--headroom {headroom} is all of this machine's RAM ({fmt_size(hwinfo.ram_total)})")
    for name, v in (("--max-ram", max_ram), ("--max-vram", max_vram)):
        if v is not None and v <= 0:
            raise SearchError(f"{name} must be more than 0")


def check_split(space, rig) -> None:
    """A tensor split names one share per GPU: more shares than GPUs is a typo (llama.cpp would ignore them)."""

    d = space.dims.get("tensor_split")
    for v in d.values if d else []:
        if len(parse_tensor_split(v)) > max(rig.n_gpus, 1):
            raise SpaceError(
                f"--tensor-split {v}: {len(parse_tensor_split(v))} shares for {rig.n_gpus} GPU(s)"
                + (" (--gpus describes the GPUs of a dry run)" if not rig.described else "")
            )


def stand_in_sizes(rig, build: dict) -> tuple[LlamaSizes | None, str | None]:
    """llama.cpp's own sizes for a described rig's GPUs (`--gpus`), asked of sizing-only RPC servers on this host
    (tuner.plan.llama_sizes.LlamaSizes.stand_in), or None and why, where this build has no RPC backend or a
    server cannot start: the planner's model sizes them then."""
    if not build.get("rpc"):
        return None, "this llama.cpp build has no RPC backend: the planner's model sizes the described GPUs' buffers"
    try:
        return LlamaSizes.stand_in(list(rig.gpu_totals), baselines.fit_device_names(rig)), None
    except rpclib.RpcError as e:
        return None, f"no sizing-only server for the described GPUs ({e}): the planner's model sizes their buffers"


def synthetic_models(results: str | Path, preset: str, quants: str) -> list[str]:
    """--synthetic: make the preset's models into RESULTS/models (kept: a re-run reuses them)."""
    folder = Path(results) / "models"
    try:
        return [str(p) for p in synthesize(folder, preset, tuple(q.strip() for q in quants.split(",") if q.strip()))]
    except OSError as e:
        raise SearchError(f"cannot write models to {folder}: {e.strerror or e}") from None


def run_search(
    models=(),
    options: SearchOptions | None = None,
    *,
    on_trial: Callable | None = None,
    on_confirm: Callable | None = None,
    log: Callable[[str], None] | None = None,
    quality_progress: Callable | None = None,
    **overrides,
) -> SearchResult:
    """Run (or resume) one Optuna study and return its recommendation.

    `options` are `tuner search`'s options (SearchOptions, defaults: the command's); keyword `overrides` change
    them by the options' names, and any other name is a llama.cpp parameter of the space (TrialConfig names:
    n_gpu_layers="0:61", n_ctx="4096,8192", ...), each a value, a list or a range as a string. The test shape
    is n_prompt, n_gen, n_depth, repetitions. With `auto_space` every parameter left unset that matters for the
    objective gets the default space's range (tuner.search.space.auto_dimensions); the context defaults to the
    working context (4096 capped by the trained one). `confirm` top configs are re-measured against the
    llama.cpp-defaults baseline before the recommendation is written (0: none), for at most `confirm_rounds` rounds.
    `on_trial(search, record)` is called after every trial, `on_confirm(search, candidate, record, round)` after
    every confirmation run, `log(line)` with each note.
    Quality (tuner.quality): with two or more model files (or a `reference` / `reference_logits`), and
    `quality`, each file's KL divergence from the reference is measured once per KV-cache combination the space
    uses (cached in RESULTS/quality/) before the trials; configs of files beyond the budget (`max_kld`, default
    quality.DEFAULT_MAX_KLD; `min_same_top`) are measured but never recommended.
    Ctrl-C stops after the current trial, twice aborts it; either way everything measured is kept.
    `dry_run` builds the space and the planner's verdicts and returns them as `SearchResult.plan`
    (tuner.search.feasible.plan) without measuring or writing anything; `gpus` (bytes per GPU) and `ram` describe a
    rig to plan for instead of this machine (dry run only). `per_load`: configs measured in a row per model load
    (see tuner.search.loop).
    Raises SearchError (and tuner.model.meta.ModelError, tuner.measure.lock.LockBusy) before anything runs.
    """

    opts = (options or SearchOptions()).replace(**overrides)
    log = log or (lambda line: None)
    budget = Budget(DEFAULT_MAX_KLD if opts.max_kld is None else opts.max_kld, opts.min_same_top)
    limits = opts.limits
    models = list(models)
    if opts.synthetic:
        models += synthetic_models(opts.results, opts.synthetic, opts.quants)
    if not models:
        raise SearchError("no model: pass --model FILE.gguf (repeatable) or --synthetic tiny|dense|moe")
    models = list(dict.fromkeys(models))
    infos = {m: read_model(m) for m in models}
    hwinfo = hardware.probe()
    build = hardware.build_info()
    endpoints = rpclib.reachable(opts.rpc)
    remote = hardware.rpc_devices(endpoints)
    base = TrialConfig(
        model=models[0], n_threads=hwinfo.cores_physical, n_threads_batch=0, rpc=",".join(endpoints), **opts.shape
    )
    check_limits(hwinfo, opts.max_ram, opts.max_vram, limits.headroom)
    needs = {"tg": base.n_gen, "pp": base.n_prompt, "ttft": base.n_prompt, "mixed": base.n_prompt + base.n_gen}
    objective = "tg" if opts.pareto else opts.objective
    if not needs[objective.removesuffix("_stream")]:
        raise SearchError(
            f"--objective {objective} measures nothing with this test shape (-p {base.n_prompt} -n {base.n_gen})"
        )
    baselines.fit_margins(opts.fit_target)  # bad input before anything runs
    if opts.confirm < 0:
        raise SearchError("--confirm must be at least 1 (or --no-confirm)")
    if opts.confirm and opts.confirm_rounds < MIN_ROUNDS:
        raise SearchError(
            f"--confirm-rounds {opts.confirm_rounds} is below the confirmation race's minimum of "
            f"{MIN_ROUNDS} rounds (the fewest at which its paired test can tell two configs apart)"
        )
    if not opts.dry_run and (opts.gpus or opts.ram):
        raise SearchError(
            f"{'--gpus' if opts.gpus else '--ram'} describes a rig to plan for: it needs --dry-run (a "
            "real run measures the machine it runs on, with the GPUs NVML reports)"
        )
    # the prior's probe before anything runs: one of another machine or build is bad input (tuner.plan.probe)
    probe_data = priorlib.load_probe(opts.probe) if opts.prior and opts.sampler != "grid" else None
    # a described GPU rig assumes a GPU build; RPC servers' devices are GPUs to llama.cpp
    gpu_offload = bool(build.get("gpu_offload")) or bool(opts.gpus) or bool(remote)
    rig = (
        fitlib.described_rig(opts.gpus, opts.ram, hwinfo, limits)
        if opts.gpus
        else fitlib.rig_from_hardware(hwinfo, limits, gpu_offload, remote)
    )
    if rig.n_gpus and not rig.described:
        # every device is one llama.cpp enumerates (RPC servers', this machine's GPUs: hardware.offload_gpus): it
        # sizes each placement's compute buffers, as --fit asks it
        rig.sizes = LlamaSizes(rig.devices)
    space = spacelib.build_space(
        models,
        infos,
        opts.specs,
        base,
        gpu_offload,
        hwinfo.cores_physical,
        hwinfo.cores_logical,
        objective=objective,
        auto=opts.auto_space,
        ram_total=hwinfo.ram_total,
    )
    if "n_threads_batch" not in space.dims:
        # threads_batch follows threads unless searched on its own
        space.base = dataclasses.replace(space.base, n_threads_batch=0)
    check_split(space, rig)
    spacelib.require_ctx(space, opts.min_ctx)
    spacelib.check_depth(space, opts.n_depth is not None)
    spacelib.check_parallel(space)
    asked = len(space.dims["n_ctx"].values) if "n_ctx" in space.dims else 0
    if rig.described:  # its stand-ins start once the input is known to be good (they take a second or two)
        rig.sizes, sizing_note = stand_in_sizes(rig, build)
        if sizing_note:
            space.notes.append(sizing_note)
    fitlib.apply(space, infos, rig, plan=opts.plan)
    spacelib.make_ladder(space, opts.n_depth is not None, asked)
    name = opts.study or study_name(models)

    def fits(cfg: TrialConfig) -> bool:  # the planner's verdict on this rig
        return fitlib.judge(fitlib.predict(cfg, infos[cfg.model], rig), rig)[0]

    prior = None
    if probe_data is not None:
        prior = priorlib.Prior.build(
            space,
            infos,
            probe_data,
            objective,
            gpu_offload,
            fits=fits,
            seed=opts.seed,
        )
        if not prior.active:
            space.notes.append(f"no prior: {prior.note}")
    elif opts.prior and opts.sampler != "grid":
        # a note with the others, once the study's input has been checked (bad input is one line)
        space.notes.append("no prior (the predicted best measured first): this rig has no probe yet; run `tuner probe`")
    if rig.sizes is not None:
        # an RPC server serves one client at a time, and the asking worker holds a context on a local GPU:
        # llama.cpp is asked for the baselines' buffers (fit's many placements, the recipe's) now, before any
        # trial runs; the search reads them from the cache
        baselines.starting(space, infos, rig, hwinfo, opts.min_ctx, fits, opts.fit_target)
        rig.sizes.freeze()
        asked = rig.sizes.summary()
        where = (
            "sizing-only RPC servers standing in for the described GPUs (an RPC device's figures: no CUDA offload "
            "of host-weight matmuls)"
            if rig.sizes.stands_in
            else "the devices"
        )
        space.notes.append(
            f"llama.cpp sized the compute buffers of {asked['answered']} placements on {where} in "
            f"{asked['seconds']:.1f} s (no_alloc loads, as --fit asks them); the planner's model sizes any other"
            + (f" (unanswered: {asked['first_failure']})" if asked["first_failure"] else "")
        )
    if opts.dry_run:  # nothing is measured, locked or written
        out = fitlib.plan(space, infos, rig)
        out["prior"] = prior.summary() if prior is not None else None
        out["baselines"] = baselines.listed(
            space,
            infos,
            rig,
            hwinfo,
            opts.min_ctx,
            fits=fits,
            fit_target=opts.fit_target,
        )
        if space.ladder:
            out["ladder"] = [{"n_ctx": c, "n_depth": space.rung_depth(c)} for c in space.ladder]
        return SearchResult(Path(opts.results) / name, None, plan=out)
    n_trials = opts.n_trials
    if n_trials is None and opts.timeout is None and opts.sampler != "grid":
        n_trials = DEFAULT_N_TRIALS
    opts = opts.replace(study=name, n_trials=n_trials)
    study_dir = opts.study_dir

    srch = Search(space, opts, infos, hwinfo, build, on_trial=on_trial, on_confirm=on_confirm, rig=rig)
    srch.prior = prior if prior is not None and prior.active else None
    # the lock comes first: resuming marks trials left RUNNING as interrupted, which must never touch a study
    # that another process is measuring right now
    with (
        measurement_lock(wait=not opts.no_wait, what=f"tuner search {name}", path=opts.lock_file),
        Runner(
            timeout=opts.trial_timeout,
            mem_limit=opts.mem_limit,
            reuse=opts.reuse_workers,
            hw=hwinfo,
            build=build,
            load_timeout=opts.load_timeout,
        ) as runner,
    ):
        # quality first: its bad input (a reference of another vocabulary, ...) must leave nothing written
        if opts.quality and (len(models) > 1 or opts.reference or opts.reference_logits):
            srch.quality = measure_quality(
                models,
                runner,
                space,
                budget,
                opts.results,
                reference=opts.reference,
                reference_logits=opts.reference_logits,
                text=opts.quality_text,
                ctx=opts.quality_ctx,
                n_threads=hwinfo.cores_physical,
                log=log,
                progress=quality_progress,
            )
        srch.prepare()
        if srch.quality is not None and not any(r.ok for r in srch.quality.results):
            # nothing measured (every pass failed, e.g. under --mem-limit): no budget can be applied, and
            # refusing every file would leave no recommendation at all
            log("note: no quality pass succeeded: the recommendation ignores quality (see the causes above)")
            srch.quality = None
        if srch.quality is not None:
            srch.quality.save(study_dir)
        for note in space.notes:
            log(f"note: {note}")
        for line in describe_space(space):
            log(line)
        varying = ", ".join(f"{k}={d.spec()}" for k, d in space.varying().items()) or "nothing varies"
        log(
            f"study {name}: {len(models)} model(s), {space.size()} configs ({varying}); "
            f"storage {redact(opts.storage_url)}"
        )
        done = srch.done_trials()
        if done:
            log(f"resuming study {name}: {done} trial(s) already done")
        if runner.limit and runner.limit.note:  # how --mem-limit is enforced on this machine
            log(f"note: {runner.limit.note}")
        srch.runner = runner
        try:
            with StopOnSignal(srch):
                rec = srch.run()
        except (KeyboardInterrupt, TrialInterrupted):
            return SearchResult(study_dir, srch.write_recommendation(), interrupted=True)
        finally:
            srch.close()
    if rec is None and srch.quality is not None and any(r.ok for r in srch.records):
        log(
            "note: no config of a model file within the quality budget completed (see the quality lines above; "
            "--max-kld sets the budget)"
        )
    return SearchResult(study_dir, rec, stopped=srch.stop_requested, finished=srch.finished)


def measure_quality(
    models,
    runner,
    space,
    budget,
    results,
    *,
    reference=None,
    reference_logits=None,
    text=None,
    ctx=None,
    n_threads=0,
    log=lambda line: None,
    progress=None,
):
    """Each model file's quality against the reference, per KV-cache combination of the space (cached in
    RESULTS/quality/: a resumed search pays nothing). Raises SearchError on bad input, before any pass."""
    out = []
    for type_k, type_v in combinations(space):
        settings = Settings(ctx=ctx, n_threads=n_threads, type_k=type_k, type_v=type_v, rpc=space.base.rpc)
        out += measure_files(
            models,
            runner,
            reference=reference,
            reference_logits=reference_logits,
            text=text,
            settings=settings,
            cache=Cache(results),
            progress=progress,
        )
    sq = StudyQuality(out, budget)
    for res in out:
        ok, why = budget.judge(res)
        figures = (
            f"KLD {res.kld_mean:.4f} ± {res.kld_mean_err:.4f}, same top {res.same_top_pct:.1f} %"
            if res.ok
            else f"{res.outcome}: {res.cause[:100]}"
        )
        log(
            f"quality {Path(res.model).name} (KV {res.type_k}/{res.type_v}){' [ref]' if res.is_reference else ''}"
            f"{' (cached)' if res.cached else ''}: {figures}; "
            + ("within the budget" if ok else f"not recommended: {why}")
        )
    return sq


def describe_space(space) -> list[str]:
    """Why each dimension of the default space is there, and what it leaves out on purpose."""
    lines = [f"  {k} = {space.dims[k].spec()}: {why}" for k, why in space.auto.items() if k in space.dims]
    if lines:
        lines.insert(0, "default space (set any of these yourself to override):")
    if space.auto and "n_batch" not in space.dims and space.base is not None:
        lines.append(
            f"  n_batch = {space.base.n_batch}: llama.cpp's default; it changes speed only for prompts "
            f"longer than itself (this test's prompt: {space.base.n_prompt} tokens)"
        )
    if "type_k" not in space.dims and "type_v" not in space.dims:
        lines.append(
            "  type_k/type_v = f16: KV-cache types change the output; list them (-ctk f16,q8_0 -ctv "
            "f16,q8_0) to search them"
        )
    return lines


def search_total(srch) -> int | None:
    """Trials the study will have when done: --n-trials, or the whole grid."""
    return srch.opts.n_trials or (srch.space.size() if srch.opts.sampler == "grid" else None)


def study_hardware(rec: TrialRecord) -> hardware.Hardware:
    """The machine a study was measured on, as its records saved it."""
    return hardware.from_dict(rec.hw)


def recommend_study(
    study_dir: str | Path, objective: str | None = None, limits: Limits = Limits(), write: bool = True
) -> dict:
    """Re-derive a study's recommendation under other limits from its saved trials (nothing is re-run).

    objective None keeps the study's; write rewrites STUDY_DIR/recommended.json. Raises SearchError when the
    folder holds no trials or no completed trial meets the limits.
    """

    recs = store.records(Path(study_dir))
    if not recs:
        raise SearchError(f"{study_dir} holds no trials")
    old = {}
    path = Path(study_dir) / recommendlib.RECOMMENDED_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError as e:
            raise SearchError(f"{path} is not valid JSON ({e}); remove it or pass --no-write") from None
    objective = objective or old.get("objective", "mixed")
    sq = StudyQuality.load(study_dir)
    rec = recommendlib.recommend(
        recs, study_hardware(recs[0]), limits, objective, study=recs[0].study, pareto="pareto_front" in old, quality=sq
    )
    if rec is None:
        raise SearchError(f"no completed trial in {study_dir} meets these limits")
    if write:
        recommendlib.write(path, rec)
    return rec

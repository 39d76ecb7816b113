"""`tuner search` and `tuner recommend` as library calls: one function runs a whole search.

    from tuner.search.run import run_search
    result = run_search(["models/dense-q4_k_m.gguf"], n_trials=10, n_gpu_layers="0:13", n_ctx="4096,8192")
    result.recommendation, result.study_dir

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
from tuner.measure.lock import measurement_lock
from tuner.measure.runner import DEFAULT_LOAD_TIMEOUT, Runner
from tuner.model.meta import read_model
from tuner.model.synth import synthesize
from tuner.quality.measure import DEFAULT_MAX_KLD, Budget, Settings, StudyQuality, combinations
from tuner.quality.measure import measure as measure_files
from tuner.quality.results import Cache
from tuner.record import TrialConfig, TrialRecord, parse_tensor_split
from tuner.search import feasible as fitlib
from tuner.search import fleet
from tuner.search import loop as studylib
from tuner.search import recommend as recommendlib
from tuner.search import space as spacelib
from tuner.search.confirm import DEFAULT_K as DEFAULT_CONFIRM
from tuner.search.confirm import MAX_ROUNDS, MIN_ROUNDS
from tuner.search.loop import DEFAULT_PER_LOAD, Limits
from tuner.search.space import SpaceError
from tuner.units import fmt_size, headroom_bytes, parse_headroom


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
            raise SpaceError(f"--tensor-split {v}: {len(parse_tensor_split(v))} shares for {rig.n_gpus} GPU(s)"
                             + (" (--gpus describes the GPUs of a dry run)" if not rig.described else ""))


def synthetic_models(results: str | Path, preset: str, quants: str) -> list[str]:
    """--synthetic: make the preset's models into RESULTS/models (kept: a re-run reuses them)."""
    folder = Path(results) / "models"
    try:
        return [str(p) for p in synthesize(folder, preset, tuple(q.strip() for q in quants.split(",") if q.strip()))]
    except OSError as e:
        raise SearchError(f"cannot write models to {folder}: {e.strerror or e}") from None


def run_search(models=(), *, synthetic: str | None = None, quants: str = "q8_0,q4_k_m", study: str | None = None,
               results: str | Path = "results", storage: str | None = None, sampler: str = "tpe", seed: int = 0,
               n_trials: int | None = None, timeout: float | None = None, resume: bool = False,
               objective: str = "mixed", pareto: bool = False, min_ctx: int = 0, max_vram: int | None = None,
               max_ram: int | None = None, headroom: int | float = "1GiB", trial_timeout: float = 600.0,
               mem_limit: int | None = None, no_wait: bool = False, drift_every: int = 10,
               drift_tolerance: float = 0.05, baselines: bool = True, plan: bool = True,
               reuse_workers: bool = True, lock_file: str | None = None, allow_mixed: bool = False,
               heartbeat_s: int = 10, auto_space: bool = True, confirm: int = DEFAULT_CONFIRM,
               confirm_rounds: int = MAX_ROUNDS, quality: bool = True, max_kld: float | None = None,
               min_same_top: float | None = None, reference: str | None = None,
               reference_logits: str | None = None, quality_text: str | None = None,
               quality_ctx: int | None = None, on_trial: Callable | None = None,
               on_confirm: Callable | None = None, log: Callable[[str], None] | None = None,
               quality_progress: Callable | None = None, dry_run: bool = False, gpus: list[int] | None = None,
               ram: int | None = None, per_load: int = DEFAULT_PER_LOAD, load_timeout: float = DEFAULT_LOAD_TIMEOUT,
               **params) -> SearchResult:
    """Run (or resume) one Optuna study and return its recommendation; the arguments are `tuner search`'s options.

    `params` are the llama.cpp parameters (TrialConfig names: n_gpu_layers="0:61", n_ctx="4096,8192", ...),
    each a value, a list or a range as a string, plus the test shape (n_prompt, n_gen, n_depth, repetitions)
    and use_mmap. With `auto_space` every parameter left unset that matters for the objective gets the default
    space's range (tuner.search.space.auto_dimensions); the context defaults to the working context (4096 capped by
    the trained one). `confirm` top configs are re-measured against the llama.cpp-defaults baseline before the
    recommendation is written (0: none), for at most `confirm_rounds` rounds.
    `on_trial(search, record)` is called after every trial, `on_confirm(search, candidate, record, round)` after
    every confirmation run, `log(line)` with each note.
    Quality (tuner.quality): with two or more model files (or a `reference` / `reference_logits`), and
    `quality`, each file's KL divergence from the reference is measured once per KV-cache combination the space
    uses (cached in RESULTS/quality/) before the trials; configs of files beyond the budget (`max_kld`, default
    quality.DEFAULT_MAX_KLD; `min_same_top`) are measured but never recommended.
    Ctrl-C stops after the current trial, twice aborts it; either way everything measured is kept.
    `dry_run` builds the space and the planner's verdicts and returns them as `SearchResult.plan` (tuner.search.feasible.plan)
    without measuring or writing anything; `gpus` (bytes per GPU) and `ram` describe a rig to plan for instead of
    this machine (dry run only). `per_load`: configs measured in a row per model load (see tuner.search.loop).
    Raises SearchError (and tuner.model.meta.ModelError, tuner.measure.lock.LockBusy) before anything runs.
    """

    log = log or (lambda line: None)
    budget = Budget(DEFAULT_MAX_KLD if max_kld is None else max_kld, min_same_top)
    headroom = parse_headroom(headroom)
    models = list(models)
    if synthetic:
        models += synthetic_models(results, synthetic, quants)
    if not models:
        raise SearchError("no model: pass --model FILE.gguf (repeatable) or --synthetic tiny|dense|moe")
    models = list(dict.fromkeys(models))
    infos = {m: read_model(m) for m in models}
    hwinfo = hardware.probe()
    build = hardware.build_info()
    shape = {k: params.pop(k, None) for k in ("n_prompt", "n_gen", "n_depth", "repetitions")}
    base = TrialConfig(model=models[0], n_threads=hwinfo.cores_physical, n_threads_batch=0,
                       **{k: v for k, v in shape.items() if v is not None})
    check_limits(hwinfo, max_ram, max_vram, headroom)
    needs = {"tg": base.n_gen, "pp": base.n_prompt, "ttft": base.n_prompt, "mixed": base.n_prompt + base.n_gen}
    if not needs["tg" if pareto else objective]:
        raise SearchError(f"--objective {'tg' if pareto else objective} measures nothing with this test shape "
                          f"(-p {base.n_prompt} -n {base.n_gen})")
    if confirm < 0:
        raise SearchError("--confirm must be at least 1 (or --no-confirm)")
    if confirm and confirm_rounds < MIN_ROUNDS:
        raise SearchError(f"--confirm-rounds {confirm_rounds} is below the confirmation race's minimum of {MIN_ROUNDS} "
                          "rounds (the fewest at which its paired test can tell two configs apart)")
    limits = Limits(min_ctx=min_ctx, max_vram=max_vram, max_ram=max_ram, headroom=headroom)
    if not dry_run and (gpus or ram):
        raise SearchError(f"{'--gpus' if gpus else '--ram'} describes a rig to plan for: it needs --dry-run (a real run "
                          "measures the machine it runs on, with the GPUs NVML reports)")
    gpu_offload = bool(build.get("gpu_offload")) or bool(gpus)  # a described GPU rig assumes a GPU build
    rig = (fitlib.described_rig(gpus, ram, hwinfo, limits) if gpus
           else fitlib.rig_from_hardware(hwinfo, limits, gpu_offload))
    space = spacelib.build_space(models, infos, params, base, gpu_offload,
                                 hwinfo.cores_physical, hwinfo.cores_logical, objective="tg" if pareto
                                 else objective, auto=auto_space, ram_total=hwinfo.ram_total)
    if "n_threads_batch" not in space.dims:
        # threads_batch follows threads unless searched on its own
        space.base = dataclasses.replace(space.base, n_threads_batch=0)
    check_split(space, rig)
    spacelib.require_ctx(space, min_ctx)
    spacelib.check_depth(space, shape["n_depth"] is not None)
    asked = len(space.dims["n_ctx"].values) if "n_ctx" in space.dims else 0
    fitlib.apply(space, infos, rig, plan=plan)
    spacelib.make_ladder(space, shape["n_depth"] is not None, asked)
    if dry_run:  # nothing is measured, locked or written
        out = fitlib.plan(space, infos, rig)
        if space.ladder:
            out["ladder"] = [{"n_ctx": c, "n_depth": space.rung_depth(c)} for c in space.ladder]
        return SearchResult(Path(results) / (study or study_name(models)), None, plan=out)
    name = study or study_name(models)
    study_dir = Path(results) / name
    if n_trials is None and timeout is None and sampler != "grid":
        n_trials = 20
    opts = studylib.SearchOptions(
        study_dir=study_dir, study_name=name, storage=storage, sampler=sampler, seed=seed, n_trials=n_trials,
        timeout_s=timeout, objective=objective, pareto=pareto, limits=limits,
        trial_timeout=trial_timeout, mem_limit=mem_limit, reuse_workers=reuse_workers,
        drift_every=drift_every, drift_tolerance=drift_tolerance, baselines=baselines, resume=resume,
        plan=plan, confirm=confirm, confirm_rounds=(MIN_ROUNDS, confirm_rounds),
        allow_mixed=allow_mixed, heartbeat_s=heartbeat_s, per_load=per_load)

    srch = fleet.new_search(space, opts, infos, hwinfo, build, on_trial=on_trial, on_confirm=on_confirm)
    # the lock comes first: resuming marks trials left RUNNING as interrupted, which must never touch a study
    # that another process is measuring right now
    with measurement_lock(wait=not no_wait, what=f"tuner search {name}", path=lock_file), \
            Runner(timeout=trial_timeout, mem_limit=mem_limit, reuse=reuse_workers, hw=hwinfo,
                   build=build, load_timeout=load_timeout) as runner:
        # quality first: its bad input (a reference of another vocabulary, ...) must leave nothing written
        if quality and (len(models) > 1 or reference or reference_logits):
            srch.quality = measure_quality(models, runner, space, budget, results, reference=reference,
                                           reference_logits=reference_logits, text=quality_text,
                                           ctx=quality_ctx, n_threads=hwinfo.cores_physical, log=log,
                                           progress=quality_progress)
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
        log(f"study {name}: {len(models)} model(s), {space.size()} configs ({varying}); "
            f"storage {studylib.redact(opts.storage_url)}")
        done = srch.done_trials()
        if done:
            log(f"resuming study {name}: {done} trial(s) already done")
        if runner.limit and runner.limit.note:  # how --mem-limit is enforced on this machine
            log(f"note: {runner.limit.note}")
        srch.runner = runner
        try:
            with studylib.StopOnSignal(srch):
                rec = srch.run()
        except (KeyboardInterrupt, studylib.TrialInterrupted):
            return SearchResult(study_dir, srch.write_recommendation(), interrupted=True)
        finally:
            srch.close()
    if rec is None and srch.quality is not None and any(r.ok for r in srch.records):
        log("note: no config of a model file within the quality budget completed (see the quality lines above; "
            "--max-kld sets the budget)")
    return SearchResult(study_dir, rec, stopped=srch.stop_requested, finished=srch.finished)


def measure_quality(models, runner, space, budget, results, *, reference=None, reference_logits=None, text=None,
                    ctx=None, n_threads=0, log=lambda line: None, progress=None):
    """Each model file's quality against the reference, per KV-cache combination of the space (cached in
    RESULTS/quality/: a resumed search pays nothing). Raises SearchError on bad input, before any pass."""
    out = []
    for type_k, type_v in combinations(space):
        settings = Settings(ctx=ctx, n_threads=n_threads, type_k=type_k, type_v=type_v)
        out += measure_files(models, runner, reference=reference, reference_logits=reference_logits, text=text,
                         settings=settings, cache=Cache(results), progress=progress)
    sq = StudyQuality(out, budget)
    for res in out:
        ok, why = budget.judge(res)
        figures = (f"KLD {res.kld_mean:.4f} ± {res.kld_mean_err:.4f}, same top {res.same_top_pct:.1f} %"
                   if res.ok else f"{res.outcome}: {res.cause[:100]}")
        log(f"quality {Path(res.model).name} (KV {res.type_k}/{res.type_v}){' [ref]' if res.is_reference else ''}"
            f"{' (cached)' if res.cached else ''}: {figures}; "
            + ("within the budget" if ok else f"not recommended: {why}"))
    return sq


def describe_space(space) -> list[str]:
    """Why each dimension of the default space is there, and what it leaves out on purpose."""
    lines = [f"  {k} = {space.dims[k].spec()}: {why}" for k, why in space.auto.items() if k in space.dims]
    if lines:
        lines.insert(0, "default space (set any of these yourself to override):")
    if space.auto and "n_batch" not in space.dims and space.base is not None:
        lines.append(f"  n_batch = {space.base.n_batch}: llama.cpp's default; it changes speed only for prompts "
                     f"longer than itself (this test's prompt: {space.base.n_prompt} tokens)")
    if "type_k" not in space.dims and "type_v" not in space.dims:
        lines.append("  type_k/type_v = f16: KV-cache types change the output; list them (-ctk f16,q8_0 -ctv "
                     "f16,q8_0) to search them")
    return lines


def search_total(srch) -> int | None:
    """Trials the study will have when done: --n-trials, or the whole grid."""
    return srch.opts.n_trials or (srch.space.size() if srch.opts.sampler == "grid" else None)


def study_hardware(rec: TrialRecord) -> hardware.Hardware:
    """The machine a study was measured on, as its records saved it."""
    return hardware.Hardware(**{k: v for k, v in rec.hw.items() if k != "gpus"},
                             gpus=[hardware.GPU(**g) for g in rec.hw.get("gpus", [])])


def recommend_study(study_dir: str | Path, objective: str | None = None, limits: Limits = Limits(),
                    write: bool = True) -> dict:
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
    rec = recommendlib.recommend(recs, study_hardware(recs[0]), limits, objective, study=recs[0].study,
                                 pareto="pareto_front" in old, quality=sq)
    if rec is None:
        raise SearchError(f"no completed trial in {study_dir} meets these limits")
    if write:
        recommendlib.write(path, rec)
    return rec

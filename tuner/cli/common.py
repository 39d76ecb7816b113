"""CLI pieces shared by several commands: the limits options, the per-trial progress line, the recommendation."""

from __future__ import annotations

from pathlib import Path

import click

from tuner.cli.options import HEADROOM, SIZE
from tuner.measure import store
from tuner.search.confirm import objective_samples
from tuner.search.run import search_total
from tuner.units import fmt_size, hms


def limits_options(f):
    """Constraints a recommendation must meet; shared by search and recommend."""
    opts = [
        click.option("--min-ctx", type=int, default=0, help="the context you need: smaller n_ctx never qualifies"),
        click.option("--max-vram", type=SIZE, default=None, help="VRAM a config may use, e.g. 20GiB"),
        click.option("--max-ram", type=SIZE, default=None, help="host RAM a config may use, e.g. 200GiB"),
        click.option(
            "--headroom",
            type=HEADROOM,
            default="1GiB",
            show_default=True,
            help="memory left free for the OS and the display (Windows/WDDM reserves VRAM): "
            "a size or a share, e.g. 2GiB or 5%",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def log(line: str) -> None:
    click.echo(line, err=True)


def describe_plan(plan: dict) -> list[str]:
    """A dry run for the terminal: the rig, the dimensions with why, the count that fits, the memory extremes."""
    rig = plan["rig"]
    gpus = (
        ", ".join(
            f"GPU {g['index']} {fmt_size(g['vram_total'])} ({fmt_size(g['vram_usable'])} usable)" for g in rig["gpus"]
        )
        or "no GPU"
    )
    lines = [
        f"dry run for {'a described rig' if rig['described'] else 'this machine'}: {gpus}; host RAM "
        f"{fmt_size(rig['ram_usable'])} usable" + ("" if rig["gpu_offload"] else " (CPU-only build)")
    ]
    lines += [f"note: {n}" for n in plan["notes"]]
    for k, vals in plan["dimensions"].items():
        shown = (
            f"{vals[0]}..{vals[-1]} ({len(vals)} values)"
            if len(vals) > 4 and all(isinstance(v, int) for v in vals)
            else ",".join(str(v) for v in vals)
        )
        why = plan["reasons"].get(k)
        lines.append(f"  {k} = {shown}" + (f": {why}" if why else ""))
    lines.append(
        f"{plan['configs']} of {plan['configs_in_space']} configs fit by the planner"
        + (
            f"; {plan['skipped_by_planner']} would be skipped, e.g. {plan['why_skipped'][0]}"
            if plan["skipped_by_planner"] and plan["why_skipped"]
            else ""
        )
    )
    for label in ("lowest_vram", "highest_vram"):
        x = plan[label]
        if x:
            c = x["config"]
            where = (
                " + ".join(fmt_size(v) for v in x["vram_by_device"])
                if len(x["vram_by_device"]) > 1
                else fmt_size(x["vram_bytes"])
            )
            lines.append(
                f"{label.replace('_', ' ')}: -ngl {c['n_gpu_layers']} --n-cpu-moe {c['n_cpu_moe']}"
                + (f" -ts {c['tensor_split']}" if c["tensor_split"] else "")
                + f" -c {c['n_ctx']}"
                f" -ub {c['n_ubatch']} -fa {c['flash_attn']}: VRAM {where}, host "
                f"{fmt_size(x['resident_bytes'])} resident + {fmt_size(x['mmap_bytes'])} mmap'd"
            )
    for b in plan.get("baselines", []):
        lines.append(f"baseline {b['label']}: {b['server_flags']}")
    lines += describe_prior(plan.get("prior"))
    return lines


def describe_prior(prior: dict | None) -> list[str]:
    """The prior's answer in a dry run: the predicted-best config, its predicted tg/pp, what it does not model."""
    if not prior:
        return ["prior: none (no probe of this rig: `tuner probe`; or --no-prior)"]
    best = prior["best"]
    if best is None:
        return [f"prior: no prediction ({prior['note'] or 'no config fits'})"]
    what = " ".join(f"{k}={Path(v).name if k == 'model' else v}" for k, v in best["params"].items()) or "the base"
    out = [
        f"predicted best: {what}: tg {best['pred_tg_tps']:.1f} t/s, pp {best['pred_pp_tps']:.1f} t/s, "
        f"{best['objective']} {best['pred_objective']:.1f} (of {prior['configs_predicted']} configs predicted)"
    ]
    if prior["unmodelled"]:
        out.append(f"prior: the speed model does not cover {', '.join(prior['unmodelled'])}: unknown until measured")
    return out


class Progress:
    """One line per trial: count, elapsed, ETA against the budget, best so far, the last outcome.

    Plain lines, not a rich live display: a search runs overnight, mostly into a log file or a CI log, where a
    redrawn bar leaves nothing to read back; and its ETA is its own (the budget, the configs a small space has
    left, the confirmation's estimate), not a rate a progress library extrapolates. The quality passes'
    progress (tuner.quality.Progress) is plain lines for the same reasons."""

    def __call__(self, srch, rec) -> None:
        opts = srch.opts
        total = search_total(srch)
        n = srch.done_trials()
        elapsed = srch.clock() - srch.started
        eta = None
        if total:
            left = max(total - n, 0)
            if srch.unmeasured is not None:
                left = min(left, len(srch.unmeasured))  # a small space ends when every config is measured
            eta = elapsed / max(srch.n_run, 1) * left + srch.confirm_estimate_s()  # pace + the confirmation
        if opts.timeout:
            left = max(0.0, opts.timeout - elapsed)
            eta = min(eta, left) if eta is not None else left
        best = srch.best_so_far()
        tg = rec.metric("tg")
        last = (
            f"#{rec.trial_number} ok tg {tg[0]:.2f}±{tg[1]:.2f} t/s"
            if rec.ok and tg[0] is not None
            else f"#{rec.trial_number} {rec.outcome}: {rec.cause[:70]}"
        )
        unit = "ms" if opts.objective == "ttft" and not opts.pareto else "t/s"
        label = "tg" if opts.pareto else opts.objective
        click.echo(
            f"[{n}/{total or '?'}] {hms(elapsed)} elapsed"
            + (f", ETA {hms(eta)}" if eta is not None else "")
            + (f" | best {label} {best[1]:.2f} {unit} (#{best[0]})" if best else " | no ok trial yet")
            + f" | {last}",
            err=True,
        )

    def confirmed(self, srch, cand, rec, rnd: int) -> None:
        """One line per confirmation run: its round, the candidate's roles, the objective it measured."""
        if not getattr(self, "_confirm_started", False):
            self._confirm_started = True
            lo, hi = srch.opts.confirm_range
            click.echo(
                f"confirming: the best configs and llama.cpp's defaults race, re-measured interleaved round "
                f"by round; from round {lo} on, a candidate behind the best leaves (at most {hi} rounds)",
                err=True,
            )
        if cand.is_rung and not getattr(self, "_ladder_started", False):
            self._ladder_started = True
            rungs = sorted({c.n_ctx for c in srch.laddering or []})
            click.echo(
                f"context ladder: the recommended config, the defaults and their alternatives at n_ctx "
                f"{', '.join(map(str, rungs))}, each filled to its depth, {srch.opts.confirm_range[0]} "
                "interleaved rounds (a rung's first run fills its context once)",
                err=True,
            )
        s = objective_samples(rec, srch.opts.objective) if rec.ok else []
        what = f"{srch.opts.objective} {sum(s) / len(s):.2f}" if s else f"{rec.outcome}: {rec.cause[:60]}"
        if rec.depth_fill_ms:
            what += f" (filled {rec.config.n_depth} tokens in {rec.depth_fill_ms / 1000:.1f} s)"
        where = f", n_ctx {cand.n_ctx} at depth {cand.config.n_depth}" if cand.is_rung else ""
        # the ETA: the runs the race (and the ladder) can still take
        click.echo(
            f"  [{'ladder' if cand.is_rung else 'confirm'} round {rnd + 1}] #{cand.trial_number} "
            f"({'+'.join(cand.roles)}{where}): {what}; ETA at most {hms(srch.confirm_estimate_s())}",
            err=True,
        )


def print_recommendation(rec: dict | None, study_dir: Path, written: bool = True) -> None:
    if rec is None:
        click.echo(f"no config completed within the limits; see {study_dir / store.TRIALS_FILE} for the causes")
        return
    m = rec["measured"]
    conf = rec.get("confirmation") or {}
    click.echo(
        f"recommended (trial #{rec['trial_number']}, n_ctx {rec.get('working_ctx', '?')}): "
        f"tg {m['tg_ts_mean'] or 0:.2f} ± {m['tg_ts_sd'] or 0:.2f} t/s, pp {m['pp_ts_mean'] or 0:.2f} t/s, "
        f"peak RSS {fmt_size(m['peak_rss_bytes'])}"
        + (f", peak VRAM {fmt_size(m['peak_vram_bytes'])}" if m.get("peak_vram_bytes") else "")
    )
    par = rec.get("parallel")
    if par:
        kv = "one unified KV cache" if par.get("kv_unified") else "n_ctx / N cells each"
        click.echo(
            f"  {par['n_seq']} parallel sequences ({kv}): tg {par['aggregate_tg_tps'] or 0:.2f} t/s together, "
            f"{par['per_stream_tg_tps'] or 0:.2f} per stream; "
            f"pp {par['aggregate_pp_tps'] or 0:.2f} t/s together"
        )
    row = next((c for c in conf.get("candidates", []) if c["trial_number"] == rec["trial_number"]), None)
    if row and row.get("median") is not None:
        click.echo(
            f"  confirmed over {conf['rounds']} interleaved round(s): {conf['objective']} median "
            f"{row['median']:.2f} (95 % interval {row['ci95'][0]:.2f}-{row['ci95'][1]:.2f}); "
            f"{conf['verdict']}: {conf['reason']}"
        )
    elif conf:
        click.echo(f"  {conf.get('verdict')}: {conf.get('reason')}")
    for label, b in rec["baselines"].items():
        if b.get("source") == "confirmation":
            lo, hi = b["ci95"]
            click.echo(
                f"  {b['recommended_vs_baseline']:.2f}x the {label} baseline (95 % interval {lo:.2f}-{hi:.2f}, "
                f"{b['verdict']}; measured interleaved)"
            )
        elif b.get("recommended_vs_baseline"):
            click.echo(
                f"  {b['recommended_vs_baseline']:.2f}x the {label} baseline (trial #{b['trial_number']}; unconfirmed)"
            )
        else:
            click.echo(f"  {label} baseline: {b['outcome']}")
    for line in ladder_lines(rec):
        click.echo(line)
    qual = rec.get("quality")
    if qual:
        b = qual["budget"]
        click.echo(
            f"  quality (KLD from {Path(qual['reference'] or '?').name}; budget: mean KLD <= {b['max_kld']}"
            + (f", same top >= {b['min_same_top']} %" if b.get("min_same_top") is not None else "")
            + "):"
        )
        for f in qual["files"]:
            kld = (
                f"KLD {max(f['kld_mean'], 0.0):.4f}, same top {f['same_top_pct']:.1f} %"
                if f["kld_mean"] is not None
                else f["outcome"]
            )  # float error can make the reference's own -0.0000
            speed = f"best {rec['objective']} {f['best_objective']:.2f}" if f["best_objective"] else "no fitting trial"
            mark = (
                "recommended"
                if f["recommended"]
                else ("within budget" if f["within_budget"] else f"not recommended: {f['reason']}")
            )
            click.echo(f"    {Path(f['model']).name} (KV {f['type_k']}/{f['type_v']}): {kld}; {speed}; {mark}")
    for note in rec.get("notes", []):
        click.echo(f"  note: {note}")
    click.echo(f"  llama-server: {rec['forms']['llama_server']}")
    if written:
        click.echo(f"  written: {study_dir / 'recommended.json'}")


def ladder_lines(rec: dict) -> list[str]:
    """The context ladder as the terminal shows it: per rung, the recommended config against the defaults at the
    same context and depth, and what its alternatives did there."""
    # rows written before rungs were filled (no n_depth) are not shown as a ladder
    ladder = [r for r in rec.get("context_ladder") or [] if "n_depth" in r]
    if not ladder:
        return []
    obj = rec["objective"]

    def num(v, fmt="8.1f"):
        return format(v, fmt) if v is not None else " " * (int(fmt.split(".")[0]) - 1) + "-"

    d0 = (ladder[0].get("defaults") or {}).get("trial_number")
    out = [
        f"  context ladder: the recommended config (#{ladder[0]['trial_number']}) and the llama.cpp defaults"
        + (f" (#{d0})" if d0 is not None else "")
        + f" at each context, filled to the depth shown, "
        f"{ladder[0]['rounds']} interleaved rounds",
        f"    {'n_ctx':>7} {'depth':>7} {'tg t/s':>8} {'(dflt)':>8} {'pp t/s':>8} {'(dflt)':>8} "
        f"{'peak RSS':>10} {'(dflt)':>10}  {obj} x defaults (95 %)",
    ]
    for r in ladder:
        d = r.get("defaults") or {}
        vs = r.get("vs_defaults") or {}
        ratio = (
            f"{vs['ratio']:.2f}x ({vs['ci95'][0]:.2f}-{vs['ci95'][1]:.2f}, {vs['verdict']})"
            if vs.get("ratio") is not None
            else "-"
        )
        out.append(
            f"    {r['n_ctx']:>7} {r['n_depth']:>7} {num(r['tg_ts'])} {num(d.get('tg_ts'))} {num(r['pp_ts'])} "
            f"{num(d.get('pp_ts'))} {fmt_size(r['peak_rss_bytes']):>10} {fmt_size(d.get('peak_rss_bytes')):>10}"
            f"  {ratio}" + (f"  VRAM {fmt_size(r['peak_vram_bytes'])}" if r.get("peak_vram_bytes") else "")
        )
    for r in ladder:
        for a in r.get("alternatives") or []:
            if a["ratio_vs_recommended"] is None:
                continue
            what = ", ".join(f"{k} {v}" for k, v in a["differs"].items())
            out.append(
                f"    at {r['n_ctx']}: #{a['trial_number']} ({what}; {a['kind']}): "
                f"{a['ratio_vs_recommended']:.2f}x the recommended config (p {a['p']:.3g}, {a['verdict']})"
                + (
                    "  <- the context-independent split does not hold here"
                    if a["kind"] == "control" and a["verdict"] == "faster"
                    else ""
                )
            )
    return out

"""The charts of what a search proved beyond its trials: the confirmation race, the context ladder, the quality
budget (each registered in tuner.report.charts.STUDY_CHARTS)."""

from __future__ import annotations

from collections import defaultdict

from tuner.record import TrialRecord
from tuner.report.canvas import Chart, figure, legend, note
from tuner.report.load import (
    Study,
    mem_scale,
    model_label,
)
from tuner.units import fmt_size


def chart_confirmation(study: Study, colours, **options) -> Chart:
    """Each confirmed candidate's samples with the median and its bootstrap interval; the winner starred."""
    fig = figure(1, width=7.5)
    ax = fig.axes[0]
    conf = (study.recommended or {}).get("confirmation") or {}
    obj = conf.get("objective") or study.objective
    ch = Chart(
        "8-confirmation",
        "Confirmation of the winner",
        f"The best configs of the search and llama.cpp's defaults re-measured interleaved round by round: "
        f"every repetition's {obj} (dots), the median (bar) and its bootstrap 95 % interval; ★ = the "
        f"recommendation. Verdict: {conf.get('verdict', 'none')}: {conf.get('reason', 'no confirmation ran')}",
        fig,
        study=study.label,
    )
    rows = [c for c in conf.get("candidates", []) if c.get("samples")]
    if not rows:
        note(
            ax,
            "no confirmation ran (--no-confirm, a Ctrl-C or the budget ended first):\n"
            "the recommendation is the search's own best estimate",
            ch,
        )
    unit = "ms" if obj == "ttft" else "t/s"
    for i, c in enumerate(rows):
        win = c["trial_number"] == study.recommended.get("trial_number")
        colour = "#d62728" if win else ("#222222" if "llama.cpp defaults" in c["roles"] else "#1f77b4")
        ys = c["samples"]
        xs = [i + 0.25 * ((j % 7) / 6 - 0.5) for j in range(len(ys))]
        ax.scatter(xs, ys, s=10, alpha=0.5, color=colour, zorder=3)
        lo, hi = c["ci95"]
        ax.errorbar(
            [i],
            [c["median"]],
            yerr=[[c["median"] - lo], [hi - c["median"]]],
            fmt="_",
            ms=22,
            color=colour,
            capsize=6,
            lw=2,
            zorder=4,
        )
        if win:
            ax.scatter([i], [c["median"]], marker="*", s=220, color=colour, edgecolors="black", zorder=5)
        ch.counts["candidate"] += 1
        ch.counts["samples"] += len(ys)
    ax.set_xticks(
        range(len(rows)),
        [f"#{c['trial_number']}\n{'+'.join(c['roles'])}\nn_ctx {c['n_ctx']}" for c in rows],
        fontsize=7,
    )
    ax.set_ylabel(f"{obj} ({unit}) per repetition")
    vs = conf.get("vs_baseline")
    title = f"{study.label}: confirmation over {conf.get('rounds', 0)} round(s)"
    if vs:
        title += f"; {vs['ratio']:.2f}x the defaults (95 % {vs['ci95'][0]:.2f}-{vs['ci95'][1]:.2f}, {vs['verdict']})"
    fig.suptitle(title)
    return ch


def chart_context_ladder(study: Study, colours, **options) -> Chart:
    """What a filled context costs: tg and pp (left) and peak memory (right) of the recommended config and of the
    llama.cpp defaults at each rung, each filled to the rung's depth and measured interleaved."""
    fig = figure(2)
    # rows written before rungs were filled (no n_depth) are not shown as a ladder
    ladder = [r for r in (study.recommended or {}).get("context_ladder") or [] if "n_depth" in r]
    ch = Chart(
        "9-context-ladder",
        "Context ladder",
        "The recommended config (solid) and the llama.cpp defaults (dashed) at each context of --ctx, each "
        "filled to the depth under the context (tuner search fills a rung unless --depth is given), measured "
        "interleaved: generation and prompt speed (left), peak memory (right).",
        fig,
        study=study.label,
    )
    ax, am = fig.axes
    if len(ladder) < 2:
        for a in (ax, am):
            note(a, "one context only: pass several, e.g. --ctx 4096,16384,32768, for a ladder", ch)
    else:
        xs = [r["n_ctx"] for r in ladder]
        for who, style, get in (("recommended", "-", lambda r: r), ("defaults", "--", lambda r: r.get("defaults"))):
            for key, label, colour in (("tg_ts", "tg", "#1f77b4"), ("pp_ts", "pp", "#ff7f0e")):
                pts = [(x, get(r)[key]) for x, r in zip(xs, ladder) if get(r) and get(r).get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=colour, label=f"{label}, {who}")
                    ch.counts[f"{label} {who}"] += len(pts)
            for key, label, colour in (
                ("peak_rss_bytes", "peak RAM", "#2ca02c"),
                ("peak_vram_bytes", "peak VRAM", "#9467bd"),
            ):
                pts = [(x, get(r)[key]) for x, r in zip(xs, ladder) if get(r) and get(r).get(key)]
                if pts:
                    scale, unit = mem_scale([y for _, y in pts])
                    am.plot(
                        [x for x, _ in pts],
                        [y / scale for _, y in pts],
                        style,
                        marker="o",
                        color=colour,
                        label=f"{label}, {who} ({unit})",
                    )
                    ch.counts[f"{label} {who}"] += len(pts)
        for a in (ax, am):
            a.set_xscale("log", base=2)
            a.set_xticks(xs, [f"{r['n_ctx']}\n({r['n_depth']} filled)" for r in ladder])
            a.set_xlabel("n_ctx (context size, tokens; depth in the cache below)")
            a.legend(fontsize="small")
        ax.set_ylabel("tokens/s")
        am.set_ylabel("peak memory")
    fig.suptitle(f"{study.label}: context ladder ({len(ladder)} context(s))")
    return ch


def chart_quality(study: Study, colours, **options) -> Chart:
    """Speed against quality loss per quant file (and KV-cache types): what each faster quant costs in KLD."""
    fig = figure(1, width=7.5, height=4.6)
    ax = fig.axes[0]
    rec = study.recommended or {}
    obj = rec.get("objective", "tg")
    ch = Chart(
        "10-speed-vs-kld",
        "Speed against quality loss per quant",
        f"Best {obj} of each model file (and KV-cache types) against its mean KL divergence from the "
        "reference (tuner quality); marker area: peak memory; the dashed line is the quality budget: "
        "files right of it are never recommended; the star is the recommendation.",
        fig,
        study=study.label,
    )
    groups: dict[tuple, list[TrialRecord]] = defaultdict(list)
    for r in study.trials:
        if r.kld_mean is not None:
            groups[(model_label(r.config.model), r.config.type_k, r.config.type_v)].append(r)
    points = []
    for (m, tk, tv), rs in sorted(groups.items()):
        ok = [r for r in rs if r.ok and r.objective(obj) is not None]
        if not ok:
            continue
        best = max(ok, key=lambda r: (-1 if obj == "ttft" else 1) * r.objective(obj))
        points.append((m, tk, tv, rs[0].kld_mean, best))
    if not points:
        note(
            ax,
            "no quality figures in this study: search two or more quant files (or pass --reference) "
            "without --no-quality",
            ch,
        )
        fig.suptitle(f"{study.label}: speed against KLD")
        return ch
    mems = [(b.peak_rss_bytes or 0) + (b.peak_vram_bytes or 0) for *_, b in points]
    top = max(mems) or 1
    for (m, tk, tv, kld, best), mem in zip(points, mems):
        label = m + ("" if (tk, tv) == ("f16", "f16") else f" KV {tk}/{tv}")
        ax.scatter(
            [kld],
            [best.objective(obj)],
            s=40 + 260 * mem / top,
            color=colours.get(m, "#1f77b4"),
            alpha=0.8,
            edgecolors="black",
            linewidths=0.5,
            zorder=3,
            label=f"{label} ({fmt_size(mem)})",
        )
        ax.annotate(label, (kld, best.objective(obj)), xytext=(6, 4), textcoords="offset points", fontsize=7.5)
        ch.counts["ok"] += 1
        if (
            best.trial_number == rec.get("trial_number")
            or rec.get("model", {}).get("hash") == best.model_hash
            and (rec.get("config", {}).get("type_k"), rec.get("config", {}).get("type_v")) == (tk, tv)
        ):
            ax.scatter(
                [kld],
                [best.objective(obj)],
                marker="*",
                s=320,
                color="gold",
                edgecolors="black",
                zorder=6,
                label="recommended",
            )
            ch.counts["recommended"] = 1
    budget = (rec.get("quality") or {}).get("budget", {}).get("max_kld")
    if budget is not None:
        ax.axvline(budget, color="#d62728", ls="--", lw=1.2, label=f"budget: mean KLD <= {budget:g}")
        ch.counts["budget"] = 1
    else:
        note(ax, "no quality budget in recommended.json", ch, "top")
    xs = [p[3] for p in points] + ([budget] if budget else [])
    positive = [x for x in xs if x > 0]
    if positive:
        ax.set_xscale("symlog", linthresh=min(positive))
    ax.set_xlabel("mean KL divergence from the reference (lower is better)")
    ax.set_ylabel(f"best {obj} of the file's configs")
    legend(fig, [], "right")
    fig.suptitle(f"{study.label}: speed against KLD per quant")
    return ch

"""CLI pieces shared by several commands: the limits options, the per-trial progress line, the recommendation."""

from __future__ import annotations

import time
from pathlib import Path

import click

from tuner import store
from tuner.bench import fmt_size
from tuner.options import HEADROOM, SIZE


def limits_options(f):
    """Constraints a recommendation must meet; shared by search and recommend."""
    opts = [
        click.option("--min-ctx", type=int, default=0, help="the context you need: smaller n_ctx never qualifies"),
        click.option("--max-vram", type=SIZE, default=None, help="VRAM a config may use, e.g. 20GiB"),
        click.option("--max-ram", type=SIZE, default=None, help="host RAM a config may use, e.g. 200GiB"),
        click.option("--headroom", type=HEADROOM, default="1GiB", show_default=True,
                     help="memory left free for the OS and the display (Windows/WDDM reserves VRAM): "
                          "a size or a share, e.g. 2GiB or 5%"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def log(line: str) -> None:
    click.echo(line, err=True)


class Progress:
    """One line per trial: count, elapsed, ETA against the budget, best so far, the last outcome."""

    def __call__(self, srch, rec) -> None:
        from tuner.search import search_total

        opts = srch.opts
        total = search_total(srch)
        n = srch.done_trials()
        elapsed = time.monotonic() - srch.started
        eta = None
        if total:
            eta = elapsed / max(srch.n_run, 1) * max(total - n, 0)  # this session's pace
        if opts.timeout_s:
            left = max(0.0, opts.timeout_s - elapsed)
            eta = min(eta, left) if eta is not None else left
        best = srch.best_so_far()
        tg = rec.metric("tg")
        last = (f"#{rec.trial_number} ok tg {tg[0]:.2f}±{tg[1]:.2f} t/s" if rec.ok and tg[0] is not None
                else f"#{rec.trial_number} {rec.outcome}: {rec.cause[:70]}")
        unit = "ms" if opts.objective == "ttft" and not opts.pareto else "t/s"
        label = "tg" if opts.pareto else opts.objective
        click.echo(f"[{n}/{total or '?'}] {hms(elapsed)} elapsed"
                   + (f", ETA {hms(eta)}" if eta is not None else "")
                   + (f" | best {label} {best[1]:.2f} {unit} (#{best[0]})" if best else " | no ok trial yet")
                   + f" | {last}", err=True)


def hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def print_recommendation(rec: dict | None, study_dir: Path) -> None:
    if rec is None:
        click.echo(f"no config completed within the limits; see {study_dir / store.TRIALS_FILE} for the causes")
        return
    m = rec["measured"]
    click.echo(f"recommended (trial #{rec['trial_number']}): tg {m['tg_ts_mean']:.2f} ± {m['tg_ts_sd']:.2f} t/s, "
               f"pp {m['pp_ts_mean'] or 0:.2f} t/s, peak RSS {fmt_size(m['peak_rss_bytes'])}"
               + (f", peak VRAM {fmt_size(m['peak_vram_bytes'])}" if m.get("peak_vram_bytes") else ""))
    for label, b in rec["baselines"].items():
        if b.get("recommended_vs_baseline"):
            click.echo(f"  {b['recommended_vs_baseline']:.2f}x the {label} baseline (trial #{b['trial_number']})")
        else:
            click.echo(f"  {label} baseline: {b['outcome']}")
    click.echo(f"  llama-server: {rec['forms']['llama_server']}")
    click.echo(f"  written: {study_dir / 'recommended.json'}")

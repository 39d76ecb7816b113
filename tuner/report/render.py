"""The text part of the report: a list of blocks built once, rendered to both HTML and Markdown.

Both then say the same thing, and every piece of text from a study (GGUF names, paths, stderr) is escaped here.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
import statistics
from collections import Counter
from pathlib import Path

from tuner.record import OUTCOMES, TrialRecord
from tuner.report.canvas import Chart
from tuner.report.charts import shared_configs
from tuner.report.load import SHAPE_FIELDS, Study, fmt_ts, model_label, parse_utc, shape_label, varying_fields, xvalue
from tuner.search.recommend import BASELINES, RECOMMENDED_FILE
from tuner.tables import markdown_table
from tuner.units import fmt_duration, fmt_size

# ---------------------------------------------------------------------------------------------------------
# the text part: blocks rendered to HTML and Markdown
# ---------------------------------------------------------------------------------------------------------
# ("h", level, text) ("p", text) ("list", [text]) ("table", headers, rows) ("code", text) ("chart", Chart)


def _outcome_counts(recs: list[TrialRecord]) -> str:
    c = Counter(r.outcome for r in recs)
    return ", ".join(
        f"{n} {o}" for o, n in sorted(c.items(), key=lambda kv: OUTCOMES.index(kv[0]) if kv[0] in OUTCOMES else 99)
    )


def _hw_rows(s: Study) -> list[list[str]]:
    hw, build = s.hw, s.build
    gpus = hw.get("gpus") or []
    rows = [
        [
            "CPU",
            f"{hw.get('cpu', '?')}, {hw.get('cores_physical', '?')} physical / "
            f"{hw.get('cores_logical', '?')} logical cores",
        ],
        [
            "RAM",
            fmt_size(hw.get("ram_total"))
            + (f", swap {fmt_size(hw.get('swap_total'))}" if hw.get("swap_total") is not None else ""),
        ],
        [
            "GPUs",
            "; ".join(
                f"{g.get('name', '?')} ({fmt_size(g.get('vram_total'))}"
                + (f", driver {g['driver']}" if g.get("driver") else "")
                + ")"
                for g in gpus
            )
            or f"none ({hw.get('nvml') or 'no NVML device'})",
        ],
        ["OS", str(hw.get("os", "?"))],
        [
            "llama-cpp-python",
            f"{build.get('llama_cpp_python', '?')}, GPU offload {'yes' if build.get('gpu_offload') else 'no'}",
        ],
        ["system info", str(build.get("system_info", ""))[:240]],
    ]
    for what in ("hw_fingerprint", "build_fingerprint"):
        fps = Counter(getattr(r, what) for r in s.records if getattr(r, what))
        label = "hardware fingerprint" if what == "hw_fingerprint" else "build fingerprint"
        rows.append([label, ", ".join(f"{fp} ({n} trials)" if len(fps) > 1 else fp for fp, n in fps.items()) or "-"])
    return rows


def _llama_kwargs(kwargs: dict) -> str:
    lines = ["from llama_cpp import Llama", "", "llm = Llama("]
    lines += [f"    {k}={v!r}," for k, v in kwargs.items()]
    return "\n".join(lines + [")"])


def _recommendation_blocks(s: Study) -> list:
    rec = s.recommended
    out: list = [("h", 3, "Recommendation")]
    if rec is None:
        n_ok = len(s.ok)
        why = "no trial succeeded" if not n_ok else f"{n_ok} trial(s) ran ok but none within the limits"
        out.append(("p", f"No recommendation: {why}. The failures below say what went wrong."))
        return out
    m = rec.get("measured") or {}
    model = rec.get("model") or {}
    obj = rec.get("objective", "tg")
    parts = [
        f"tg {fmt_ts(m.get('tg_ts_mean'), m.get('tg_ts_sd'))} t/s",
        f"pp {fmt_ts(m.get('pp_ts_mean'), m.get('pp_ts_sd'))} t/s",
    ]
    if m.get("ttft_ms_mean") is not None:
        parts.append(f"TTFT {fmt_ts(m.get('ttft_ms_mean'), m.get('ttft_ms_sd'))} ms")
    parts.append(f"peak RAM {fmt_size(m.get('peak_rss_bytes'))}")
    if m.get("peak_vram_bytes"):
        parts.append(f"peak VRAM {fmt_size(m.get('peak_vram_bytes'))}")
    out.append(
        (
            "p",
            f"Trial #{rec.get('trial_number')} (objective: {obj}): "
            f"{model_label(str(model.get('path') or rec['config'].get('model', '')))} "
            f"({model.get('file_type') or '?'}, {fmt_size(model.get('size_bytes'))}); "
            + ", ".join(parts)
            + f" over {m.get('repetitions', '?')} repetitions "
            f"(pp{m.get('n_prompt', '?')}/tg{m.get('n_gen', '?')}).",
        )
    )
    head = rec.get("headroom_left") or {}
    if head.get("ram_bytes") is not None:
        out.append(
            (
                "p",
                f"Headroom left: RAM {fmt_size(head['ram_bytes'])}"
                + (f", VRAM {fmt_size(head['vram_bytes'])}" if head.get("vram_bytes") is not None else "")
                + f"; model file: {model.get('path') or rec['config'].get('model')}",
            )
        )
    cfg = rec["config"]
    keys = [k for k in cfg if k not in ("model", "overrides") and k not in SHAPE_FIELDS] + ["overrides"]
    out.append(
        (
            "table",
            ["parameter", "value"],
            [[k, ", ".join(cfg[k]) if isinstance(cfg[k], list) else str(cfg[k])] for k in keys if k in cfg],
        )
    )
    conf = rec.get("confirmation") or {}
    if conf:
        out += [("h", 4, "Confirmation"), ("p", f"{conf.get('verdict', '?')}: {conf.get('reason', '')}")]
        rows = [
            [
                f"#{c['trial_number']}",
                "+".join(c["roles"]),
                str(c["n_ctx"]),
                str(c["runs"]),
                f"{c['median']:.2f}" if c.get("median") is not None else "-",
                f"{c['ci95'][0]:.2f}-{c['ci95'][1]:.2f}" if c.get("median") is not None else "-",
                fmt_size(c.get("peak_memory_bytes")),
            ]
            for c in conf.get("candidates", [])
        ]
        if rows:
            out.append(
                ("table", ["trial", "role", "n_ctx", "runs", f"median {obj}", "95 % interval", "peak memory"], rows)
            )
    # rows written before rungs were filled (no n_depth) are not shown as a ladder
    ladder = [r for r in rec.get("context_ladder") or [] if "n_depth" in r]
    if ladder:

        def f(v):
            return f"{v:.2f}" if v is not None else "-"

        rows = []
        for r in ladder:
            d, vs = r.get("defaults") or {}, r.get("vs_defaults") or {}
            rows.append(
                [
                    str(r["n_ctx"]),
                    str(r["n_depth"]),
                    f"#{r['trial_number']}",
                    f(r["tg_ts"]),
                    f(d.get("tg_ts")),
                    f(r["pp_ts"]),
                    f(d.get("pp_ts")),
                    fmt_size(r.get("peak_rss_bytes")),
                    fmt_size(d.get("peak_rss_bytes")),
                    f"{vs['ratio']:.2f}x ({vs['ci95'][0]:.2f}-{vs['ci95'][1]:.2f}, {vs['verdict']})"
                    if vs.get("ratio") is not None
                    else "-",
                ]
            )
        out += [
            ("h", 4, "Context ladder"),
            (
                "p",
                "The recommended config and the llama.cpp defaults at each context, filled to the depth "
                f"shown, {ladder[0]['rounds']} interleaved rounds.",
            ),
            (
                "table",
                [
                    "n_ctx",
                    "depth",
                    "trial",
                    "tg t/s",
                    "defaults",
                    "pp t/s",
                    "defaults",
                    "peak RAM",
                    "defaults",
                    f"{obj} x defaults (95 %)",
                ],
                rows,
            ),
        ]
        alts = [
            [
                str(r["n_ctx"]),
                f"#{a['trial_number']}",
                ", ".join(f"{k} {v}" for k, v in a["differs"].items()),
                a["kind"],
                f"{a['ratio_vs_recommended']:.2f}x",
                f"{a['p']:.3g}",
                a["verdict"],
            ]
            for r in ladder
            for a in r.get("alternatives") or []
            if a["ratio_vs_recommended"] is not None
        ]
        if alts:
            out.append(("table", ["n_ctx", "alternative", "differs in", "kind", "x recommended", "p", "verdict"], alts))
    items = []
    for label, b in (rec.get("baselines") or {}).items():
        if b.get("source") == "confirmation":
            items.append(
                f"{b['recommended_vs_baseline']:.2f}× the {label} baseline, 95 % interval "
                f"{b['ci95'][0]:.2f}-{b['ci95'][1]:.2f} ({b['verdict']}; winner and baseline measured "
                "interleaved in the confirmation)"
            )
        elif b.get("recommended_vs_baseline"):
            items.append(
                f"{b['recommended_vs_baseline']:.2f}× the {label} baseline (trial #{b.get('trial_number')}: "
                f"{obj} {b.get(obj):.2f}{' ms' if obj == 'ttft' else ' t/s'}; unconfirmed)"
            )
        else:
            items.append(
                f"{label} baseline (trial #{b.get('trial_number')}): {b.get('outcome')}"
                + (f": {b['cause'][:160]}" if b.get("cause") else "")
            )
    for label in BASELINES:
        if label not in (rec.get("baselines") or {}):
            items.append(f"{label} baseline: not run (same config as another baseline, --no-baselines or grid)")
    out += [("h", 4, "Against the baselines"), ("list", items)]
    forms = rec.get("forms") or {}
    if forms.get("llama_cpp_python"):
        out += [("h", 4, "llama-cpp-python"), ("code", _llama_kwargs(forms["llama_cpp_python"]))]
    if forms.get("llama_server"):
        out += [("h", 4, "llama-server"), ("code", forms["llama_server"])]
    if forms.get("ollama_modelfile"):
        out += [("h", 4, "Ollama Modelfile"), ("code", forms["ollama_modelfile"])]
    if forms.get("tuner_bench"):
        out += [
            ("h", 4, "re-measure"),
            ("code", forms["tuner_bench"].replace(RECOMMENDED_FILE, str(s.path / RECOMMENDED_FILE))),
        ]
    for n in forms.get("notes") or []:
        out.append(("p", f"Note: {n}"))
    return out


def _verify_blocks(s: Study) -> list:
    """verify.json: the recommendation served (tuner verify) and what a client measured, beside the study."""
    v = s.verified
    if not v or s.recommended is None:
        return []

    def f(x):
        return f"{x:.2f}" if x is not None else "-"

    st, r = v.get("study_figures") or {}, v.get("ratio") or {}
    shape = v.get("test_shape") or {}
    out: list = [
        ("h", 4, "Served (tuner verify)"),
        (
            "p",
            f"{v.get('server')} served trial #{v.get('recommended_trial')} ({v.get('created_utc', '?')}): "
            f"{v.get('requests_ok')}/{v.get('requests_sent')} streamed requests ok, "
            f"pp{shape.get('n_prompt', '?')} + tg{shape.get('n_gen', '?')}; verdict {v.get('verdict', '?')}.",
        ),
    ]
    if v.get("error"):
        out.append(("p", f"The server failed: {v['error']}"))
    rows = [
        [
            "tg t/s",
            f(v.get("client_tg_tps")),
            f(st.get("tg_tps")),
            f"{r['tg']:.2f}" if r.get("tg") else "-",
        ],
        [
            "TTFT ms",
            f(v.get("client_ttft_ms")),
            f(st.get("ttft_ms")),
            f"{r['ttft']:.2f}" if r.get("ttft") else "-",
        ],
    ]
    if now := v.get("bare_now"):
        rn = v.get("ratio_now") or {}
        for label, key, rk in (("tg t/s", "tg_tps", "tg"), ("TTFT ms", "ttft_ms", "ttft")):
            rows.append(
                [
                    f"{label} (bare now: before and after serving)",
                    f(v.get(f"client_{key}")),
                    f(now.get(key)),
                    f"{rn[rk]:.2f}" if rn.get(rk) else "-",
                ]
            )
    for lv in (v.get("levels") or [])[1:]:
        rows.append(
            [
                f"aggregate tg t/s, {lv['concurrency']} at a time",
                f(lv.get("aggregate_tg_tps")),
                f((st.get("parallel") or {}).get("aggregate_tg_tps")),
                f"{r['aggregate_tg']:.2f}" if r.get("aggregate_tg") else "-",
            ]
        )
    out.append(("table", ["", "client (median)", "study", "client / study"], rows))
    notes = [v.get("server_adds") or "", *(v.get("notes") or [])]
    notes += [f"not applied by this server: {n}" for n in v.get("not_applied") or []]
    if v.get("recommended_trial") != s.recommended.get("trial_number"):
        notes.append("verify.json served another trial than the current recommendation: run `tuner verify` again")
    out.append(("list", [n for n in notes if n]))
    return out


def _drift_blocks(s: Study) -> list:
    out: list = [("h", 3, "Drift")]
    anchors = [r for r in s.anchors if r.metric("tg")[0] is not None]
    drifted = sorted(r.trial_number for r in s.trials if r.drift and r.trial_number is not None)
    if not s.anchors:
        out.append(("p", "No drift check ran (no anchor re-measurement: --drift-every 0, or too few trials)."))
        return out
    first = anchors[0].metric("tg")[0] if anchors else None
    seq = ", ".join(f"{r.metric('tg')[0]:.2f}" for r in anchors)
    if drifted:
        text = (
            f"Drift detected: the anchor config (re-measured {len(s.anchors)}×, tg t/s: {seq}) moved beyond the "
            f"tolerance; {len(drifted)} trial(s) were measured under drift (#{drifted[0]}–#{drifted[-1]}) and "
            f"count only when nothing else fits."
        )
    else:
        text = f"No drift detected: the anchor config was re-measured {len(s.anchors)}× (tg t/s: {seq})."
    if first and anchors:
        text += f" Last anchor vs first: {anchors[-1].metric('tg')[0] / first - 1:+.1%}."
    out.append(("p", text))
    if s.recommended is not None:
        out.append(
            (
                "p",
                "The recommended config was "
                + (
                    "measured under drift: re-measure it with the command above."
                    if s.recommended.get("drift")
                    else "measured while the machine was stable."
                ),
            )
        )
    return out


def _top_blocks(s: Study, top: int) -> list:
    ok = sorted([r for r in s.ok if r.metric("tg")[0] is not None], key=lambda r: -r.metric("tg")[0])
    out: list = [("h", 3, f"Top configs by tg ({min(top, len(ok))} of {len(ok)} ok)")]
    if not ok:
        out.append(("p", "No trial succeeded."))
        return out
    vary = [k for k in varying_fields(s.trials) if k != "model"]
    show = list(dict.fromkeys(["n_gpu_layers", "n_ctx"] + vary))
    rec_n = (s.recommended or {}).get("trial_number")
    headers = ["trial", "model"] + show + ["tg t/s", "pp t/s", "peak RAM", "peak VRAM", "note"]
    rows = []
    for r in ok[:top]:
        note = ", ".join(
            x
            for x in (
                "recommended" if r.trial_number == rec_n else "",
                r.baseline if r.baseline else "",
                "drift" if r.drift else "",
            )
            if x
        )
        rows.append(
            [f"#{r.trial_number}", model_label(r.config.model)]
            + [str(xvalue(r, k)) for k in show]
            + [
                fmt_ts(*r.metric("tg")),
                fmt_ts(*r.metric("pp")),
                fmt_size(r.peak_rss_bytes),
                fmt_size(r.peak_vram_bytes),
                note,
            ]
        )
    out.append(("table", headers, rows))
    return out


def _quality_blocks(s: Study) -> list:
    """What each quant file costs in quality, and what it would have given in speed (recommended.json)."""
    qual = (s.recommended or {}).get("quality")
    if not qual:
        return []
    b = qual["budget"]
    obj = (s.recommended or {}).get("objective", "tg")
    budget = f"mean KLD <= {b['max_kld']:g}" if b.get("max_kld") is not None else "no KLD bound"
    if b.get("min_same_top") is not None:
        budget += f", same top >= {b['min_same_top']:g} %"
    rows = [
        [
            Path(f["model"]).name + (" (ref)" if f["is_reference"] else ""),
            f["file_type"],
            f"{f['type_k']}/{f['type_v']}",
            f"{f['kld_mean']:.5f} ± {f['kld_mean_err']:.5f}" if f["kld_mean"] is not None else f["outcome"],
            f"{f['same_top_pct']:.2f} %" if f["same_top_pct"] is not None else "-",
            f"{f['ppl_ratio']:.4f}" if f["ppl_ratio"] is not None else "-",
            f"{f['best_objective']:.2f}" if f["best_objective"] else "-",
            fmt_size(f.get("peak_rss_bytes")),
            "recommended" if f["recommended"] else ("yes" if f["within_budget"] else f["reason"]),
        ]
        for f in qual["files"]
    ]
    return [
        ("h", 3, "Quality"),
        (
            "p",
            f"KL divergence of each file from {Path(qual.get('reference') or '?').name} on "
            f"{qual.get('text')} (ctx {qual.get('ctx')}); budget: {budget}. Files beyond the budget were "
            "searched but are never recommended: their best speed shows what they would have given.",
        ),
        (
            "table",
            ["model", "type", "KV", "mean KLD", "same top", "PPL ratio", f"best {obj}", "peak RAM", "within budget"],
            rows,
        ),
    ]


def failure_groups(s: Study) -> list[dict]:
    """Failed and skipped trials grouped by outcome and cause (trial numbers in causes don't split groups)."""
    groups: dict = {}
    for r in s.trials:
        if r.ok:
            continue
        key = (r.outcome, re.sub(r"#\d+", "#N", r.cause or ""))
        g = groups.setdefault(
            key, {"outcome": r.outcome, "cause": r.cause or "(no cause recorded)", "trials": [], "stderr": ""}
        )
        g["trials"].append(r.trial_number)
        if not g["stderr"]:
            g["stderr"] = s.stderr_first_line(r)
    return sorted(groups.values(), key=lambda g: (-len(g["trials"]), g["outcome"]))


def _failure_blocks(s: Study) -> list:
    out: list = [("h", 3, "Failures")]
    groups = failure_groups(s)
    if not groups:
        out.append(("p", "No trial failed."))
        return out
    out.append(
        (
            "p",
            f"{sum(len(g['trials']) for g in groups)} of {len(s.trials)} trials did not run ok "
            f"({_outcome_counts([r for r in s.trials if not r.ok])}). Worker logs: {s.path / 'logs'}",
        )
    )
    rows = [
        [
            g["outcome"],
            str(len(g["trials"])),
            ", ".join(f"#{n}" for n in g["trials"][:12]) + (" …" if len(g["trials"]) > 12 else ""),
            g["cause"][:240],
            g["stderr"][:240] or "-",
        ]
        for g in groups
    ]
    out.append(("table", ["outcome", "count", "trials", "cause", "first line of stderr"], rows))
    return out


def planner_rows(s: Study) -> list[dict]:
    rows = []
    for r in s.trials:
        if not r.ok or r.predicted_ram_bytes is None or not r.peak_rss_bytes:
            continue
        row = {
            "trial": r.trial_number,
            "model": model_label(r.config.model),
            "pred_ram": r.predicted_ram_bytes,
            "ram": r.peak_rss_bytes,
            "ram_err": r.predicted_ram_bytes / r.peak_rss_bytes - 1,
            "pred_vram": r.predicted_vram_bytes,
            "vram": r.peak_vram_bytes,
            "vram_err": None,
        }
        if r.predicted_vram_bytes is not None and r.peak_vram_bytes:
            row["vram_err"] = r.predicted_vram_bytes / r.peak_vram_bytes - 1
        rows.append(row)
    return rows


def _planner_blocks(s: Study, top: int) -> list:
    rows = planner_rows(s)
    roof = [(r, r.to_row()["tg_roofline_pct"]) for r in s.ok]
    roof = [(r, p) for r, p in roof if p is not None]
    if not rows and not roof:
        return []
    out: list = [("h", 3, "Planner and roofline")]
    if rows:

        def summary(key, what):
            errs = [x[key] for x in rows if x[key] is not None]
            if not errs:
                return None
            worst = max(errs, key=abs)
            return (
                f"{what}: median |error| {statistics.median(abs(e) for e in errs):.1%}, worst {worst:+.1%} "
                f"over {len(errs)} ok trials (predicted / measured − 1)"
            )

        out.append(("list", [x for x in (summary("ram_err", "peak RAM"), summary("vram_err", "peak VRAM")) if x]))
        worst = sorted(rows, key=lambda x: -abs(x["ram_err"]))[:top]
        out.append(
            (
                "table",
                [
                    "trial",
                    "model",
                    "predicted RAM",
                    "measured RAM",
                    "error",
                    "predicted VRAM",
                    "measured VRAM",
                    "error",
                ],
                [
                    [
                        f"#{x['trial']}",
                        x["model"],
                        fmt_size(x["pred_ram"]),
                        fmt_size(x["ram"]),
                        f"{x['ram_err']:+.1%}",
                        fmt_size(x["pred_vram"]),
                        fmt_size(x["vram"]),
                        f"{x['vram_err']:+.1%}" if x["vram_err"] is not None else "-",
                    ]
                    for x in worst
                ],
            )
        )
    if roof:
        pcts = [p for _, p in roof]
        rec_n = (s.recommended or {}).get("trial_number")
        rec_p = next((p for r, p in roof if r.trial_number == rec_n), None)
        out.append(
            (
                "p",
                f"tg as % of the memory-bandwidth roofline: median {statistics.median(pcts):.0f}%, best "
                f"{max(pcts):.0f}% over {len(pcts)} ok trials"
                + (f"; the recommended config: {rec_p:.0f}%." if rec_p is not None else "."),
            )
        )
    return out


def study_blocks(s: Study, charts: list[Chart], top: int = 10) -> list:
    trials = s.trials
    starts = [t for t in (parse_utc(r.started_utc) for r in s.records) if t]
    ends = [t for t in (parse_utc(r.finished_utc) for r in s.records) if t]
    when = (
        f"; {min(starts):%Y-%m-%d %H:%M} UTC, {fmt_duration((max(ends) - min(starts)).total_seconds())}"
        if starts and ends
        else ""
    )
    models = Counter(model_label(r.config.model) for r in trials)
    facts = {model_label(r.config.model): r for r in s.records if r.model_name or r.model_file_type}
    blocks: list = [
        ("h", 2, f"Study {s.label}" + (f" ({s.name})" if s.name != s.label else "")),
        (
            "p",
            f"Folder {s.path}: {len(trials)} trials ({_outcome_counts(trials)})"
            + (f" and {len(s.anchors)} drift-anchor re-measurements" if s.anchors else "")
            + f"; objective {s.objective}; test shape {shape_label(trials)}{when}.",
        ),
        (
            "p",
            "Quant files: "
            + "; ".join(
                f"{m} ("
                + (
                    f"GGUF name {facts[m].model_name}, {facts[m].model_file_type}, "
                    f"{fmt_size(facts[m].model_size_bytes)}; "
                    if m in facts
                    else ""
                )
                + f"{n} trials)"
                for m, n in sorted(models.items())
            )
            + ". Searched: "
            + (", ".join(f for f in varying_fields(trials) if f != "model") or "nothing varied")
            + ".",
        ),
        ("h", 3, "Hardware and build"),
        ("table", ["", ""], _hw_rows(s)),
    ]
    blocks += _recommendation_blocks(s)
    blocks += _verify_blocks(s)
    blocks += _drift_blocks(s)
    blocks += _top_blocks(s, top)
    blocks += _quality_blocks(s)
    blocks += _failure_blocks(s)
    blocks += _planner_blocks(s, top)
    blocks.append(("h", 3, "Charts"))
    if s.optuna_trials is None:
        blocks.append(("p", f"Note: {s.optuna_note}."))
    blocks += [("chart", c) for c in charts]
    return blocks


def compare_blocks(studies: list[Study], chart: Chart | None) -> list:
    rows = []
    for s in studies:
        rec = s.recommended or {}
        m = rec.get("measured") or {}
        gpus = ", ".join(g.get("name", "?") for g in s.hw.get("gpus") or []) or "none"
        rows.append(
            [
                s.label,
                str(s.hw.get("cpu", "?")),
                gpus,
                s.trials[0].hw_fingerprint or "-",
                s.trials[0].build_fingerprint or "-",
                f"{len(s.ok)}/{len(s.trials)}",
                (f"#{rec.get('trial_number')} {model_label(str(rec['config'].get('model', '')))}" if rec else "none"),
                fmt_ts(m.get("tg_ts_mean"), m.get("tg_ts_sd")),
                fmt_size(m.get("peak_rss_bytes")) if rec else "-",
            ]
        )
    out: list = [
        ("h", 2, f"Comparison of {len(studies)} studies"),
        (
            "table",
            [
                "study",
                "CPU",
                "GPUs",
                "hw fingerprint",
                "build fingerprint",
                "ok/trials",
                "recommended",
                "tg t/s",
                "peak RAM",
            ],
            rows,
        ),
    ]
    hws = {s.trials[0].hw_fingerprint for s in studies}
    builds = {s.trials[0].build_fingerprint for s in studies}
    out.append(
        (
            "p",
            ("Same hardware" if len(hws) == 1 else "Different hardware")
            + " and "
            + ("the same build." if len(builds) == 1 else "different llama.cpp builds."),
        )
    )
    base = studies[0]
    for s in studies[1:]:
        shared = shared_configs(base, s)
        out.append(("h", 3, f"{s.label} against {base.label}"))
        if not shared:
            out.append(("p", "No config was measured ok in both."))
            continue
        ratios = [x["ratio"] for x in shared if x["ratio"]]
        out.append(
            (
                "p",
                f"{len(shared)} config(s) measured ok in both: tg in {s.label} is a median "
                f"{statistics.median(ratios):.2f}× that in {base.label} (geometric mean "
                f"{math.exp(statistics.fmean(math.log(r) for r in ratios)):.2f}×).",
            )
        )
        out.append(
            (
                "table",
                ["config", f"tg {base.label}", f"tg {s.label}", "ratio"],
                [
                    [x["config"], f"{x['tg_a']:.2f}", f"{x['tg_b']:.2f}", f"{x['ratio']:.2f}×"]
                    for x in sorted(shared, key=lambda x: x["ratio"] or 0)
                ],
            )
        )
    if chart is not None:
        out.append(("chart", chart))
    return out


def _md_text(t: str) -> str:
    t = html.escape(str(t), quote=False)
    t = re.sub(r"([\\`*\[\]|])", r"\\\1", t)
    t = re.sub(r"^([#>+-])", r"\\\1", t)  # would start a heading, quote or list
    return re.sub(r"(?<!\w)_|_(?!\w)", r"\\_", t)


def _md_fence(code: str) -> str:
    n = max([3] + [len(m) + 1 for m in re.findall(r"`+", code)])
    return "`" * n + "\n" + code + "\n" + "`" * n


def to_markdown(title: str, blocks: list, chart_fmt: str, base: Path) -> str:
    lines = [f"# {_md_text(title)}", ""]
    for b in blocks:
        kind = b[0]
        if kind == "h":
            lines += [f"{'#' * b[1]} {_md_text(b[2])}", ""]
        elif kind == "p":
            lines += [_md_text(b[1]), ""]
        elif kind == "list":
            lines += [f"- {_md_text(x)}" for x in b[1]] + [""]
        elif kind == "code":
            lines += [_md_fence(b[1]), ""]
        elif kind == "table":
            lines += [
                markdown_table(
                    [_md_text(h) or " " for h in b[1]],
                    [[_md_text(c).replace("\n", " ") for c in row] for row in b[2]],
                    pad=False,
                ),
                "",
            ]
        elif kind == "chart":
            c: Chart = b[1]
            f = c.files.get(chart_fmt)
            rel = os.path.relpath(f, base).replace(os.sep, "/") if f else ""
            lines += [
                f"![{_md_text(c.title)}]({rel})" if rel else f"*{_md_text(c.title)}*",
                "",
                f"*{_md_text(c.caption)}*"
                + (" " + " ".join(f"Note: {_md_text(n)}." for n in c.notes) if c.notes else ""),
                "",
            ]
    return "\n".join(lines)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.4}
h1{border-bottom:2px solid #ddd}h2{border-bottom:1px solid #ddd;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .5em;
text-align:left;vertical-align:top}th{background:#f4f4f4}tr:nth-child(even) td{background:#fafafa}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto;border:1px solid #e1e4e8}
figure{margin:1em 0;border:1px solid #eee;padding:.5em}figure img{max-width:100%}
figcaption{font-size:.9em;color:#444}.note{color:#8a6d00}
"""


def to_html(title: str, blocks: list, chart_fmt: str) -> str:
    e = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for b in blocks:
        kind = b[0]
        if kind == "h":
            parts.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif kind == "p":
            parts.append(f"<p>{e(b[1])}</p>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b[1]) + "</ul>")
        elif kind == "code":
            parts.append(f"<pre><code>{e(b[1])}</code></pre>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1]) if any(b[1]) else ""
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b[2])
            parts.append(f"<table>{'<tr>' + head + '</tr>' if head else ''}{body}</table>")
        elif kind == "chart":
            c: Chart = b[1]
            fmt = chart_fmt if chart_fmt in c.files else next(iter(c.files), None)
            mime = {"png": "image/png", "svg": "image/svg+xml"}.get(fmt or "")
            # images as data: URIs in <img>: self-contained, and an <img> never runs script from an SVG
            img = (
                f'<img alt="{e(c.title)}" src="data:{mime};base64,'
                f'{base64.b64encode(c.files[fmt].read_bytes()).decode()}">'
                if mime
                else f'<p class="note">(chart only as {e(fmt or "nothing")})</p>'
            )
            notes = "".join(f' <span class="note">Note: {e(n)}.</span>' for n in c.notes)
            parts.append(
                f'<figure id="{e((c.study + "-" if c.study else "") + c.key)}">{img}<figcaption><b>'
                f"{e(c.title)}.</b> {e(c.caption)}{notes}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)

"""`tuner report`: charts, report.html and report.md from real studies on synthetic models.

The studies are real `tuner search` runs (through CliRunner, small shapes), built once per session. The one
exception is `gpu_study`: this machine has no GPU, so its rows are real measured records of `cpu_study` with
n_gpu_layers, peak VRAM, the GPU in the hardware dict and the planner/roofline fields EDITED, to exercise the
GPU-shaped charts and the planner section (said again where it is built).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import shutil
from html import escape
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import HOST_ONLY

from tuner import report
from tuner.cli import cli
from tuner.measure import hardware, store
from tuner.measure.hardware import GPU, Hardware
from tuner.model.meta import read_model
from tuner.model.synth import PRESETS, write_base
from tuner.plan import planner, roofline
from tuner.record import FAILED
from tuner.search import recommend
from tuner.search.options import Limits

MiB = 1 << 20
EVIL = "<script>alert(1)</script>"
SHAPE = ["-p", "32", "-n", "8", "-r", "2"]


def _search(tmp: Path, *args: str) -> None:
    # session fixtures run before conftest's per-test private lock: give the search its own lock file
    res = CliRunner().invoke(
        cli,
        ["search", *args, *SHAPE, "--results", str(tmp), "--mem-limit", "150MiB"],
        env={"TUNER_LOCK_FILE": str(tmp / "measure.lock"), **HOST_ONLY},
    )
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="session")
def cpu_study(models, tmp_path_factory) -> Path:
    """Two quants, threads × ubatch × ctx; ctx 65536 runs out of memory under the 150 MiB limit. --ngl 0: a CPU
    study on a GPU build too (host memory is what the limit caps)."""
    tmp = tmp_path_factory.mktemp("studies")
    _search(
        tmp,
        "-m",
        str(models / "tiny-q8_0.gguf"),
        "-m",
        str(models / "tiny-q4_k_m.gguf"),
        "--ngl",
        "0",
        "--threads",
        "1:2",
        "-ub",
        "128,512",
        "--ctx",
        "256,4096,65536",
        "--n-trials",
        "10",
        "--drift-every",
        "4",
        "--drift-tolerance",
        "0.5",  # anchors run; a tiny model's 2-repetition noise is no drift
        "--study",
        "cpu",
        "--no-auto-space",
        "--confirm",
        "2",
        "--confirm-rounds",
        "5",
        "--no-quality",
    )
    return tmp / "cpu"


@pytest.fixture(scope="session")
def rig_b(models, tmp_path_factory) -> Path:
    """A second, smaller study of the same model and shape (a grid), for the comparison."""
    tmp = tmp_path_factory.mktemp("rigb")
    _search(
        tmp,
        "-m",
        str(models / "tiny-q8_0.gguf"),
        "--ngl",
        "0",
        "--threads",
        "1:2",
        "-ub",
        "128",
        "--ctx",
        "256,4096",
        "--sampler",
        "grid",
        "--study",
        "cpu",
        "--no-auto-space",
        "--no-confirm",
    )
    return tmp / "cpu"


@pytest.fixture(scope="session")
def failed_study(tmp_path_factory) -> Path:
    """Every trial fails (only ctx 65536 under the limit), on a model whose GGUF name and file name are HTML."""
    tmp = tmp_path_factory.mktemp("failed")
    model = tmp / "<script>tiny.gguf"
    write_base(model, PRESETS["tiny"], EVIL, "f16")
    _search(
        tmp,
        "-m",
        str(model),
        "--ngl",
        "0",
        "--ctx",
        "65536",
        "--n-trials",
        "3",
        "--study",
        "all-failed",
        "--no-auto-space",
    )
    return tmp / "all-failed"


@pytest.fixture(scope="session")
def gpu_study(cpu_study, failed_study, models, tmp_path_factory) -> Path:
    """EDITED records (no GPU here): cpu_study's real ok trials spread over n_gpu_layers 0..3 with a peak VRAM
    that grows per layer, plus failed_study's real OOM moved to tiny-q8_0 at 3 layers; a 1 GiB fake GPU in
    the hardware dict; predicted RAM/VRAM from the real planner and the tg roofline for a fixed bandwidth."""
    out = tmp_path_factory.mktemp("gpu") / "gpu"
    info = read_model(models / "tiny-q8_0.gguf")
    ok = [r for r in store.records(cpu_study) if r.ok and r.state != "anchor"]
    oom = next(r for r in store.records(failed_study) if r.outcome == "oom")
    gpu = {
        "index": 0,
        "name": "FAKE GPU <b>",
        "uuid": "GPU-fake",
        "vram_total": 1 << 30,
        "vram_free": 1 << 30,
        "driver": "550",
        "cuda": "12.4",
    }
    calib = planner.Calibration.from_records(ok)
    recs = []
    for i, r in enumerate(ok):
        ngl = i % 4
        r.config = dataclasses.replace(r.config, n_gpu_layers=ngl)
        r.peak_vram_bytes = 300 * MiB + ngl * 100 * MiB if ngl else None
        r.hw = {**r.hw, "gpus": [gpu]}
        r.build = {**r.build, "gpu_offload": True}
        pred = planner.predict(r.config, info, calib, gpu_offload=True)
        r.predicted_ram_bytes, r.predicted_vram_bytes = pred.ram_bytes, pred.vram_bytes or None
        r.tg_roofline_ts = roofline.tg_bound(r.config, info, {"host": 20e9, "device": 2e12}, True)
        recs.append(r)
    oom.config = dataclasses.replace(oom.config, model=str(models / "tiny-q8_0.gguf"), n_gpu_layers=3)
    oom.hw, oom.trial_number = {**oom.hw, "gpus": [gpu]}, max(r.trial_number for r in recs) + 1
    recs.append(oom)
    store.append(out / store.TRIALS_FILE, recs)
    h = recs[0].hw
    hw = Hardware(**{k: v for k, v in h.items() if k != "gpus"}, gpus=[GPU(**gpu)])
    rec = recommend.recommend(recs, hw, Limits(), "tg", study="gpu")
    recommend.write(out / recommend.RECOMMENDED_FILE, rec)
    return out


def _svg_text(path: Path) -> str:
    """The text of an SVG chart (svg.fonttype none keeps labels as <text>)."""
    return " ".join(re.findall(r">([^<>]+)</text>", path.read_text()))


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
def test_cpu_study_report(cpu_study, tmp_path):
    before = {f: _digest(cpu_study / f) for f in ("trials.parquet", "study.db", "recommended.json")}
    rep = report.build([cpu_study])
    written = rep.write(tmp_path / "out")
    study = rep.studies[0]
    trials, ok = study.trials, study.ok
    assert trials and ok, "the fixture study must have ok trials"
    # reading never changes the study
    assert {f: _digest(cpu_study / f) for f in before} == before

    keys = [
        "1-speed-vs-varied",
        "2-speed-vs-threads",
        "3-memory",
        "4-pareto",
        "5-outcome-map",
        "6-search-progress",
        "7-parameter-importance",
        "8-confirmation",
        "9-context-ladder",
        "10-speed-vs-kld",
    ]
    charts = {c.key: c for c in rep.charts}
    assert list(charts) == keys
    for k in keys:
        for fmt, magic in (("png", b"\x89PNG"), ("svg", b"<?xml")):
            f = tmp_path / "out" / "cpu" / f"{k}.{fmt}"
            assert f in written and f.read_bytes().startswith(magic)

    n_failed = {o: sum(1 for r in trials if r.outcome == o) for o in {r.outcome for r in trials} - {"ok"}}
    # 1: a tg and a pp panel per parameter the study varied, every ok trial a dot in each, failures marked
    c1 = charts["1-speed-vs-varied"]
    dims = report.speed_dimensions(study)
    assert "n_ctx" in dims  # the 256/4096/65536 ladder
    assert c1.counts["ok"] == 2 * len(dims) * len(ok)
    for o, n in n_failed.items():
        assert c1.counts[o] == 2 * len(dims) * n
    svg1 = _svg_text(tmp_path / "out" / "cpu" / "1-speed-vs-varied.svg")
    assert "tg: generation speed (tokens/s)" in svg1 and "n_ctx (context size, tokens)" in svg1
    # the note follows what the build reports (a CUDA build offloads, even in this --ngl 0 study)
    offload = bool(hardware.build_info()["gpu_offload"])
    assert (report.NO_OFFLOAD in c1.notes) == (not offload)
    # 2: threads
    ax_tg = charts["2-speed-vs-threads"].fig.axes[0]
    assert ax_tg.get_xlabel() == "n_threads (generation threads)"
    assert {1, 2} <= {round(x) for x in ax_tg.get_xticks()}
    # 3: memory: RAM of every ok trial placed; no VRAM here, and the panel says so
    c3 = charts["3-memory"]
    with_vram = [r for r in ok if r.peak_vram_bytes]  # none on a CPU build; a CUDA context on a GPU build
    assert c3.counts["ok"] == 2 * len(ok) + 2 * len(with_vram)  # RAM (and VRAM) against ngl and against ctx
    assert any(n.startswith("no VRAM measured") for n in c3.notes) == (not with_vram)
    assert c3.fig.axes[0].get_ylabel() == "peak RAM (peak RSS) (MiB)"
    # 4: Pareto: every ok trial, the recommendation starred
    c4 = charts["4-pareto"]
    assert c4.counts["ok"] == len(ok) and c4.counts["recommended"] == 1
    assert f"#{study.recommended['trial_number']}:" in _svg_text(tmp_path / "out" / "cpu" / "4-pareto.svg")
    # 5: outcome map: every trial one marker, coloured by outcome
    c5 = charts["5-outcome-map"]
    ax = c5.fig.axes[0]
    assert sum(len(c.get_offsets()) for c in ax.collections) == len(trials)
    assert sum(c5.counts.values()) == len(trials)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("n_gpu_layers (layers on the GPU)", "n_ctx (context size, tokens)")
    # 6: progress: the llama.cpp-defaults baseline as a horizontal line at its measured tg
    # (its first run at 65536 ran out of memory; the search stepped down the ladder and ran it again at 4096)
    base = next(r for r in trials if r.baseline == "llama.cpp defaults" and r.config.n_ctx == 4096)
    ax6 = charts["6-search-progress"].fig.axes[0]
    assert base.ok, (base.outcome, base.cause)  # ctx 4096 fits under the limit
    assert any(ln.get_ydata()[0] == pytest.approx(base.metric("tg")[0]) for ln in ax6.get_lines())
    assert charts["6-search-progress"].counts["ok"] == len(ok)
    # 7: importance: one bar per parameter Optuna searched (model, n_threads, n_ubatch; the context is a ladder,
    # measured after the search, not searched)
    c7 = charts["7-parameter-importance"]
    assert c7.counts["bars_tg"] == 3
    assert {t.get_text() for t in c7.fig.axes[0].get_yticklabels()} == {
        "model (quant file)",
        "n_threads (generation threads)",
        "n_ubatch (tokens)",
    }

    html = (tmp_path / "out" / "report.html").read_text()
    md = (tmp_path / "out" / "report.md").read_text()
    rec = study.recommended
    # 8: the confirmation's candidates with their samples; 9: the ladder over the contexts that ran ok
    conf = rec["confirmation"]
    # two candidates and the defaults, unless load made the drift guard fire: configs measured under drift are
    # the last choice (confirm.prefer_clean), and the race may then have a single clean one (seen when the suite
    # ran beside another full suite)
    assert (
        charts["8-confirmation"].counts["candidate"]
        == len(conf["candidates"])
        >= (1 if any(r.drift for r in trials) else 2)
    )
    assert charts["8-confirmation"].counts["samples"] == sum(len(c["samples"]) for c in conf["candidates"])
    assert [r["n_ctx"] for r in rec["context_ladder"]] == [256, 4096] and rec["working_ctx"] == 4096
    c9 = charts["9-context-ladder"].counts
    assert c9["tg recommended"] == c9["tg defaults"] == c9["pp recommended"] == c9["peak RAM defaults"] == 2
    assert [r["n_depth"] for r in rec["context_ladder"]] == [256 - 32 - 8, 4096 - 32 - 8]
    # 10: speed against KLD (tests/test_search_quality.py draws it); --no-quality: it says what it lacks
    assert "no quality figures in this study" in charts["10-speed-vs-kld"].notes[0]
    assert "quality" not in rec and "### Quality" not in md
    # self-contained: all 10 charts embedded, nothing fetched
    assert html.count('src="data:image/png;base64,') == 10
    assert not re.search(r'(src|href)="(?!data:)', html)
    png = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    assert base64.b64decode(png) == (tmp_path / "out" / "cpu" / "1-speed-vs-varied.png").read_bytes()
    for text in (html, md):
        assert f"Trial #{rec['trial_number']}" in text
        assert f"{rec['measured']['tg_ts_mean']:.2f} ± {rec['measured']['tg_ts_sd']:.2f}" in text
        assert study.trials[0].hw_fingerprint in text and study.trials[0].build_fingerprint in text
    assert escape(rec["forms"]["llama_server"]) in html
    assert rec["forms"]["llama_server"] in md
    assert "PARAMETER num_ctx" in html and "from llama_cpp import Llama" in md
    b = rec["baselines"]["llama.cpp defaults"]
    assert b["outcome"] == "ok" and b["source"] == "confirmation"
    assert (
        f"{b['recommended_vs_baseline']:.2f}× the llama.cpp defaults baseline, 95 % interval "
        f"{b['ci95'][0]:.2f}-{b['ci95'][1]:.2f}"
    ) in html
    assert "#### Confirmation" in md and "#### Context ladder" in md and escape(conf["reason"]) in html
    drifted = any(r.drift for r in trials)
    assert ("Drift detected" in md) == drifted and ("No drift detected" in md) == (not drifted)
    # the top table: one row per ok trial (up to 10), best first
    top = md.split("### Top configs")[1].split("\n### ")[0]
    rows = re.findall(r"^\| \\?#(\d+) \| (tiny-q\S+) \|", top, re.M)
    best = sorted(ok, key=lambda r: -r.metric("tg")[0])[:10]
    assert [int(n) for n, _ in rows] == [r.trial_number for r in best]
    # every chart linked from the markdown exists
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 10 and all((tmp_path / "out" / link).is_file() for link in links)
    if n_failed:
        assert "### Failures" in md and "first line of stderr" in md


def test_all_failed_study_explains_what_failed(failed_study, tmp_path):
    recs = [r for r in store.records(failed_study) if r.state != "anchor"]
    assert recs and not any(r.ok for r in recs)
    out = tmp_path / "rep"
    res = CliRunner().invoke(cli, ["report", str(failed_study), "--out", str(out), "--format", "svg"])
    assert res.exit_code == 0, res.output
    assert "no recommendation" in res.output
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert "No recommendation: no trial succeeded" in html
    ooms = [r for r in recs if r.outcome == "oom"]
    assert ooms and ooms[0].cause
    assert escape(ooms[0].cause[:100]) in html
    first = next(ln.strip() for ln in ooms[0].stderr_tail.splitlines() if ln.strip())
    assert escape(first)[:80] in html
    groups = report.failure_groups(report.load_study(failed_study))
    assert sum(len(g["trials"]) for g in groups) == len(recs)
    assert f"| oom | {len(ooms)} |" in md
    # GGUF metadata and paths are text, never markup
    assert EVIL not in html and "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in md
    # the charts still come, saying why they are empty; only SVG was asked for
    assert sorted(p.name for p in (out / "all-failed").iterdir()) == sorted(
        f"{k}.svg"
        for k in (
            "1-speed-vs-varied",
            "2-speed-vs-threads",
            "3-memory",
            "4-pareto",
            "5-outcome-map",
            "6-search-progress",
            "7-parameter-importance",
            "8-confirmation",
            "9-context-ladder",
            "10-speed-vs-kld",
        )
    )
    assert html.count('src="data:image/svg+xml;base64,') == 10
    assert "no quality figures in this study" in _svg_text(out / "all-failed" / "10-speed-vs-kld.svg")
    assert "no trial succeeded" in _svg_text(out / "all-failed" / "1-speed-vs-varied.svg")  # nothing varied either
    assert "no recommendation" in _svg_text(out / "all-failed" / "4-pareto.svg")
    assert "too few trials" in _svg_text(out / "all-failed" / "7-parameter-importance.svg")
    skipped = sum(1 for r in recs if r.outcome == "skipped")
    outcome_text = _svg_text(out / "all-failed" / "5-outcome-map.svg")
    assert outcome_text.count(f"oom ({len(ooms)})") == 1
    assert (f"skipped ({skipped})" in outcome_text) == bool(skipped)
    assert sum(1 for r in recs if r.outcome in FAILED) == len(ooms)


def test_speed_chart_draws_what_varied_and_not_a_constant(cpu_study, gpu_study):
    """Chart 1 on a CPU study: n_gpu_layers was 0 in every trial, so no panel draws that one point; the panels
    are the parameters whose values differ between trials, threads excepted (chart 2)."""
    for folder in (cpu_study, gpu_study):
        study = report.load_study(folder)
        chart = next(
            c for c in report.study_charts(study, report.quant_colours([study])) if c.key == "1-speed-vs-varied"
        )
        varied = [
            k
            for k in ("n_gpu_layers", "n_ctx", "n_batch", "n_ubatch", "flash_attn", "use_mmap")
            if len({getattr(r.config, k) for r in study.trials}) > 1
        ]
        labels = [ax.get_xlabel().split(" ")[0] for ax in chart.fig.axes]
        assert labels == [k for k in varied for _ in ("tg", "pp")], (folder, labels)
        assert ("n_gpu_layers" in labels) == (folder == gpu_study)


def test_gpu_shaped_charts_and_planner(gpu_study, tmp_path):
    rep = report.build([gpu_study], formats=("png",))
    rep.write(tmp_path)
    study = rep.studies[0]
    charts = {c.key: c for c in rep.charts}
    assert study.gpu_offload and study.vram_total == 1 << 30
    c1 = charts["1-speed-vs-varied"]
    assert report.NO_OFFLOAD not in c1.notes
    assert report.speed_dimensions(study)[0] == "n_gpu_layers"  # varied 0..3 here: the first panels
    assert c1.fig.axes[0].get_xlabel() == "n_gpu_layers (layers on the GPU)"
    # the VRAM wall: tiny-q8_0 ran out of memory with 3 layers on the GPU
    walls = [ln for ln in c1.fig.axes[0].get_lines() if ln.get_label().startswith("VRAM limit reached")]
    assert len(walls) == 1 and walls[0].get_xdata()[0] == 3 and "1.00 GiB device" in walls[0].get_label()
    assert {round(x) for x in c1.fig.axes[0].lines[0].get_xdata()} <= {0, 1, 2, 3}
    c3 = charts["3-memory"]
    with_vram = [r for r in study.ok if r.peak_vram_bytes]
    assert c3.counts["ok"] == 2 * len(study.ok) + 2 * len(with_vram)
    assert c3.counts["vram_total_line"] == 2  # the 1 GiB device is on the VRAM scale
    vram_ax = c3.fig.axes[2]
    assert vram_ax.get_ylabel() == "peak VRAM (MiB)"
    assert any(ln.get_ydata()[0] == pytest.approx(1024) for ln in vram_ax.get_lines())
    md = (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    assert "### Planner and roofline" in md
    rows = report.planner_rows(study)
    assert len(rows) == len(study.ok)
    worst = max((r["ram_err"] for r in rows), key=abs)
    assert f"worst {worst:+.1%}" in md
    pcts = [r.to_row()["tg_roofline_pct"] for r in study.ok]
    assert f"best {max(pcts):.0f}% over {len(pcts)} ok trials" in md
    assert "FAKE GPU &lt;b&gt;" in html and "FAKE GPU <b>" not in html
    # no Optuna storage in this folder: importance comes from the records, and the chart says so
    assert study.optuna_trials is None
    assert charts["7-parameter-importance"].counts["bars_tg"] >= 2
    assert any("no Optuna storage" in n for n in charts["7-parameter-importance"].notes)


def test_compare_two_studies(cpu_study, rig_b, tmp_path):
    out = tmp_path / "cmp"
    res = CliRunner().invoke(cli, ["report", str(cpu_study), str(rig_b), "--out", str(out), "--format", "png"])
    assert res.exit_code == 0, res.output
    a, b = report.load_study(cpu_study), report.load_study(rig_b)

    def keys(s):
        return {
            (Path(r.config.model).name, r.config.n_threads, r.config.n_ubatch, r.config.effective_ctx()) for r in s.ok
        }

    shared = keys(a) & keys(b)
    md = (out / "report.md").read_text()
    assert "## Comparison of 2 studies" in md
    # both folders are named "cpu": labels are made unique with the parent folder name
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(["cpu", f"{rig_b.parent.name}-cpu"])
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")
    assert "Same hardware and the same build." in md
    if shared:
        assert f"{len(shared)} config(s) measured ok in both" in md
        table = md.split("against cpu")[1]
        assert len(re.findall(r"^\| tiny-q8\\_0 .*× \|$|^\| tiny-q8_0 .*× \|$", table, re.M)) == len(shared)
    else:
        assert "No config was measured ok in both." in md
    rep = report.build([cpu_study, rig_b], formats=("png",))
    assert rep.compare.counts["shared"] == len(shared)
    assert rep.compare.counts["bars"] == len({Path(r.config.model).name for r in a.ok}) + 1
    # one colour per quant file in every chart of both studies
    col = report.quant_colours(rep.studies)
    q8 = [c for c in rep.charts if c.key == "4-pareto"]
    for c in q8:
        pts = [line for line in c.fig.axes[0].containers if line.get_label().startswith("tiny-q8_0")]
        assert pts and all(tuple(p.lines[0].get_color()) == tuple(col["tiny-q8_0"]) for p in pts)


def test_outcome_map_dimensions_and_default_out(cpu_study, tmp_path):
    study = tmp_path / "copy"
    shutil.copytree(cpu_study, study)
    res = CliRunner().invoke(cli, ["report", str(study), "--outcome-map", "n_threads,n_ctx", "--format", "svg"])
    assert res.exit_code == 0, res.output
    svg = _svg_text(study / "report" / "copy" / "5-outcome-map.svg")
    assert "n_threads (generation threads)" in svg and "n_ctx (context size, tokens)" in svg
    assert (study / "report" / "report.html").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "png,gif"], "--format 'gif'"),
        (["--format", ","], "--format: give at least one"),
        (["--outcome-map", "n_ctx"], "expected two different config parameters"),
        (["--outcome-map", "n_ctx,colour"], "unknown parameter 'colour'"),
    ],
)
def test_bad_options_write_nothing(cpu_study, tmp_path, args, message):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["report", str(cpu_study), "--out", str(out), *args])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [res.output.strip()] and message in res.output
    assert res.output.startswith("tuner: error: ") and "Traceback" not in res.output
    assert not out.exists()


def test_bad_study_folders(cpu_study, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_rec = tmp_path / "badrec"
    shutil.copytree(cpu_study, bad_rec)
    (bad_rec / "recommended.json").write_text("{not json")
    afile = tmp_path / "file"
    afile.write_text("x")
    cases = [
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(empty)], "no results at"),
        ([str(bad_rec)], "unreadable"),
        ([str(cpu_study), "--out", str(afile)], "is a file"),
    ]
    for args, message in cases:
        res = CliRunner().invoke(cli, ["report", *args])
        assert res.exit_code == 2, (args, res.output)
        assert res.output.startswith("tuner: error: ") and message in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
    assert not (empty / "report").exists() and not (bad_rec / "report").exists()
    with pytest.raises(report.ReportError):
        report.load_study(bad_rec)
    # a bad recommended.json stays as it was
    assert (bad_rec / "recommended.json").read_text() == "{not json"
    assert json.loads((cpu_study / "recommended.json").read_text())["trial_number"] is not None

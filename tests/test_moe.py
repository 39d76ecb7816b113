"""MoE hybrid offload (issue 8): --n-cpu-moe, --cpu-moe and -ot reach llama.cpp, land in Parquet, and steer search.

"Reached llama.cpp" is proven by `overrides_applied`: the worker parses llama.cpp's own
"tensor X buffer type overridden to Y" log lines, so a list there means llama.cpp matched the pattern against its
tensors at load. The expected tensors come from the GGUF file itself (tuner.model.meta), not from the patterns.
On this CPU-only build the buffer is CPU either way; on a CUDA build the same tests hold (see experiments/gpu-check.sh).
"""

from __future__ import annotations

import json
import shlex

import pytest
from click.testing import CliRunner

from tuner.cli import cli
from tuner.measure import hardware, store
from tuner.measure.runner import Runner, resolve
from tuner.model.meta import read_model
from tuner.record import TrialConfig
from tuner.search import recommend
from tuner.search.trials import dominated_by

# one thread: the CPUs here are shared, and oversubscribed ggml threads spin-wait for seconds per token
SHAPE = ["-t", "1", "-p", "16", "-n", "4", "-r", "1"]
MOE = "moe-q8_0.gguf"  # 6 layers, 8 experts; blk.N.ffn_{gate,up,down}_exps


def expert_tensors(model, layers) -> set[str]:
    """The routed-expert tensors of `layers`, as the GGUF file lists them."""
    info = read_model(model)
    return {t.name for t in info.tensors if t.group == "exps" and t.layer in layers}


def host_placed(applied) -> set[str]:
    """Tensor names from overrides_applied, checking each went to a host buffer.

    llama.cpp reports the buffer it picked among the CPU ones: "CPU" here; a CUDA build may pick its pinned
    "CUDA_Host" buffer or a repacking "CPU_..." one for the same `=CPU` override.
    """
    names = [a.rsplit("=", 1)[0] for a in applied]
    assert len(names) == len(set(names)), applied  # each tensor reported once
    for a in applied:
        buft = a.rsplit("=", 1)[1]
        assert buft == "CPU" or buft.startswith("CPU_") or buft.endswith("_Host"), a
    return set(names)


def bench_row(tmp_path, *args):
    out = tmp_path / "b.parquet"
    res = CliRunner().invoke(cli, ["bench", *map(str, args), *SHAPE, "-o", str(out)])
    rows = store.read(out).to_dict("records") if out.exists() else []
    return res, rows


@pytest.mark.parametrize(
    "args, layers, n_cpu_moe",
    [
        (["--n-cpu-moe", "2"], {0, 1}, 2),
        ([r"-ot", r"blk\.0\.ffn_.*_exps=CPU"], {0}, 0),
        (["--cpu-moe"], set(range(6)), 0),
        (["--n-cpu-moe", "99"], set(range(6)), 6),  # bounded to the layer count, as recorded
        # -ot first, then --n-cpu-moe: llama.cpp takes the first match per tensor, so blk.0 is listed once
        ([r"-ot", r"blk\.0\.ffn_.*_exps=CPU", "--n-cpu-moe", "2"], {0, 1}, 2),
        ([], set(), 0),
    ],
    ids=["n-cpu-moe-2", "ot-blk0", "cpu-moe", "n-cpu-moe-99", "ot-and-n-cpu-moe", "none"],
)
def test_bench_override_reaches_llama_cpp_and_parquet(models, tmp_path, args, layers, n_cpu_moe):
    model = models / MOE
    res, rows = bench_row(tmp_path, model, *args)
    assert res.exit_code == 0, res.output
    (row,) = rows
    assert row["outcome"] == "ok" and row["tg_ts_mean"] > 0
    assert row["n_cpu_moe"] == n_cpu_moe
    assert row["cpu_moe"] == ("--cpu-moe" in args)
    assert list(row["overrides"]) == [a for a in args if a.endswith("=CPU")]
    applied = list(row["overrides_applied"])
    assert len(applied) == 3 * len(layers)  # gate, up, down per layer
    assert host_placed(applied) == expert_tensors(model, layers)


def test_unknown_buffer_type_is_a_failed_trial_naming_the_known_ones(models, tmp_path):
    res, rows = bench_row(tmp_path, models / MOE, "-ot", "exps=NOPE")
    assert res.exit_code == 1  # a failed trial, recorded, not a crash
    (row,) = rows
    assert row["outcome"] == "load_error"
    known = hardware.build_info()["buffer_types"]
    assert "CPU" in known
    assert row["cause"] == f"unknown buffer type 'NOPE' (this build has: {', '.join(sorted(known))})"
    assert list(row["overrides"]) == ["exps=NOPE"] and list(row["overrides_applied"]) == []
    assert "unknown buffer type 'NOPE'" in res.stdout  # the table shows the cause


def test_runner_reloads_when_the_expert_placement_changes(models):
    """Library path, one reusing Runner: a new n_cpu_moe is a new load, never a stale placement."""
    model = str(models / MOE)

    def cfg(**kw):
        return resolve(
            TrialConfig(
                model=model,
                n_threads=1,
                n_prompt=8,
                n_gen=2,
                repetitions=1,
                **kw,
            )
        )

    with Runner(timeout=120, reuse=True) as runner:
        recs = [runner.run(cfg(n_cpu_moe=n)) for n in (2, 2, 1, 0)]
    assert [r.outcome for r in recs] == ["ok"] * 4
    assert [host_placed(r.overrides_applied) for r in recs] == [expert_tensors(model, {0, 1})] * 2 + [
        expert_tensors(model, {0}),
        set(),
    ]


def test_search_over_n_cpu_moe_and_the_recommendation(models, tmp_path):
    model = models / MOE
    res = CliRunner().invoke(
        cli,
        [
            "search",
            "-m",
            str(model),
            "--n-cpu-moe",
            "0:6",
            "--ngl",
            "0",
            *SHAPE,
            "--sampler",
            "grid",
            "--drift-every",
            "0",
            "--no-auto-space",
            "--no-confirm",
            "--objective",
            "tg",
            "--results",
            str(tmp_path),
            "--study",
            "moe",
        ],
    )
    assert res.exit_code == 0, res.output
    d = tmp_path / "moe"
    df = store.read(d)
    trials = df[df["state"] != "anchor"]
    assert (trials["outcome"] == "ok").all()
    assert sorted(trials["n_cpu_moe"]) == list(range(7))  # the grid: every value, once
    for n, applied in zip(trials["n_cpu_moe"], trials["overrides_applied"]):
        assert host_placed(applied) == expert_tensors(model, set(range(n))), n  # each trial's own placement

    rec = json.loads((d / "recommended.json").read_text())
    best = trials.loc[trials["tg_ts_mean"].idxmax()]
    n = int(best["n_cpu_moe"])
    assert rec["config"]["n_cpu_moe"] == n
    argv = rec["forms"]["llama_server_argv"]
    assert shlex.split(rec["forms"]["llama_server"]) == argv
    if n:
        assert argv[argv.index("--n-cpu-moe") + 1] == str(n)
    else:
        assert "--n-cpu-moe" not in argv
    assert rec["forms"]["tuner"]["n_cpu_moe"] == n

    # re-measuring the recommendation applies the same placement again
    res, rows = bench_row(tmp_path, "--config", d / "recommended.json")
    assert res.exit_code == 0, res.output
    (row,) = rows
    assert row["n_cpu_moe"] == n
    assert host_placed(row["overrides_applied"]) == expert_tensors(model, set(range(n)))


@pytest.mark.parametrize(
    "kw, flags",
    [
        ({"n_cpu_moe": 3}, ["--n-cpu-moe", "3"]),
        ({"cpu_moe": True}, ["--cpu-moe"]),
        ({"overrides": (r"blk\.0\.ffn_.*_exps=CPU",)}, ["-ot", r"blk\.0\.ffn_.*_exps=CPU"]),
        ({}, []),
    ],
)
def test_forms_emit_the_expert_placement(kw, flags):
    cfg = TrialConfig(model="/m/moe.gguf", n_gpu_layers=99, n_threads=8, n_threads_batch=8, **kw)
    f = recommend.forms(cfg)
    argv = f["llama_server_argv"]
    moe_flags = [
        a
        for i, a in enumerate(argv)
        if a in ("--n-cpu-moe", "--cpu-moe", "-ot") or (i and argv[i - 1] in ("--n-cpu-moe", "-ot"))
    ]
    assert moe_flags == flags
    assert shlex.split(f["llama_server"]) == argv
    assert TrialConfig.from_dict(f["tuner"]) == cfg  # `tuner bench --config` gets it back
    # llama-cpp-python's Llama() cannot express the placement: said, not silently dropped
    assert ("notes" in f) == bool(flags)
    assert not any("cpu_moe" in k or "override" in k for k in f["llama_cpp_python"])


def test_dominance_fewer_experts_on_cpu_needs_more_vram():
    base = dict(model="/m/moe.gguf", n_gpu_layers=99, n_ctx=4096)
    oom = [(7, TrialConfig(**base, n_cpu_moe=2), "CUDA out of memory")]
    assert dominated_by(TrialConfig(**base, n_cpu_moe=1), oom) == (7, "CUDA out of memory")
    assert dominated_by(TrialConfig(**base, n_cpu_moe=0), oom) == (7, "CUDA out of memory")
    assert dominated_by(TrialConfig(**base, n_cpu_moe=2), oom) == (7, "CUDA out of memory")
    assert dominated_by(TrialConfig(**base, n_cpu_moe=3), oom) is None  # more experts in host RAM: may fit
    # a different placement mechanism is not comparable by n_cpu_moe alone
    assert dominated_by(TrialConfig(**base, n_cpu_moe=1, cpu_moe=True), oom) is None
    assert dominated_by(TrialConfig(**base, n_cpu_moe=1, overrides=("exps=CPU",)), oom) is None
    # fewer layers on the GPU frees VRAM too: not dominated
    assert dominated_by(TrialConfig(**{**base, "n_gpu_layers": 4}, n_cpu_moe=1), oom) is None

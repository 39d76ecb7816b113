"""benchmarks/replay.py: a table measured with real workers on a real GGUF, then the real search replayed on it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import replay  # noqa: E402

from tuner.search import confirm  # noqa: E402


@pytest.fixture(scope="module")
def table_path(tmp_path_factory, models):
    """The tiny grid (2 files × 2 thread counts) measured for 5 interleaved rounds by the real worker."""
    return replay.measure("tiny", 5, out=tmp_path_factory.mktemp("tables"), log=lambda s: None)


def test_the_table_holds_every_config_with_its_rounds_and_costs(table_path):
    doc = json.loads(Path(table_path).read_text())
    assert len(doc["configs"]) == 4 and doc["provenance"]["git_commit"]
    for c in doc["configs"]:
        assert [t["round"] for t in c["trials"]] == list(range(5))
        assert all(
            t["outcome"] == "ok" and t["tg"] and t["load_ms"] is not None and t["wall_s"] > 0 for t in c["trials"]
        )
    table = replay.load_table(table_path)
    assert len(table.entries) == 4 and table.grid_once_s() > 0


def test_a_cold_grid_loads_every_trial_from_the_disk(table_path, tmp_path):
    """`"cold": True` evicts the model's pages before each trial, as a model bigger than RAM loads; the warm
    table's later rounds found their file cached (so the check can tell the two apart)."""
    cold = json.loads(replay.measure("tiny-cold", 2, out=tmp_path, log=lambda s: None).read_text())
    warm = json.loads(Path(table_path).read_text())
    assert cold["recipe"]["cold"] and all(t["page_cache_pct"] < 50 for c in cold["configs"] for t in c["trials"])
    assert all(t["page_cache_pct"] > 90 for c in warm["configs"] for t in c["trials"] if t["round"] > 0)


def test_a_seed_runs_the_real_search_sampler_and_confirmation_race(table_path, tmp_path):
    table = replay.load_table(table_path)
    seen = {}

    def inspect(srch, runner, clock):
        seen.update(search=srch, runner=runner, clock=clock.t)

    st = replay.Settings(sampler="tpe", n_trials=3, confirm=2, max_rounds=confirm.MIN_ROUNDS + 1)
    out = replay.replay_seed(table, 7, st, tmp_path, on_search=inspect)
    srch = seen["search"]
    # the study's own sampler, seeded as `tuner search --seed 7`, and its enqueued baselines
    assert type(srch.study.sampler).__name__ == "TPESampler"
    searched = [r for r in srch.records if r.searched]
    assert len(searched) == 3 and any(r.baseline == "llama.cpp defaults" for r in searched)
    # the confirmation raced on recorded samples, paired by round, within the round limit
    conf = [r for r in srch.records if r.state == confirm.CONFIRM_STATE]
    assert conf and out["confirm_runs"] == len(conf)
    assert max(r.confirm_round for r in conf) < st.max_rounds
    assert min(
        sum(1 for r in conf if r.config == c.config) for c in confirm.candidates_from_records(conf)
    ) >= confirm.MIN_ROUNDS or out["verdict"] in ("single", "none")
    verdict = confirm.assess(confirm.candidates_from_records(srch.records), "mixed")
    assert (out["trial_number"], out["verdict"]) == (verdict["winner"], verdict["verdict"])
    # every sample came from the table, and the clock is the sum of the recorded costs
    drawn = {tuple(t["tg"]) for e in table.entries.values() for t in e.trials}
    assert all(tuple(r.tg_samples) in drawn for r in srch.records if r.ok)
    # paired as live: in one confirmation round every candidate ran the same recorded round of the table
    round_of = {(e.config.key(), tuple(t["tg"])): t["round"] for e in table.entries.values() for t in e.trials}
    for rnd in {r.confirm_round for r in conf}:
        assert len({round_of[(r.config.key(), tuple(r.tg_samples))] for r in conf if r.confirm_round == rnd}) == 1
    assert out["runs"] == len(searched) + len(conf) and 0 < seen["clock"] == out["wall_s"]
    assert out["wall_s"] <= sum(r.wall_s for r in searched + conf) + 1e-9
    # a seed is a seed: the same one replays the same, and its true figure comes from the table
    again = replay.replay_seed(table, 7, st, tmp_path / "again")
    assert {k: again[k] for k in ("trial_number", "wall_s", "true")} == {
        k: out[k] for k in ("trial_number", "wall_s", "true")
    }
    assert out["true"] == table.truth(
        next(r.config for r in srch.records if r.trial_number == out["trial_number"]).key()
    )


def test_a_table_of_another_space_is_one_line_and_exit_2(table_path, tmp_path, capsys):
    doc = json.loads(Path(table_path).read_text())
    doc["configs"] = doc["configs"][1:]  # a config of the space is missing: not this space's table
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    assert replay.main(["run", str(other), str(table_path), "--seeds", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "measured on another space" in err
    assert replay.main(["run", str(table_path), str(table_path), "--max-rounds", "2"]) == 2
    assert "below the confirmation race's minimum" in capsys.readouterr().err


def test_a_table_loads_on_files_made_alike_and_not_on_other_files(table_path, tmp_path, capsys):
    # llama.cpp's quantizer writes other bytes from the same f16 on another machine: a table names its files by
    # hash, and a file of the same size, type and parameter count stands in for it (listed as made alike)
    doc = json.loads(Path(table_path).read_text())
    doc["models"][1]["content_hash"] = "0" * 32
    alike = tmp_path / "alike.json"
    alike.write_text(json.dumps(doc))
    assert replay.load_table(alike).alike == [doc["models"][1]["path"]]
    assert replay.load_table(table_path).alike == []
    doc["models"][1]["size_bytes"] += 32  # another file: the table cannot be replayed on it
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    assert replay.main(["run", str(other), str(table_path), "--seeds", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nor made alike" in err


def _with_values(table_path, tmp_path, values: list[list[float]]) -> Path:
    """The tiny table with chosen trial values (pp = tg = value: the mixed objective is the value)."""
    doc = json.loads(Path(table_path).read_text())
    for c, vals in zip(doc["configs"], values):
        for t, v in zip(c["trials"], vals):
            t["tg"], t["pp"] = [v, v], [v, v]
    path = tmp_path / f"values-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(doc))
    return path


def test_the_resolution_says_whether_the_table_itself_tells_its_best_apart(table_path, tmp_path):
    apart = replay.resolution(
        replay.load_table(
            _with_values(
                table_path,
                tmp_path,
                [[200, 210, 190, 205, 195], [100, 105, 95, 102, 98], [100, 105, 95, 102, 98], [50, 52, 48, 51, 49]],
            )
        )
    )
    assert apart["best_within_2pct_on_resampling"] == 1.0 and apart["configs_within_2pct"] == 1
    # two configs with the same rounds, scattered 20 %: which is "best" is the noise of the table
    tied = replay.resolution(
        replay.load_table(
            _with_values(
                table_path,
                tmp_path,
                [[100, 120, 80, 110, 90], [120, 100, 90, 80, 110], [50, 52, 48, 51, 49], [50, 52, 48, 51, 49]],
            )
        )
    )
    assert tied["configs_within_2pct"] == 2 and tied["best_within_2pct_on_resampling"] < 0.8
    assert tied["trial_log_sd_median"] > apart["trial_log_sd_median"]


def test_settings_are_chosen_by_rate_within_the_wall_target_else_by_rate_then_wall():
    rows = [
        {"settings": "a", "within_2pct_rate": 0.9, "wall_vs_grid_median": 0.5},
        {"settings": "b", "within_2pct_rate": 0.6, "wall_vs_grid_median": 0.3},
        {"settings": "c", "within_2pct_rate": 0.5, "wall_vs_grid_median": 0.2},
    ]
    assert replay.choose(rows, 0.35)["settings"] == "b"
    assert replay.choose(rows, 0.1)["settings"] == "a"
    rows.append({"settings": "d", "within_2pct_rate": 0.9, "wall_vs_grid_median": 0.4})
    assert replay.choose(rows, 0.1)["settings"] == "d"


@pytest.mark.parametrize("keep", [0, 4])
def test_the_replay_charges_a_load_only_where_no_worker_has_it(table_path, monkeypatch, keep):
    """As the runner: a race alternating between two files reloads neither while their workers may wait
    (tuner.measure.runner.KEEP_LOADED); with none allowed to wait, every switch reloads."""
    import random

    from tuner.measure import runner as rn

    monkeypatch.setattr(rn, "KEEP_LOADED", keep)
    table = replay.load_table(table_path)
    by_file = {}
    for e in table.entries.values():
        by_file.setdefault(e.config.load_key(), e.config)
    a, b = list(by_file.values())[:2]
    run = replay.ReplayRunner(table, replay.Clock(), random.Random(0))
    recs = [run.run(c) for c in (a, b, a, b, b)]
    assert [r.model_loaded for r in recs] == [True, True, not keep, not keep, False]
    assert run.loads == (2 if keep else 4)
    assert run.loaded_keys == ([a.load_key(), b.load_key()] if keep else [b.load_key()])

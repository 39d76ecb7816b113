"""`tuner recommend`: re-derive a study's recommendation under other limits (library: tuner.search.run)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tuner.cli.common import limits_options, print_recommendation
from tuner.errors import TunerError
from tuner.search import fleet
from tuner.search.options import OBJECTIVES, Limits
from tuner.search.run import recommend_study


@click.command("recommend")
@click.argument("study_dir", type=click.Path(file_okay=False), required=False)
@click.option(
    "--storage",
    default=None,
    help="read the study from this shared storage (a fleet) instead of "
    "STUDY_DIR, which then receives a snapshot (optional)",
)
@click.option("--study", "study_name", default=None, help="with --storage: the study's name")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=None, help="default: the study's")
@limits_options
@click.option("--json", "as_json", is_flag=True, help="print recommended.json instead of a summary")
@click.option("--write/--no-write", default=True, help="rewrite STUDY_DIR/recommended.json")
def recommend_cmd(study_dir, storage, study_name, objective, min_ctx, max_vram, max_ram, headroom, as_json, write):
    """Re-derive the recommendation from a study's trials under other constraints (nothing is re-run).

    \b
    Examples:
      tuner recommend results/my-study --max-vram 20GiB --min-ctx 8192
      tuner recommend --storage postgresql://tuner:PW@db-host/tuner --study my-study   (a fleet, from any host)
    """
    if storage or study_name:
        for folder in fleet.snapshot_for_cli(storage, study_name, study_dir):  # one per fingerprint group
            # without STUDY_DIR the snapshot is a temp folder deleted at exit: nothing there to point at
            click.get_current_context().invoke(
                recommend_cmd,
                study_dir=str(folder),
                objective=objective,
                min_ctx=min_ctx,
                max_vram=max_vram,
                max_ram=max_ram,
                headroom=headroom,
                as_json=as_json,
                write=write and study_dir is not None,
            )
        return
    if study_dir is None:
        raise TunerError("no study: pass STUDY_DIR, or --storage URL --study NAME")
    if not Path(study_dir).is_dir():
        raise TunerError(f"no study folder at {study_dir}")
    limits = Limits(min_ctx=min_ctx, max_vram=max_vram, max_ram=max_ram, headroom=headroom)
    rec = recommend_study(study_dir, objective, limits, write)
    if as_json:
        click.echo(json.dumps(rec, indent=2, default=str))
    else:
        print_recommendation(rec, Path(study_dir), written=write)

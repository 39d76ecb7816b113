"""`tuner recommend`: re-derive a study's recommendation under other limits (library: tuner.search)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tuner.cli.common import limits_options, print_recommendation
from tuner.options import TunerError
from tuner.study import OBJECTIVES, Limits


@click.command("recommend")
@click.argument("study_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--objective", type=click.Choice(OBJECTIVES), default=None, help="default: the study's")
@limits_options
@click.option("--json", "as_json", is_flag=True, help="print recommended.json instead of a summary")
@click.option("--write/--no-write", default=True, help="rewrite STUDY_DIR/recommended.json")
def recommend_cmd(study_dir, objective, min_ctx, max_vram, max_ram, headroom, as_json, write):
    """Re-derive the recommendation from a study's trials under other constraints (nothing is re-run).

    Example: tuner recommend results/my-study --max-vram 20GiB --min-ctx 8192
    """
    from tuner.search import SearchError, recommend_study

    limits = Limits(min_ctx=min_ctx, max_vram=max_vram, max_ram=max_ram, headroom=headroom)
    try:
        rec = recommend_study(study_dir, objective, limits, write)
    except SearchError as e:
        raise TunerError(str(e)) from None
    if as_json:
        click.echo(json.dumps(rec, indent=2, default=str))
    else:
        print_recommendation(rec, Path(study_dir))

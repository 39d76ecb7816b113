"""The `tuner` command line: the group here, one module per command in this package (tuner/cli/NAME.py).

Commands are thin: parse options, call the library (tuner.search.run, tuner.search.bench, tuner.report, ...), print.
"""

from __future__ import annotations

import importlib
import sys

import click

from tuner.errors import TunerError
from tuner.measure.lock import LockBusy


class TunerGroup(click.Group):
    """Every error is one line on stderr: bad input exits 2, never with a traceback.

    Commands with heavy imports (scipy, matplotlib) load only when they run: `tuner search` starts in a
    fraction of the time, which matters when every trial is a fresh process and CI runs many commands.
    """

    # every command: its module loads only when it runs (a new command is one line here and one module)
    LAZY = {
        "hw": "tuner.cli.hw:hw",
        "synth": "tuner.cli.synth:synth",
        "bench": "tuner.cli.bench:bench",
        "search": "tuner.cli.search:search",
        "recommend": "tuner.cli.recommend:recommend_cmd",
        "compare": "tuner.cli.compare:compare",
        "estimate": "tuner.cli.estimate:estimate_cmd",
        "report": "tuner.cli.report:report_cmd",
        "selftest": "tuner.cli.selftest:selftest_cmd",
        "quality": "tuner.cli.quality:quality_cmd",
        "probe": "tuner.cli.probe:probe_cmd",
        "rpc-server": "tuner.cli.rpc_server:rpc_server_cmd",
        "verify": "tuner.cli.verify:verify_cmd",
    }

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.LAZY))

    def get_command(self, ctx, name):
        if name in self.LAZY and name not in self.commands:
            module, attr = self.LAZY[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except TunerError as e:  # every error the library raises on purpose: one line, its exit code
            click.echo(f"tuner: {'' if isinstance(e, LockBusy) else 'error: '}{' '.join(str(e).split())}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            msg = " ".join(e.format_message().split())
            click.echo(f"tuner: error: {msg}", err=True)
            sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=TunerGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="tuner")
def cli():
    """Measure and auto-tune llama.cpp configs for big GGUF models, one crash-isolated trial at a time.

    \b
      tuner hw                           what this machine has
      tuner synth models --preset dense  make synthetic GGUF models (no download)
      tuner bench MODEL -t 4 -p 512      measure one config, llama-bench style
      tuner search --model A.gguf        an Optuna study overnight
      tuner report results/<study>       charts and a report
      tuner verify results/<study>       serve the recommendation, measure it from an HTTP client
      tuner compare BASE CURRENT         CI regression gate
    """


def main():  # pragma: no cover - console script entry
    cli()

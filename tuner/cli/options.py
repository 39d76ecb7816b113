"""Click options defined once and shared by the commands, plus the config-file → default_map plumbing.

Parameter names are TrialConfig field names, so a saved config (recommended.json, an experiment TOML) maps
straight onto the options: command line > file > defaults, through Click's `default_map`.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import click
import tomllib

from tuner.errors import TunerError
from tuner.measure import rpc
from tuner.record import PARAMS, TrialConfig
from tuner.units import parse_duration, parse_headroom, parse_size, parse_sizes

POSITIVE = {"n_threads", "n_threads_batch", "n_batch", "n_ubatch", "repetitions"}
NON_NEGATIVE = {"n_ctx", "n_cpu_moe", "main_gpu", "n_prompt", "n_gen", "n_depth"}
CONFIG_FIELDS = {f.name for f in fields(TrialConfig)}


class Parsed(click.ParamType):
    """A Click type made of a parse function that raises ValueError (sizes, durations: tuner.units)."""

    def __init__(self, name: str, parse):
        self.name, self.parse = name, parse

    def convert(self, value, param, ctx):
        try:
            return self.parse(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = Parsed("SIZE", parse_size)


SIZES = Parsed("SIZE[,SIZE...]", parse_sizes)
# GPU memory to plan for: 0 plans a machine without a GPU
VRAM = Parsed("0|SIZE[,SIZE...]", lambda text: [] if str(text).strip() in ("0", "0B") else parse_sizes(text))


HEADROOM = Parsed("SIZE|PCT", parse_headroom)


SECONDS = click.FloatRange(min=0, min_open=True)  # a duration of more than 0 s (timeouts)


def check_count(ctx, param, value):
    if value is None:
        return value
    if param.name in POSITIVE and value < 1:
        raise click.BadParameter(f"must be at least 1, got {value}")
    if param.name in NON_NEGATIVE and value < 0:
        raise click.BadParameter(f"must not be negative, got {value}")
    if param.name == "n_gpu_layers" and value < -1:
        raise click.BadParameter(f"must be -1 (all layers) or more, got {value}")
    return value


def _check_positive_size(ctx, param, value):
    # 0 would otherwise read as "no limit" (falsy) and run the trial unbounded
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be more than 0 bytes, got {value}")
    return value


def _parse_rpc(ctx, param, value):
    return ",".join(rpc.parse_endpoints(value)) if value else value


rpc_option = click.option(
    "--rpc",
    "rpc",
    default=None,
    callback=_parse_rpc,
    metavar="HOST:PORT[,HOST:PORT...]",
    help="llama.cpp RPC servers whose devices join this host's GPUs, as llama-server --rpc (tuner rpc-server "
    "starts one; the protocol has no authentication: loopback or a private network only)",
)


def _parse_parallel(ctx, param, value):
    """--parallel 4 or a list 1,2,4 (one trial each, as llama-batched-bench -npl): a tuple of counts."""
    if value is None or value == "":
        return None
    if ctx.get_parameter_source(param.name) == click.core.ParameterSource.DEFAULT_MAP and str(value) == "0":
        return None  # a saved config of one request (n_seq 0), not a count typed as 0
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        counts = tuple(dict.fromkeys(int(str(x).strip()) for x in items))
    except ValueError:
        raise click.BadParameter(f"a count or a list of counts expected (4 or 1,2,4), got {value!r}") from None
    if any(n < 1 for n in counts):
        raise click.BadParameter(f"must be at least 1, got {min(counts)}")
    return counts


def prior_params(f):
    """The search's prior (tuner.search.prior): on by default where this rig has a probe."""
    f = click.option(
        "--probe",
        "probe",
        type=click.Path(dir_okay=False),
        default=None,
        help="the rig probe the prior predicts from (default: this machine's and build's, when `tuner probe` "
        "has run; a probe of another machine or build is refused)",
    )(f)
    return click.option(
        "--prior/--no-prior",
        "prior",
        default=True,
        show_default=True,
        help="measure first what the speed model and the planner predict best (needs `tuner probe`), "
        "then correct the predictions with each measurement",
    )(f)


def bench_params(f):
    """One value per llama.cpp parameter, named as in llama-bench (--parallel: a value or a list)."""
    for p in reversed(PARAMS):
        if p.type is bool:
            f = click.option(*p.flags, p.name, is_flag=True, default=None, help=p.help)(f)
            continue
        if p.name == "n_seq":
            f = click.option(*p.flags, p.name, default=None, callback=_parse_parallel, metavar="N[,N...]", help=p.help)(
                f
            )
            continue
        f = click.option(
            *p.flags,
            p.name,
            type=click.Choice(p.type) if isinstance(p.type, tuple) else p.type,
            default=None,
            callback=check_count,
            help=p.help,
        )(f)
    return f


def space_params(f):
    """For search: each parameter a value, a list (4096,8192) or a range (0:61, 4:16:2)."""
    for p in reversed(PARAMS):
        f = click.option(
            *p.flags, *p.search_flags, p.name, type=str, default=None, help=f"{p.help}; a value, a list or a range"
        )(f)
    return f


def shape_params(f):
    """The llama-bench test shape, shared by bench and search."""
    opts = [
        click.option(
            "-p",
            "--n-prompt",
            "n_prompt",
            type=int,
            default=None,
            callback=check_count,
            help="prompt tokens per pp repetition [512]",
        ),
        click.option(
            "-n",
            "--n-gen",
            "n_gen",
            type=int,
            default=None,
            callback=check_count,
            help="generated tokens per tg repetition [128]",
        ),
        click.option(
            "-d",
            "--n-depth",
            "--depth",
            "n_depth",
            type=int,
            default=None,
            callback=check_count,
            help="tokens already in the context before timing, as llama-bench -d [0; search: each rung of a "
            "--ctx ladder filled, n_ctx - n_prompt - n_gen]",
        ),
        click.option(
            "-r",
            "--repetitions",
            "repetitions",
            type=int,
            default=None,
            callback=check_count,
            help="repetitions per test [5]",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def run_params(timeout_flag: str = "--timeout"):
    """How trials run: the per-trial safety limits and the host lock (search names the timeout --trial-timeout)."""

    def deco(f):
        opts = [
            click.option(
                timeout_flag,
                timeout_flag.lstrip("-").replace("-", "_"),
                type=SECONDS,
                default=600.0,
                show_default=True,
                help="seconds before a trial is killed and recorded as timeout",
            ),
            click.option(
                "--load-timeout",
                type=SECONDS,
                default=3600.0,
                show_default=True,
                help="seconds a model load may take before the trial is a timeout "
                "(the trial's own timeout counts from the end of the load)",
            ),
            click.option(
                "--mem-limit",
                type=SIZE,
                default=None,
                callback=_check_positive_size,
                help="cap each trial's memory, e.g. 4GiB: a smaller machine (a memory cgroup, mmap'd "
                "weights included, where this machine allows one; else RLIMIT_DATA only)",
            ),
            *LOCK_OPTIONS,
        ]
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


# the host-wide measurement lock (tuner.measure.lock): every command that measures takes these
LOCK_OPTIONS = (
    click.option(
        "--no-wait", is_flag=True, help="fail instead of waiting when another measurement runs on this machine"
    ),
    click.option(
        "--lock-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="the host-wide measurement lock [TUNER_LOCK_FILE, else /run/lock/tuner/measure.lock, "
        "shared by every user]; a lock file each lets one machine stand in for several hosts",
    ),
)


def lock_params(f):
    """--no-wait and --lock-file alone, for a command that measures but runs no trials (tuner verify)."""
    for o in reversed(LOCK_OPTIONS):
        f = o(f)
    return f


def quality_params(budget_help: str = "", text_flag: str = "--text"):
    """The quality reference, text and budget (`tuner quality`, `tuner search`); the budget is checked by
    tuner.quality.Budget, so a bad value is one line whichever command got it."""

    def deco(f):
        opts = [
            click.option(
                "--reference",
                type=click.Path(dir_okay=False),
                default=None,
                help="the quality reference model (default: the highest-precision file among --model)",
            ),
            click.option(
                "--reference-logits",
                type=click.Path(dir_okay=False),
                default=None,
                help="a file written by `tuner quality --save-reference-logits`: the reference without running it",
            ),
            click.option(
                text_flag,
                "text",
                type=click.Path(dir_okay=False),
                default=None,
                help="UTF-8 text to measure quality on (default: the text shipped with tuner; with "
                "--reference-logits: the file's text)",
            ),
            click.option(
                "--max-kld",
                type=float,
                default=None,
                help="quality budget: mean KLD from the reference at most this" + budget_help,
            ),
            click.option(
                "--min-same-top",
                type=float,
                default=None,
                help="quality budget: top-token agreement with the reference at least this percentage",
            ),
        ]
        for o in reversed(opts):
            f = o(f)
        return f

    return deco


DURATION = Parsed("DURATION", parse_duration)


def load_config_file(path: Path) -> dict:
    """An experiment TOML or a saved config JSON (recommended.json, `tuner bench --json`) as a flat dict."""
    if not path.is_file():
        raise TunerError(f"config file not found: {path}")
    text = path.read_text(errors="replace")
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise TunerError(f"malformed TOML in {path}: {e}") from None
        return flatten_toml(data)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TunerError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict) or "model" not in data["config"]:
        raise TunerError(
            f"{path} is not a tuner config (expected a JSON object with a 'config' holding "
            "'model', as recommended.json or `tuner bench --json` write)"
        )
    cfg = dict(data["config"])
    unknown = set(cfg) - CONFIG_FIELDS
    if unknown:
        raise TunerError(f"{path}: unknown parameter(s) {', '.join(sorted(unknown))}")
    return cfg


def flatten_toml(data: dict) -> dict:
    """Experiment files may group keys in tables ([space], [study], [run]); options are one flat namespace."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten_toml(v))
        else:
            out[k.replace("-", "_")] = v
    return out


def config_option(help_text: str):
    """--config FILE, eager: fills ctx.default_map before any other option takes its value."""

    def callback(ctx: click.Context, param, value):
        if not value:
            return value
        raw = load_config_file(Path(value))
        # keys may be parameter names (n_gpu_layers) or any long flag spelling (ngl, threads, model)
        alias = {
            o.lstrip("-").replace("-", "_"): p.name for p in ctx.command.params for o in p.opts if o.startswith("--")
        }
        alias.update({p.name: p.name for p in ctx.command.params})
        values = {alias.get(k, k): v for k, v in raw.items()}
        names = {p.name for p in ctx.command.params}
        unknown = sorted(k for k in raw if alias.get(k, k) not in names)
        if unknown:
            raise TunerError(f"{value}: unknown parameter(s) {', '.join(unknown)}")
        multiple = {p.name for p in ctx.command.params if getattr(p, "multiple", False)}
        for k, v in values.items():
            if isinstance(v, list) and k not in multiple:
                values[k] = ",".join(str(x).lower() if isinstance(x, bool) else str(x) for x in v)
            elif k in multiple and not isinstance(v, list):
                values[k] = [v]
        ctx.default_map = {**(ctx.default_map or {}), **values}
        return value

    return click.option(
        "--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=True, callback=callback, help=help_text
    )

"""`tuner verify`: serve a study's recommendation and measure it from a real HTTP client (library:
tuner.search.verify)."""

from __future__ import annotations

import json

import click

from tuner.cli.common import log
from tuner.cli.options import SECONDS, lock_params
from tuner.search import verify as verifylib


@click.command("verify")
@click.argument("study_dir", type=click.Path(file_okay=False))
@click.option(
    "--llama-server",
    "llama_server_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="serve the printed llama-server command line with this binary instead of llama-cpp-python's "
    "server (llama_cpp.server with the recommended Llama(**kwargs))",
)
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="the server's port [a free one]")
@click.option(
    "--requests", type=click.IntRange(min=1), default=5, show_default=True, help="measured requests (and rounds)"
)
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="unmeasured first requests")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="also send N requests at a time [the study's --parallel sequences, else 1: one at a time only]",
)
@click.option(
    "--start-timeout",
    type=SECONDS,
    default=600.0,
    show_default=True,
    help="seconds the server may take to load the model and answer",
)
@click.option(
    "--request-timeout",
    type=SECONDS,
    default=600.0,
    show_default=True,
    help="seconds one request may take",
)
@click.option(
    "--bare/--no-bare",
    default=True,
    show_default=True,
    help="also measure the config bare, as the study did, just before and after serving: the client's figures "
    "against this machine now as well as against the study's",
)
@lock_params
@click.option("--json", "as_json", is_flag=True, help="print verify.json instead of a summary")
def verify_cmd(
    study_dir,
    llama_server_path,
    port,
    requests,
    warmup,
    concurrency,
    start_timeout,
    request_timeout,
    bare,
    no_wait,
    lock_file,
    as_json,
):
    """Serve the recommendation and measure it as a client sees it; writes STUDY_DIR/verify.json.

    Starts llama-cpp-python's OpenAI-compatible server (or, with --llama-server, your llama-server with the
    printed command line) with the recommended config on a free port, sends streaming completions of the
    study's test shape (n_prompt tokens of prompt, n_gen generated) one at a time (and N at a time with
    --concurrency or a --parallel study), and reports time to first token and tokens/s as the client saw them
    against the study's figures. The client's figures include what a server adds: HTTP, tokenization,
    sampling and detokenization of every token. Exit 1 when a request failed or the server did not come up.

    \b
    Examples:
      tuner verify results/demo
      tuner verify results/demo --llama-server ~/llama.cpp/build/bin/llama-server --concurrency 4
    """
    out = verifylib.verify(
        study_dir,
        llama_server_path=llama_server_path,
        port=port,
        requests=requests,
        warmup=warmup,
        concurrency=concurrency,
        start_timeout=start_timeout,
        request_timeout=request_timeout,
        wait=not no_wait,
        lock_file=lock_file,
        bare=bare,
        progress=log,
    )
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
    else:
        for line in summary(out):
            click.echo(line)
    return 0 if out["verdict"] == "ok" else 1


def summary(out: dict) -> list[str]:
    def num(v, fmt=".1f"):
        return "-" if v is None else format(v, fmt)

    st, r = out["study_figures"], out["ratio"]
    shape = out["test_shape"]
    lines = [
        f"{out['server']} served trial #{out['recommended_trial']}: {out['requests_ok']}/{out['requests_sent']} "
        f"requests ok (pp{shape['n_prompt']} + tg{shape['n_gen']}, streamed)",
        f"  client: tg {num(out['client_tg_tps'])} t/s, TTFT {num(out['client_ttft_ms'])} ms (medians)"
        + (
            f"; the server's own tg {num(out['levels'][0]['server_tg_tps'])} t/s (its timings: no HTTP)"
            if out["levels"][0].get("server_tg_tps")
            else ""
        ),
        f"  study:  tg {num(st['tg_tps'])} t/s, TTFT {num(st['ttft_ms'])} ms"
        f"  ->  client/study tg {num(r['tg'], '.2f')}, TTFT {num(r['ttft'], '.2f')}",
    ]
    if now := out.get("bare_now"):
        rn = out["ratio_now"]
        lines.append(
            f"  bare now (before and after serving): tg {num(now['tg_tps'])} t/s, TTFT {num(now['ttft_ms'])} ms"
            f"  ->  client/bare tg {num(rn['tg'], '.2f')}, TTFT {num(rn['ttft'], '.2f')}"
        )
    for lv in out["levels"][1:]:
        lines.append(
            f"  {lv['concurrency']} at a time: {lv['requests_ok']}/{lv['requests']} ok, aggregate tg "
            f"{num(lv.get('aggregate_tg_tps'))} t/s, per stream {num(lv['client_tg_tps'])} t/s, "
            f"TTFT {num(lv['client_ttft_ms'])} ms"
            + (
                f" (against the study: aggregate {num(r['aggregate_tg'], '.2f')}, per stream "
                f"{num(r.get('per_stream_tg'), '.2f')}, TTFT {num(r.get('ttft_at_n'), '.2f')})"
                if r.get("aggregate_tg")
                else ""
            )
        )
    for lv in out["levels"]:
        lines += [f"  error ({lv['concurrency']} at a time): {e}" for e in lv["errors"]]
    lines.append(f"  note: {out['server_adds']}")
    lines += [f"  note: {n}" for n in out["notes"]]
    lines += [f"  not applied by this server: {n}" for n in out["not_applied"]]
    if not out["provenance"]["same_rig_as_study"]:
        lines.append("  note: this machine or build is not the study's (other fingerprints)")
    lines.append(f"verify.json written; verdict {out['verdict']}")
    return lines

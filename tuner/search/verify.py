"""`tuner verify`: the recommendation served as users serve it, measured by a real HTTP client.

A study measures one request at a time in a bare llama.cpp context (tokens in, no sampling, no text out). Users
paste a form of the recommendation into a server. This starts that server with the recommended config in a
worker process on a free port, llama-cpp-python's own OpenAI-compatible server (`llama_cpp.server`, its
`server` extra) by default or the user's `llama-server` binary with the printed command line, sends streaming
completions of the study's test shape (n_prompt tokens of prompt, exactly n_gen generated: `max_tokens` with
end-of-sequence suppressed), first one at a time and then N at a time where the study served N sequences, and
writes what a client saw beside the study's own figures to STUDY/verify.json.

What the server adds on top of the study's figures, and is in the client's: HTTP and JSON (the request, one
server-sent event per token), tokenization of the prompt text, sampling of every token (the server's default
sampler chain, where the study takes the logits and samples nothing), and detokenization of every token into
text. So the client's rates are the study's less that overhead; a ratio far below 1 names a server cost (or a
config that the server does not apply: see `not_applied`), not a measurement error.

    from tuner.search.verify import verify
    result = verify("results/demo")                       # llama_cpp.server with recommended.json's kwargs
    result = verify("results/demo", llama_server="/opt/llama.cpp/build/bin/llama-server", concurrency=4)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from importlib import resources as importlib_resources
from pathlib import Path

import httpx

from tuner import ports, stats
from tuner.errors import TunerError
from tuner.measure import hardware
from tuner.measure.lock import measurement_lock
from tuner.measure.runner import Runner
from tuner.record import TrialConfig, utcnow
from tuner.search.recommend import RECOMMENDED_FILE, VERIFY_FILE, write

HOST = "127.0.0.1"
SEED = 0  # the sampler's seed in every request: the same text on a rerun, so the same detokenization work
LOG_TAIL_LINES = 12

SERVER_ADDS = (
    "the client's figures include what a server adds to the study's bare llama.cpp decode: HTTP and JSON "
    "(one server-sent event per token), tokenization of the prompt text, sampling of every token (the "
    "server's default sampler chain; the study samples nothing) and detokenization of every token into text"
)
PYTHON_SERVER_NOTES = (
    "llama_cpp.server serves one request at a time (one llama_cpp.Llama, no slots): concurrent requests queue, "
    "so its N-at-a-time figures measure queueing, not batched decoding (llama-server -np N batches them)",
    "llama_cpp.server's ModelSettings default logits_all=True (logits for every prompt token) is set to False, "
    "as in the recommended Llama(**kwargs)",
)


class VerifyError(TunerError):
    """Bad input for `tuner verify` (no recommendation, a port in use, no such binary): one line, exit 2."""


class ServerError(TunerError):
    """The server did not come up, or died while serving: the recommendation failed to serve (exit 1)."""

    exit_code = 1


# ---------------------------------------------------------------------------------------------------------------
# input


def load_recommendation(study_dir: str | os.PathLike) -> dict:
    """The study's recommended.json, checked to carry what verify needs (its config and forms)."""
    d = Path(study_dir)
    if not d.is_dir():
        raise VerifyError(f"no study folder at {d}")
    path = d / RECOMMENDED_FILE
    if not path.is_file():
        raise VerifyError(f"{d} has no {RECOMMENDED_FILE}: run `tuner search` (or `tuner recommend {d}`) first")
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VerifyError(f"cannot read {path}: {e}") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("forms"), dict) or not isinstance(rec.get("config"), dict):
        raise VerifyError(f"{path} is not a recommendation (no config or forms)")
    model = rec["forms"].get("llama_cpp_python", {}).get("model_path") or rec["config"].get("model")
    if not model or not Path(model).is_file():
        raise VerifyError(f"the recommended model {model!r} is not on this machine")
    return rec


def study_concurrency(rec: dict) -> int:
    """How many sequences the study served at once: its `parallel` figures or its config's n_seq, else 1."""
    par = rec.get("parallel") or {}
    n = par.get("n_seq") or rec["config"].get("n_seq") or 1
    return max(1, int(n))


def not_applied(rec: dict, kind: str) -> list[str]:
    """Parts of the recommended config that this server form cannot express (the figures then differ)."""
    cfg = rec["config"]
    if kind == "llama-server":
        return []
    out = []
    if cfg.get("overrides") or cfg.get("n_cpu_moe") or cfg.get("cpu_moe") or cfg.get("moe_part", "none") != "none":
        out.append("expert placement (--n-cpu-moe / -ot): llama_cpp.Llama() has no tensor-override parameter")
    if cfg.get("rpc"):
        out.append("RPC devices (--rpc): llama-cpp-python 0.3.36's Llama() takes none")
    return out


# ---------------------------------------------------------------------------------------------------------------
# the servers


@dataclass
class ServerSpec:
    """A server to start: its command line, where its log goes, how to ask whether it is up."""

    kind: str  # "llama_cpp.server" or "llama-server"
    argv: list[str]
    port: int
    health_path: str
    tokenize: tuple[str, str, str]  # path, request field of the text, response field of the tokens
    settings: dict = field(default_factory=dict)  # llama_cpp.server's config file (kwargs), for the record

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"


def python_server(rec: dict, port: int, workdir: Path) -> ServerSpec:
    """llama_cpp.server with the recommended Llama(**kwargs), through its JSON config file (every kwarg as the
    recommendation has it; `model_path` is the settings' `model`)."""
    kwargs = dict(rec["forms"]["llama_cpp_python"])
    model = kwargs.pop("model_path")
    settings = {
        "host": HOST,
        "port": port,
        # the default True ends a streaming request when another arrives: concurrent clients must queue instead
        "interrupt_requests": False,
        "models": [{"model": model, **kwargs, "logits_all": False, "verbose": True}],
    }
    cfg = workdir / "llama_cpp_server.json"
    cfg.write_text(json.dumps(settings, indent=2))
    argv = [sys.executable, "-m", "llama_cpp.server", "--config_file", str(cfg)]
    return ServerSpec(
        "llama_cpp.server", argv, port, "/v1/models", ("/extras/tokenize", "input", "tokens"), settings=settings
    )


def llama_server(rec: dict, binary: str, port: int, concurrency: int) -> ServerSpec:
    """The printed llama-server command line, run with the user's binary on our port (and `-np N` for N
    concurrent requests when the line has no slot count of its own)."""
    path = shutil.which(binary) or binary
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise VerifyError(f"--llama-server {binary}: no such executable")
    argv = [path, *rec["forms"]["llama_server_argv"][1:], "--host", HOST, "--port", str(port)]
    if concurrency > 1 and not {"-np", "--parallel"} & set(argv):
        argv += ["-np", str(concurrency)]
    return ServerSpec("llama-server", argv, port, "/health", ("/tokenize", "content", "tokens"))


def log_tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


@contextlib.contextmanager
def running(spec: ServerSpec, log: Path, start_timeout: float, client):
    """The server started in its own process group, waited for until it answers its health check (or dies, or
    `start_timeout` passes: ServerError with its log's tail), and stopped (SIGTERM, then SIGKILL) at the end."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(spec.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise ServerError(
                    f"{spec.kind} exited with code {proc.returncode} before serving: {log_tail(log) or 'no output'}"
                )
            try:
                if client.get(spec.base_url + spec.health_path, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{spec.kind} did not answer {spec.health_path} within {start_timeout:g} s: "
                    f"{log_tail(log) or 'no output'}"
                )
            time.sleep(0.2)
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# the client


def source_text() -> str:
    """The prose the prompts are cut from: the text shipped for `tuner quality` (ordinary English)."""
    return importlib_resources.files("tuner").joinpath("data/quality-text.txt").read_text(encoding="utf-8")


def make_prompts(client, spec: ServerSpec, n_prompt: int, count: int) -> list[tuple[str, int]]:
    """`count` different prompts of n_prompt tokens each as this server tokenizes them (BOS included), each
    (text, its token count). Each starts at another word of the text, so no server can reuse a cached prefix
    (llama-cpp-python keeps the longest common prefix of the last request; llama-server caches prompts)."""
    path, req_field, resp_field = spec.tokenize
    words = source_text().split()

    def count_tokens(text: str) -> int:
        body = {req_field: text}
        if spec.kind == "llama-server":
            body["add_special"] = True  # as its completion endpoint tokenizes the prompt (BOS)
        r = client.post(spec.base_url + path, json=body)
        r.raise_for_status()
        return len(r.json()[resp_field])

    prompts = []
    for i in range(count):
        start = (i * 37) % len(words)
        ring = words[start:] + words[:start]
        while count_tokens(" ".join(ring)) < n_prompt:  # a long test shape: the text again, end to end
            ring = ring + words
        text = " ".join(ring)
        # the longest prefix of at most n_prompt tokens, to the character (a word can be several tokens)
        lo, hi = 1, len(text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count_tokens(text[:mid]) <= n_prompt:
                lo = mid
            else:
                hi = mid - 1
        prompts.append((text[:lo], count_tokens(text[:lo])))
    return prompts


def stream_one(client, spec: ServerSpec, prompt: str, n_gen: int, timeout: float) -> dict:
    """One streaming completion, timed as its client sees it: TTFT from sending the request to the first
    streamed token; t/s over the tokens after the first (n - 1 tokens between the first and the last)."""
    body = {
        "prompt": prompt,
        "max_tokens": n_gen,
        "min_tokens": n_gen,  # llama_cpp.server: no end-of-sequence before n_gen
        "ignore_eos": True,  # llama-server: the same
        "stream": True,
        "seed": SEED,
        "cache_prompt": False,  # llama-server: every request pays its prompt, as the study's test does
    }
    t0 = time.perf_counter()
    t_first = t_last = None
    chunks, finish, usage, timings, error = 0, None, None, None, None
    try:
        with client.stream("POST", spec.base_url + "/v1/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                r.read()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    raise RuntimeError(str(msg["error"])[:200])
                usage = msg.get("usage") or usage
                timings = msg.get("timings") or timings
                choice = (msg.get("choices") or [None])[0]
                if choice is None:
                    continue
                finish = choice.get("finish_reason") or finish
                if choice.get("finish_reason") and not choice.get("text"):
                    continue  # the closing event carries no token
                now = time.perf_counter()
                t_first = t_first or now
                t_last = now
                chunks += 1
    except Exception as e:  # noqa: BLE001 - a failed request is a recorded outcome, not a crash of the run
        error = " ".join(str(e).split()) or type(e).__name__
    # max_tokens reached: exactly n_gen tokens (a chunk can hold several when a character spans tokens)
    n = (usage or {}).get("completion_tokens") or (n_gen if finish == "length" else chunks)
    ok = error is None and t_first is not None and n == n_gen
    if error is None and not ok:
        error = f"{n} of {n_gen} tokens generated (finish_reason {finish})"
    out = {
        "ok": ok,
        "error": error,
        "ttft_ms": (t_first - t0) * 1e3 if t_first else None,
        "tg_tps": (n - 1) / (t_last - t_first) if t_first and t_last and t_last > t_first and n > 1 else None,
        "n_gen": n,
        "total_ms": (time.perf_counter() - t0) * 1e3,
        "first_token_at": t_first,
        "last_token_at": t_last,
    }
    if timings:  # llama-server's own figures for the request: what it measured inside, beside the client's
        out["server_timings"] = {k: timings.get(k) for k in ("prompt_per_second", "predicted_per_second")}
    return out


def median(xs) -> float | None:
    """The figure of what was measured (tuner.stats.center, the one rule), skipping what a request did not report."""
    return stats.center([x for x in xs if x is not None])


def run_level(client, spec, prompts, n_gen, concurrency, rounds, timeout) -> dict:
    """`rounds` rounds of `concurrency` requests sent together (1: one after another)."""
    results, aggregate = [], []
    it = iter(prompts)
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        for _ in range(rounds):
            batch = [next(it)[0] for _ in range(concurrency)]
            futs = [pool.submit(stream_one, client, spec, p, n_gen, timeout) for p in batch]
            wave = [f.result() for f in futs]
            results += wave
            done = [r for r in wave if r["ok"]]
            if len(done) == concurrency:  # every stream's tokens after its first, over the span they all took
                span = max(r["last_token_at"] for r in done) - min(r["first_token_at"] for r in done)
                if span > 0:
                    aggregate.append(sum(r["n_gen"] - 1 for r in done) / span)
    for r in results:
        r.pop("first_token_at"), r.pop("last_token_at")
    ok = [r for r in results if r["ok"]]
    level = {
        "concurrency": concurrency,
        "requests": len(results),
        "requests_ok": len(ok),
        "client_tg_tps": median(r["tg_tps"] for r in ok),
        "client_ttft_ms": median(r["ttft_ms"] for r in ok),
        "errors": sorted({r["error"] for r in results if r["error"]}),
        "per_request": results,
    }
    server = [(r.get("server_timings") or {}).get("predicted_per_second") for r in ok]
    if any(server):  # llama-server's own decode rate (its sampling inside, no HTTP): where the time goes
        level["server_tg_tps"] = median(server)
    if concurrency > 1:
        level["aggregate_tg_tps"] = median(aggregate)
    return level


# ---------------------------------------------------------------------------------------------------------------
# the whole verification


def study_figures(rec: dict) -> dict:
    """The study's figures for the recommended config: medians of its measured repetitions."""
    m = rec.get("measured") or {}

    def fig(name: str, unit: str):
        return median(m.get(f"{name}_samples") or []) or m.get(f"{name}_{unit}_mean")

    out = {"tg_tps": fig("tg", "ts"), "pp_tps": fig("pp", "ts"), "ttft_ms": fig("ttft", "ms")}
    if rec.get("parallel"):
        out["parallel"] = rec["parallel"]
    return out


def measure_bare(rec: dict, timeout: float) -> dict:
    """The recommended config measured now as the study measured it: one trial in a worker (its own process,
    gone before the server starts or after it stopped), the study's test shape and repetitions."""
    cfg = TrialConfig.from_dict(rec["config"])
    with Runner(timeout=timeout) as runner:
        r = runner.run(cfg)
    out = {"outcome": r.outcome, "tg_samples": r.tg_samples, "pp_samples": r.pp_samples}
    out["ttft_samples_ms"] = r.ttft_samples_ms
    if not r.ok:
        out["cause"] = (r.cause or "")[:200]
    return out


def bare_figures(runs: list[dict]) -> dict:
    """Medians over the bare runs before and after serving (every repetition of both)."""
    return {
        "tg_tps": median(x for r in runs for x in r["tg_samples"]),
        "pp_tps": median(x for r in runs for x in r["pp_samples"]),
        "ttft_ms": median(x for r in runs for x in r["ttft_samples_ms"]),
        "runs": runs,
    }


def ratio(a, b) -> float | None:
    return a / b if a and b else None


def verify(
    study_dir: str | os.PathLike,
    *,
    llama_server_path: str | None = None,
    port: int | None = None,
    requests: int = 5,
    warmup: int = 1,
    concurrency: int | None = None,
    start_timeout: float = 600.0,
    request_timeout: float = 600.0,
    wait: bool = True,
    lock_file: str | None = None,
    bare: bool = True,
    progress=None,
) -> dict:
    """Serve the study's recommendation and measure it from a client; write STUDY/verify.json and return it.

    requests: measured requests one at a time (and rounds of `concurrency` at a time), after `warmup`
    unmeasured ones. concurrency: default the study's served sequences (1 without --parallel). bare: also
    measure the config bare, as the study did, just before and just after serving (never while the server holds
    the model), so the client's figures are also set against this machine as it is now (`ratio_now`).
    Raises VerifyError (bad input, nothing written) or ServerError (the server did not come up)."""
    say = progress or (lambda msg: None)
    if requests < 1 or warmup < 0:
        raise VerifyError("--requests must be at least 1 and --warmup at least 0")
    if concurrency is not None and concurrency < 1:
        raise VerifyError(f"--concurrency {concurrency}: at least 1")
    rec = load_recommendation(study_dir)
    n = concurrency or study_concurrency(rec)
    port = ports.check_port(HOST, port or 0)
    cfg = rec["config"]
    n_prompt, n_gen = int(cfg["n_prompt"]), int(cfg["n_gen"])
    with tempfile.TemporaryDirectory(prefix="tuner-verify-") as tmp:
        work = Path(tmp)
        if llama_server_path:
            spec = llama_server(rec, llama_server_path, port, n)
        else:
            spec = python_server(rec, port, work)
        log = work / "server.log"
        levels = [1] + ([n] if n > 1 else [])
        count = warmup + requests + (requests * n if n > 1 else 0)
        with (
            measurement_lock(wait=wait, what=f"tuner verify {study_dir}", path=lock_file),
            httpx.Client(timeout=request_timeout, trust_env=False) as client,
        ):
            bare_runs = []
            if bare:
                say("the config measured bare first (a worker, as the study measured it)")
                bare_runs.append(measure_bare(rec, request_timeout))
            t_start = time.perf_counter()
            say(f"starting {spec.kind} on port {port}: {' '.join(spec.argv)}")
            try:
                with running(spec, log, start_timeout, client) as proc:
                    start_s = time.perf_counter() - t_start
                    say(f"{spec.kind} up after {start_s:.1f} s; {count} prompts of {n_prompt} tokens")
                    try:
                        prompts = make_prompts(client, spec, n_prompt, count)
                    except (httpx.HTTPError, KeyError, ValueError) as e:
                        raise ServerError(f"{spec.kind} did not tokenize the prompts: {e}") from None
                    it = iter(prompts)
                    for _ in range(warmup):
                        stream_one(client, spec, next(it)[0], n_gen, request_timeout)
                    results = []
                    for c in levels:
                        say(f"{requests} {'request(s) one at a time' if c == 1 else f'rounds of {c} at a time'}")
                        chunk = [next(it) for _ in range(requests * c)]
                        results.append(run_level(client, spec, chunk, n_gen, c, requests, request_timeout))
                        if proc.poll() is not None:
                            raise ServerError(f"{spec.kind} died while serving: {log_tail(log)}")
                    server_log = log_tail(log, 40)
            except ServerError as e:
                # a recommendation that does not serve is a finding: recorded (verdict failed), then exit 1
                write(Path(study_dir) / VERIFY_FILE, failure(rec, spec, str(e), log_tail(log, 40)))
                raise
            if bare:
                say("the config measured bare again")
                bare_runs.append(measure_bare(rec, request_timeout))
    study = study_figures(rec)
    seq = results[0]
    out = {
        **header(rec, spec),
        "test_shape": {
            "n_prompt": n_prompt,
            "n_gen": n_gen,
            "prompt_tokens": sorted({c for _, c in prompts}),
            "n_depth_of_study": cfg.get("n_depth", 0),
        },
        "requests": seq["requests"],
        "requests_ok": sum(x["requests_ok"] for x in results),
        "requests_sent": sum(x["requests"] for x in results),
        "warmup": warmup,
        "client_tg_tps": seq["client_tg_tps"],
        "client_ttft_ms": seq["client_ttft_ms"],
        "study_figures": study,
        "ratio": {
            "tg": ratio(seq["client_tg_tps"], study["tg_tps"]),
            "ttft": ratio(seq["client_ttft_ms"], study["ttft_ms"]),
        },
        "levels": results,
        "server_start_s": start_s,
        "server_adds": SERVER_ADDS,
        "notes": list(PYTHON_SERVER_NOTES if spec.kind == "llama_cpp.server" else ()),
        "not_applied": not_applied(rec, spec.kind),
        "server_log_tail": server_log,
        "provenance": provenance(rec),
    }
    if bare_runs:
        now = bare_figures(bare_runs)
        out["bare_now"] = now
        out["ratio_now"] = {
            "tg": ratio(seq["client_tg_tps"], now.get("tg_tps")),
            "ttft": ratio(seq["client_ttft_ms"], now.get("ttft_ms")),
        }
    if study_concurrency(rec) > 1:
        # the study (and a bare run of its config) decoded N sequences together: its tg is their aggregate and
        # its TTFT a stream's; one request at a time has no study figure to be set against
        out["ratio"].update(tg=None, ttft=None)
        if "ratio_now" in out:
            out["ratio_now"].update(tg=None, ttft=None)
        out["notes"].append(
            f"the study served {study_concurrency(rec)} sequences together: its figures are set against the "
            "requests sent that many at a time, not one at a time"
        )
    if n > 1 and (par := study.get("parallel")):
        last = results[-1]
        out["ratio"]["aggregate_tg"] = ratio(last.get("aggregate_tg_tps"), par.get("aggregate_tg_tps"))
        out["ratio"]["per_stream_tg"] = ratio(last.get("client_tg_tps"), par.get("per_stream_tg_tps"))
        out["ratio"]["ttft_at_n"] = ratio(last.get("client_ttft_ms"), study.get("ttft_ms"))
        if "ratio_now" in out:
            out["ratio_now"]["aggregate_tg"] = ratio(last.get("aggregate_tg_tps"), out["bare_now"].get("tg_tps"))
    if cfg.get("n_depth"):
        out["notes"].append(
            f"the study measured at depth {cfg['n_depth']} (a filled cache); the client's requests start from an "
            "empty one, so its rates are not comparable one to one"
        )
    out["verdict"] = "ok" if out["requests_ok"] == out["requests_sent"] else "failed"
    write(Path(study_dir) / VERIFY_FILE, out)
    return out


def header(rec: dict, spec: ServerSpec) -> dict:
    """What every verify.json starts with: the study, when, and the server as it was started."""
    return {
        "study": rec.get("study"),
        "created_utc": utcnow(),
        "server": spec.kind,
        "command": spec.argv,
        "settings": spec.settings or None,
        "recommended_trial": rec.get("trial_number"),
    }


def failure(rec: dict, spec: ServerSpec, error: str, server_log: str) -> dict:
    """verify.json of a server that did not come up or died: no client figures, the error and the log's tail."""
    return {
        **header(rec, spec),
        "requests_ok": 0,
        "requests_sent": 0,
        "client_tg_tps": None,
        "client_ttft_ms": None,
        "study_figures": study_figures(rec),
        "ratio": {"tg": None, "ttft": None},
        "levels": [],
        "server_adds": SERVER_ADDS,
        "notes": [],
        "not_applied": not_applied(rec, spec.kind),
        "error": error,
        "server_log_tail": server_log,
        "verdict": "failed",
    }


def provenance(rec: dict) -> dict:
    """Where and with what the client measured, against the study's fingerprints."""
    hw = hardware.probe().fingerprint()
    build = hardware.build_fingerprint(hardware.build_info())

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {
        "hw_fingerprint": hw,
        "build_fingerprint": build,
        "same_rig_as_study": hw == rec.get("hw_fingerprint") and build == rec.get("build_fingerprint"),
        "llama_cpp_python": version("llama-cpp-python"),
        "tuner": version("tuner"),
        "httpx": version("httpx"),
        "python": sys.version.split()[0],
    }

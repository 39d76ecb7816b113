"""The trial worker: a child process that measures configs the way llama-bench does.

Run as `python -m tuner.measure.worker RESULT_FD`. It reads one JSON job per line on stdin and writes JSON events
to RESULT_FD (stdout and stderr stay llama.cpp's): `{"event": "stage", ...}` as it goes, then exactly one
`{"event": "result", ...}` per job. It keeps a loaded model for the next job when the load parameters agree,
and exits on EOF. Anything fatal (a signal, an abort) kills only this process; the runner records it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import resource
import signal
import sys
import time

import gguf
import numpy as np

from tuner.measure import batched, buffers
from tuner.quality.evaluate import run_job
from tuner.record import TrialConfig, oom_line, parse_tensor_split
from tuner.units import physical_cores

FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
SPLIT_MODE = {"none": 0, "layer": 1, "row": 2}
# llama_decode: 1 = no KV slot for the batch, -2 = allocation failed (llama-context.cpp)
DEPTH_STATES = 16  # filled-context state files a runner keeps (a ladder: rungs x configs of other KV settings)
DEPTH_BYTES = 8 << 30  # ... and at most this many bytes of them (a 32k-token state of a large model is GBs)
DECODE_OOM = {1: "no KV cache slot for the batch (context full)", -2: "allocation failed during decode"}


class TrialFailure(Exception):
    def __init__(self, outcome: str, cause: str):
        super().__init__(cause)
        self.outcome = outcome
        self.cause = cause


def set_pdeathsig() -> None:
    """Die with the parent: a worker must never outlive a killed search and hold the rig."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> None:
    # Linux >= 4.0: writing 5 resets VmHWM to the current RSS, so each job gets its own high-water mark.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def status_kib(key: str) -> int | None:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


class Worker:
    def __init__(self, out):
        self.out = out
        import llama_cpp.llama_cpp as L  # noqa: PLC0415 - the worker process only: the runner never loads llama.cpp

        from tuner import llama as glue  # noqa: PLC0415 - loads llama_cpp: the worker process only

        self.L = L
        self.glue = glue
        L.llama_backend_init()
        verbose = os.environ.get("TUNER_WORKER_VERBOSE") == "1"
        self.log = glue.LogCapture(echo_level=1 if verbose else 3, stream=sys.stderr)
        self.model = None
        self.model_key = None
        self.model_overrides = None
        self.load_ms = None
        self.n_layer = None
        self.applied: list[str] = []
        self.model_buffers: dict[str, dict[str, int]] = {}
        self.rpc = ""  # the RPC servers this process registered (llama.cpp cannot forget them)
        self.timing = {"depth_fill_ms": [], "depth_restore_ms": []}

    def emit(self, event: str, **data) -> None:
        if event == "stage":  # the runner's figure for a worker that dies before it can report a result
            data["hwm"] = (status_kib("VmHWM") or 0) * 1024
        self.out.write(json.dumps({"event": event, **data}) + "\n")
        self.out.flush()

    # -- loading ----------------------------------------------------------------------------------
    def _free_model(self) -> None:
        if self.model is not None:
            self.L.llama_model_free(self.model)
        self.model = self.model_key = self.model_overrides = None

    def load(self, cfg: TrialConfig, fault: str | None) -> None:
        if self.model is not None and self.model_key == cfg.load_key():
            return
        self._free_model()
        L = self.L
        self.emit("stage", stage="load")
        if fault == "hang_load":
            time.sleep(10**6)
        if fault == "slow_load":  # a load that takes a while (a big model from disk), then succeeds
            time.sleep(float(os.environ.get("TUNER_SLOW_LOAD_S", "2")))
        if cfg.rpc != self.rpc:
            if self.rpc:  # registration is permanent: this process would still place layers on the old servers
                raise TrialFailure("error", f"this worker registered RPC servers {self.rpc}, the trial asks {cfg.rpc}")
            try:
                self.glue.rpc_add_servers(cfg.rpc.split(","))  # an unreachable server aborts: a failed trial
            except RuntimeError as e:
                raise TrialFailure("load_error", str(e)) from None
            self.rpc = cfg.rpc
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = cfg.n_gpu_layers
        mp.split_mode = SPLIT_MODE[cfg.split_mode]
        mp.main_gpu = cfg.main_gpu
        if cfg.use_mlock:
            mp.load_mode = L.LLAMA_LOAD_MODE_MMAP_MLOCK if cfg.use_mmap else L.LLAMA_LOAD_MODE_MLOCK
        else:
            mp.load_mode = L.LLAMA_LOAD_MODE_AUTO if cfg.use_mmap else L.LLAMA_LOAD_MODE_NONE
        if cfg.tensor_split:
            parts = parse_tensor_split(cfg.tensor_split)
            n = L.llama_max_devices()
            self._tensor_split = (ctypes.c_float * n)(*(parts + [0.0] * (n - len(parts)))[:n])
            mp.tensor_split = self._tensor_split
        pairs = self.glue.override_patterns(cfg.n_cpu_moe, cfg.cpu_moe, cfg.overrides, cfg.moe_part)
        overrides = None
        if pairs:
            try:
                overrides = self.glue.Overrides(pairs)
            except ValueError as e:
                raise TrialFailure("load_error", str(e)) from None
            mp.tensor_buft_overrides = overrides.pointer
        mark = len(self.log.lines)
        t0 = time.perf_counter_ns()
        model = L.llama_model_load_from_file(cfg.model.encode(), mp)
        t1 = time.perf_counter_ns()
        if not model:
            raise TrialFailure(
                *classify_log("".join(self.log.lines[mark:]), "load_error", "llama.cpp failed to load the model")
            )
        self.model, self.model_key, self.model_overrides = model, cfg.load_key(), overrides
        self.load_ms = (t1 - t0) / 1e6
        self.n_layer = L.llama_model_n_layer(model)
        self.applied = parse_overrides(self.log.lines[mark:])
        self.model_buffers = buffers.per_device(buffers.parse_log("".join(self.log.lines[mark:])))

    # -- a filled context, once -------------------------------------------------------------------
    def depth_save(self, ctx, key: tuple) -> None:
        """Keep the filled sequence's state in a file: its pages live in the page cache, not in this process's
        memory (a copy in RAM would add a whole KV cache to the trial's peak). The file is the runner's, not this
        worker's: the race and the ladder interleave configs, a fresh worker each, and each would otherwise pay
        the fill again (minutes at 32k on a CPU). A few are kept, the least recently used removed."""
        path = _depth_file(key)
        part = f"{path}.{os.getpid()}.part"  # a worker killed mid-save leaves no state that looks whole
        if self.L.llama_state_seq_save_file(ctx, part.encode(), 0, (self.L.llama_token * 1)(), 0):
            os.replace(part, path)
        else:
            with contextlib.suppress(OSError):
                os.unlink(part)
        states = []
        for p in _depth_files():
            with contextlib.suppress(OSError):
                st = os.stat(p)
                states.append((st.st_mtime_ns, st.st_size, p))
        states.sort()
        while len(states) > 1 and (len(states) > DEPTH_STATES or sum(s[1] for s in states) > DEPTH_BYTES):
            with contextlib.suppress(OSError):
                os.unlink(states.pop(0)[2])

    def depth_restore(self, ctx, key: tuple, n_depth: int) -> bool:
        """Restore the filled context saved for this key (False: fill it anew); checked: the sequence must end
        where the fill ended."""
        path = _depth_file(key)
        if not os.path.exists(path):
            return False
        t0 = time.perf_counter_ns()
        n = ctypes.c_size_t(0)
        ok = self.L.llama_state_seq_load_file(ctx, path.encode(), 0, (self.L.llama_token * 1)(), 1, ctypes.byref(n))
        mem = self.L.llama_get_memory(ctx)
        if not ok or self.L.llama_memory_seq_pos_max(mem, 0) != n_depth - 1:
            self.L.llama_memory_clear(mem, False)
            return False
        self.timing["depth_restore_ms"].append((time.perf_counter_ns() - t0) / 1e6)
        with contextlib.suppress(OSError):
            os.utime(path)  # least recently used goes first
        return True

    # -- measuring --------------------------------------------------------------------------------
    def run(self, job: dict) -> dict:
        cfg = TrialConfig.from_dict(job["config"])
        fault = job.get("fault")
        _reset_hwm()
        self.emit("stage", stage="start")
        if fault:
            inject_early(fault)
        self.load(cfg, fault)
        L = self.L
        if cfg.n_seq:
            # N sequences together in one context of every sequence's cells (tuner.measure.batched)
            phases = [(cfg.effective_ctx(), True, True)]
        elif not cfg.n_ctx and cfg.n_prompt and cfg.n_gen:
            # llama-bench runs pp and tg as separate tests, each in a fresh context sized for it (n_depth +
            # n_prompt, n_depth + n_gen cells; n_batch and n_ubatch capped by it). tg measured in the shared
            # pp+tg context, after the pp runs, read ~3 % below llama-bench on Gemma 3 270M at 2 threads and at
            # parity in its own context (one A/B, 5 and 7 rounds). A 9-round A B B A run on a quiet machine
            # still read pp and tg 3-7 % below llama-bench, cause not found (benchmarks/README.md); the +1 cell
            # leaves room for the TTFT token.
            phases = [(cfg.n_depth + cfg.n_prompt + 1, True, False), (cfg.n_depth + cfg.n_gen, False, True)]
        else:
            ctx_size = cfg.effective_ctx()
            if not cfg.n_ctx and cfg.n_prompt and not cfg.n_gen:
                # room for the TTFT token after a pp-only test (-n 0); attention still spans the same padded
                # KV cells as llama-bench's n_prompt context, so pp speed is unchanged
                ctx_size += 1
            phases = [(ctx_size, True, True)]
        result: dict = {"pp_samples": [], "tg_samples": [], "ttft_samples_ms": []}
        self.timing = {"depth_fill_ms": [], "depth_restore_ms": []}
        fa = None
        bufs = {k: dict(v) for k, v in self.model_buffers.items()}
        for n_ctx, pp, tg in phases:
            mark = len(self.log.lines)
            ctx, resolved = self.context(cfg, n_ctx, fault)
            fa = fa or resolved
            for buft, kinds in buffers.per_device(buffers.parse_log("".join(self.log.lines[mark:]))).items():
                for kind, n in kinds.items():  # the larger context of a split pp/tg test
                    bufs.setdefault(buft, {})[kind] = max(n, bufs.get(buft, {}).get(kind, 0))
            pools = self.glue.Threadpools(ctx, *self.threads(cfg))
            try:
                got = (
                    batched.measure(self, ctx, cfg, decode_failure, self.emit)
                    if cfg.n_seq
                    else self.measure(ctx, cfg, fault, do_pp=pp, do_tg=tg)
                )
                for k, v in got.items():
                    result[k] = result.get(k, []) + v
            finally:
                pools.free()
                L.llama_free(ctx)
        result.update(
            load_ms=self.load_ms,
            flash_attn_resolved=fa,
            model_n_layer=self.n_layer,
            overrides_applied=self.applied,
            n_gpu_layers_effective=effective_gpu_layers(
                cfg.n_gpu_layers, self.n_layer, any(d["type"] in self.glue.OFFLOAD_TYPES for d in self.glue.devices())
            ),
            buffers=bufs,
            peak_rss_bytes=(status_kib("VmHWM") or 0) * 1024,
            depth_fill_ms=sum(self.timing["depth_fill_ms"]) if self.timing["depth_fill_ms"] else None,
            depth_restore_ms=(
                float(np.median(self.timing["depth_restore_ms"])) if self.timing["depth_restore_ms"] else None
            ),
        )
        return result

    @staticmethod
    def threads(cfg: TrialConfig) -> tuple[int, int]:
        n_threads = cfg.n_threads or physical_cores()
        return n_threads, cfg.n_threads_batch or n_threads

    def context(self, cfg: TrialConfig, n_ctx: int, fault: str | None):
        """A llama.cpp context of n_ctx cells for cfg, and what flash attention `auto` resolved to."""
        L = self.L
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cfg.n_batch
        cp.n_ubatch = cfg.n_ubatch
        cp.n_threads, cp.n_threads_batch = self.threads(cfg)
        cp.flash_attn_type = FLASH_ATTN[cfg.flash_attn]
        cp.type_k = ggml_type(cfg.type_k)
        cp.type_v = ggml_type(cfg.type_v)
        cp.swa_full = False  # as llama-bench
        cp.n_seq_max = cfg.streams()  # llama-server -np: one sequence per slot
        cp.kv_unified = cfg.kv_unified
        cp.no_perf = True
        if fault == "alloc_fail":
            # A real allocation failure: cap the data segment just above what is in use now.
            in_use = (status_kib("VmData") or 0) * 1024
            resource.setrlimit(resource.RLIMIT_DATA, (in_use + (1 << 20), resource.RLIM_INFINITY))
        self.emit("stage", stage="context")
        mark = len(self.log.lines)
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise TrialFailure(
                *classify_log("".join(self.log.lines[mark:]), "error", "llama.cpp failed to create the context")
            )
        return ctx, resolved_flash_attn(self.log.lines[mark:], cfg.flash_attn)

    def measure(self, ctx, cfg: TrialConfig, fault: str | None, do_pp: bool = True, do_tg: bool = True) -> dict:
        L = self.L
        vocab = L.llama_model_get_vocab(self.model)
        n_vocab = L.llama_vocab_n_tokens(vocab)
        bos = L.llama_vocab_bos(vocab) if L.llama_vocab_get_add_bos(vocab) else None
        mem = L.llama_get_memory(ctx)
        rng = np.random.default_rng(1234)

        def tokens(n: int) -> np.ndarray:
            t = rng.integers(0, n_vocab, size=max(n, 1), dtype=np.int32)
            if bos is not None:
                t[0] = bos
            return t

        def decode(arr: np.ndarray, start: int, n: int) -> None:
            ptr = ctypes.cast(arr.ctypes.data + 4 * start, ctypes.POINTER(L.llama_token))
            rc = L.llama_decode(ctx, L.llama_batch_get_one(ptr, n))
            if rc != 0:
                decode_failure(rc)

        def prompt(arr: np.ndarray) -> None:
            # n_batch chunks, one synchronize at the end (llama-bench test_prompt)
            for start in range(0, len(arr), cfg.n_batch):
                decode(arr, start, min(cfg.n_batch, len(arr) - start))
            L.llama_synchronize(ctx)

        def gen(arr: np.ndarray) -> None:
            # one token per decode, synchronize after every token (llama-bench test_gen)
            for i in range(len(arr)):
                decode(arr, i, 1)
                L.llama_synchronize(ctx)

        def depth(stage: str) -> None:
            # llama-bench prefills the depth before every repetition; a filled 32k context takes minutes on a
            # CPU, so it is filled once and its state restored from a file for each repetition (the cache then
            # holds the same cells, positions and sliding-window contents as after the fill)
            L.llama_memory_clear(mem, False)
            if not cfg.n_depth:
                return
            key = (
                cfg.load_key(),
                L.llama_n_ctx(ctx),
                cfg.n_depth,
                cfg.type_k,
                cfg.type_v,
                cfg.flash_attn,
                cfg.n_ubatch,
            )
            if self.depth_restore(ctx, key, cfg.n_depth):
                return
            self.emit("stage", stage="fill")  # setup, like the load: outside the trial timeout (tuner.measure.runner)
            if fault == "slow_fill":
                time.sleep(float(os.environ.get("TUNER_SLOW_LOAD_S", "2")))
            t0 = time.perf_counter_ns()
            prompt(tokens(cfg.n_depth))
            self.timing["depth_fill_ms"].append((time.perf_counter_ns() - t0) / 1e6)
            self.depth_save(ctx, key)
            self.emit("stage", stage=stage)

        n_prompt = cfg.n_prompt if do_pp else 0
        n_gen = cfg.n_gen if do_tg else 0
        self.emit("stage", stage="warmup")
        if cfg.warmup:
            if n_prompt:
                prompt(tokens(n_prompt))
            if n_gen:
                L.llama_memory_clear(mem, False)
                gen(tokens(1))
        if fault == "hang_decode":
            time.sleep(10**6)
        pp, tg, ttft = [], [], []
        # an explicit -c with no room after the prompt: measure pp, skip TTFT rather than fail the trial
        ttft_room = L.llama_n_ctx(ctx) > cfg.n_depth + n_prompt
        if do_pp:
            self.emit("stage", stage="pp")
        for _ in range(cfg.repetitions if n_prompt else 0):
            depth("pp")
            arr, first = tokens(n_prompt), tokens(1)
            t0 = time.perf_counter_ns()
            prompt(arr)
            t1 = time.perf_counter_ns()
            if ttft_room:
                # TTFT: the prompt plus the decode that yields the first generated token (no sampling)
                decode(first, 0, 1)
                L.llama_synchronize(ctx)
                ttft.append((time.perf_counter_ns() - t0) / 1e6)
            pp.append(n_prompt * 1e9 / (t1 - t0))
        if do_tg:
            self.emit("stage", stage="tg")
        for _ in range(cfg.repetitions if n_gen else 0):
            depth("tg")
            arr = tokens(n_gen)
            t0 = time.perf_counter_ns()
            gen(arr)
            t1 = time.perf_counter_ns()
            tg.append(n_gen * 1e9 / (t1 - t0))
        return {"pp_samples": pp, "tg_samples": tg, "ttft_samples_ms": ttft}


def decode_failure(rc: int) -> None:
    """The trial's failure for llama_decode's return code rc (not 0)."""
    if rc in DECODE_OOM:
        raise TrialFailure("oom", f"llama_decode returned {rc}: {DECODE_OOM[rc]}")
    raise TrialFailure("error", f"llama_decode returned {rc}")


def _depth_folder() -> str:
    # the runner's folder for its workers' files: shared by them, removed with the runner (not with a worker,
    # so a SIGKILLed worker leaves nothing behind once the run ends)
    return os.environ.get("TUNER_WORKER_TMP") or os.environ.get("TMPDIR") or "/tmp"


def _depth_file(key: tuple) -> str:
    # the key names everything the filled cache depends on (model and load, n_ctx, depth, KV types, flash
    # attention, ubatch): the same key, the same cells whichever worker filled them
    digest = hashlib.sha1(repr(key).encode()).hexdigest()[:20]
    return os.path.join(_depth_folder(), f"depth-{digest}.state")


def _depth_files() -> list[str]:
    folder = _depth_folder()
    return [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("depth-") and f.endswith(".state")]


def effective_gpu_layers(requested: int, n_layer: int, offload: bool) -> int:
    """Layers llama.cpp really puts on a GPU: all (n_layer + output) for a negative or too large count."""
    if not offload:
        return 0
    return n_layer + 1 if requested < 0 else min(requested, n_layer + 1)


def ggml_type(name: str) -> int:
    return int(gguf.GGMLQuantizationType[name.upper()])


def classify_log(text: str, default: str, fallback: str) -> tuple[str, str]:
    """Outcome and one-line cause from llama.cpp's log of a failed step."""
    oom = oom_line(text)
    if oom:
        return "oom", oom
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
    return default, (errors[-1] if errors else fallback)[:300]


def resolved_flash_attn(lines: list[str], asked: str) -> str:
    """What `auto` became: llama.cpp logs "Flash Attention enabled/disabled" when it resolves it."""
    for ln in lines:
        if "Flash Attention enabled" in ln:
            return "on"
        if "Flash Attention disabled" in ln or "flash_attn is not compatible" in ln:
            return "off"
    return asked


def parse_overrides(lines: list[str]) -> list[str]:
    """ "tensor=buffer" for every tensor llama.cpp reports as overridden (its own log line)."""
    out = []
    for ln in lines:
        if "buffer type overridden to" in ln:
            name = ln.split("tensor ", 1)[1].split(" ", 1)[0]
            out.append(f"{name}={ln.rsplit(' ', 1)[1].strip()}")
    return out


def inject_early(fault: str) -> None:
    """Real faults for `tuner selftest` and the tests: the process really dies or really hangs."""
    if fault == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "segv":
        ctypes.string_at(0)
    elif fault == "abort":
        os.abort()
    elif fault == "exit":
        os._exit(3)


def dispatch(worker: Worker, job: dict) -> dict:
    """A trial, or another kind of job that runs in a worker (its code lives in its own module)."""
    if job.get("kind") == "quality":
        return run_job(worker, job)
    return worker.run(job)


def main() -> None:
    set_pdeathsig()
    out = os.fdopen(int(sys.argv[1]), "w")
    worker = Worker(out)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        if job.get("mem_limit"):
            resource.setrlimit(resource.RLIMIT_DATA, (int(job["mem_limit"]), resource.RLIM_INFINITY))
        try:
            res = {"outcome": "ok", **dispatch(worker, job)}
        except TrialFailure as e:
            res = {"outcome": e.outcome, "cause": e.cause}
        except MemoryError:
            res = {"outcome": "oom", "cause": "MemoryError in the worker"}
        except Exception as e:  # noqa: BLE001 - any other error is reported, not raised
            res = {"outcome": "error", "cause": f"{type(e).__name__}: {e}"}
        if res["outcome"] != "ok":
            # a failed job may leave llama.cpp in a bad state: report, then exit so the next job starts clean
            res.setdefault("peak_rss_bytes", (status_kib("VmHWM") or 0) * 1024)
            worker.emit("result", **res)
            break
        worker.emit("result", **res)
    out.close()


if __name__ == "__main__":
    main()

"""The one trial record type that flows worker → runner → study → Parquet → report/compare.

`TrialConfig` is what is measured (llama.cpp model/context parameters plus the test shape, named as in
llama-bench). `TrialRecord` is one measured trial: the config, the outcome, every metric with its
repetition samples, and the facts needed to compare trials across machines and builds.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import re
import statistics
from dataclasses import dataclass, field, fields
from typing import Any

# Outcomes a trial can have. `skipped` never ran (dominated by a known failure or predicted not to fit);
# `interrupted` was running when the parent died or was stopped.
OUTCOMES = ("ok", "oom", "crash", "timeout", "swap", "load_error", "error", "skipped", "interrupted")
FAILED = frozenset(OUTCOMES) - {"ok", "skipped"}
# Records measured beside the search: drift anchors and the confirmation of the winner.
SIDE_STATES = ("anchor", "confirm")

KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "iq4_nl", "q4_1", "q4_0")
# Bytes per element, used to order KV types ("same or larger KV type" in dominance checks).
KV_TYPE_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q5_1": 24 / 32,
    "q5_0": 22 / 32,
    "iq4_nl": 18 / 32,
    "q4_1": 20 / 32,
    "q4_0": 18 / 32,
}
FLASH_ATTN = ("auto", "on", "off")
# quantized V needs flash attention in llama.cpp (a context with fa off and quantized V fails to create)
FULL_PRECISION_KV = {"f32", "f16", "bf16"}
# What llama.cpp, ggml, CUDA, libstdc++ and Python print when memory runs out.
OOM_MARKERS = (
    "out of memory",
    "failed to allocate",
    "insufficient memory",
    "cudamalloc failed",
    "std::bad_alloc",
    "cannot allocate memory",
    "memoryerror",
    "unable to allocate",
    "allocation failed",
)


def oom_line(text: str) -> str | None:
    """The last log line that says memory ran out, if any; when it does not say on which device (llama.cpp's
    "failed to allocate compute pp buffers"), the buffer an earlier line names is added: on a rig of several
    devices, which one ran out decides what to try next."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if any(m in lines[i].lower() for m in OOM_MARKERS):
            line = lines[i].strip()[:300]
            if not BUFFER_OF_SIZE.search(line) and " buffer" not in line.replace("buffers", ""):
                for prev in reversed(lines[max(0, i - 20) : i]):
                    if m := BUFFER_OF_SIZE.search(prev):
                        return f"{line} ({m.group(1)}: {m.group(2)} bytes)"
            return line
    return None


# llama.cpp's allocator naming the buffer type it could not fill: "failed to allocate RPC0[127.0.0.1:50052]
# buffer of size 8388608", "... CUDA0 buffer of size ..."
BUFFER_OF_SIZE = re.compile(r"allocate (\S+) buffer of size (\d+)")
SPLIT_MODES = ("none", "layer", "row")
# Finer than --n-cpu-moe: part of the FFN of the layer after the --n-cpu-moe block in host memory too, the partial
# layer llama.cpp's --fit makes (common/fit.cpp 18-24 and 493-530, LAYER_FRACTION_*): "down" keeps attention, up and
# gate on the device (fit's GATE), "gate_down" attention and up (UP), "ffn" attention only (ATTN).
MOE_PARTS = ("none", "down", "gate_down", "ffn")
# share of a MoE layer's experts each part moves (up, gate and down are equal in size): orders the hybrid region
MOE_PART_SHARE = {"none": 0.0, "down": 1 / 3, "gate_down": 2 / 3, "ffn": 1.0}


def moe_part_pattern(il: int, part: str) -> str:
    """The `-ot` regex of the tensors of layer `il` that `part` keeps in host memory (fit.cpp's own patterns)."""
    p = f"blk\\.{il}\\."
    if part == "ffn":
        return p + "ffn_(gate|up|gate_up|down).*"
    if part == "gate_down":
        return p + "ffn_(gate|gate_up|down).*"
    if part == "down":
        return p + "ffn_down.*"
    raise ValueError(f"no tensor pattern for moe_part {part!r} (one of {', '.join(MOE_PARTS[1:])})")


def parse_tensor_split(text: str) -> list[float]:
    """A tensor split, "3/1" (llama-bench's spelling) or "3,1" (llama-server's) → [3.0, 1.0]; "" → [].
    Raises ValueError unless every share is a non-negative number and one is above 0."""
    text = (text or "").strip()
    if not text:
        return []
    try:
        parts = [float(x) for x in re.split(r"[,/]", text)]
    except ValueError:
        raise ValueError("numbers expected, e.g. 3/1") from None
    if any(p < 0 or not math.isfinite(p) for p in parts) or not any(parts):
        raise ValueError("shares must be non-negative and not all 0")
    return parts


@dataclass(frozen=True)
class Param:
    """One llama.cpp parameter as the commands spell it (the CLI builds its options from this table)."""

    name: str  # TrialConfig field
    flags: tuple[str, ...]  # llama-bench / llama.cpp spelling
    type: type | tuple[str, ...]  # int, str, or the choices
    help: str
    search_flags: tuple[str, ...] = ()  # extra spellings for `tuner search` (--ngl 0:61, --ctx, --threads)


# The llama.cpp parameters a trial can set. bench takes one value each; search takes a value, a list or a range.
PARAMS = (
    Param(
        "n_gpu_layers",
        ("-ngl", "--n-gpu-layers"),
        int,
        "layers on the GPU; -1, 99 or 999 = all (recorded as the real count)",
        ("--ngl",),
    ),
    Param(
        "n_ctx", ("-c", "--ctx-size"), int, "context size (0 = n_prompt + n_gen + n_depth, as llama-bench)", ("--ctx",)
    ),
    Param("n_threads", ("-t", "--threads"), int, "generation threads (default: physical cores)"),
    Param("n_threads_batch", ("-tb", "--threads-batch"), int, "prompt/batch threads (default: = threads)"),
    Param("n_batch", ("-b", "--batch-size"), int, "logical batch size"),
    Param("n_ubatch", ("-ub", "--ubatch-size"), int, "physical batch size"),
    Param("flash_attn", ("-fa", "--flash-attn"), FLASH_ATTN, "flash attention"),
    Param("type_k", ("-ctk", "--cache-type-k"), KV_TYPES, "KV cache type for K"),
    Param("type_v", ("-ctv", "--cache-type-v"), KV_TYPES, "KV cache type for V"),
    Param("n_cpu_moe", ("-ncmoe", "--n-cpu-moe"), int, "keep the experts of the first N layers in host RAM"),
    Param(
        "moe_part",
        ("--moe-part",),
        MOE_PARTS,
        "of the layer after the --n-cpu-moe block, also keep these FFN tensors in host RAM (--fit's partial layer)",
    ),
    Param("split_mode", ("-sm", "--split-mode"), SPLIT_MODES, "how to split across GPUs"),
    Param("main_gpu", ("-mg", "--main-gpu"), int, "GPU for the whole model with split-mode none"),
    Param(
        "tensor_split",
        ("-ts", "--tensor-split"),
        str,
        "share of the layers per GPU, e.g. 3/1 (llama-bench's spelling; search: a list 1/1,3/1)",
    ),
    Param(
        "n_seq",
        ("-np", "--parallel"),
        int,
        "N sequences of the test shape decoded together, as llama-batched-bench -npl N and llama-server -np N "
        "(aggregate and per-stream t/s; unset: one request, as llama-bench)",
    ),
    Param(
        "kv_unified",
        ("-kvu", "--kv-unified"),
        bool,
        "with --parallel: one KV cache shared by the sequences (llama-server -kvu) instead of n_ctx/N cells each",
    ),
)


@dataclass
class TrialConfig:
    """One llama.cpp configuration plus the llama-bench style test shape."""

    model: str
    n_gpu_layers: int = 99  # -1, 99, 999: all layers, as in llama.cpp; the record keeps the effective count
    split_mode: str = "layer"
    main_gpu: int = 0
    tensor_split: str = ""  # "3,1" proportions per GPU, empty = llama.cpp decides
    use_mmap: bool = True
    use_mlock: bool = False
    n_ctx: int = 0  # 0 = n_prompt + n_gen + n_depth, as llama-bench sizes its contexts
    n_batch: int = 2048
    n_ubatch: int = 512
    n_threads: int = 0  # 0 = physical cores, as llama-bench
    n_threads_batch: int = 0  # 0 = same as n_threads
    flash_attn: str = "auto"
    type_k: str = "f16"
    type_v: str = "f16"
    n_cpu_moe: int = 0  # experts of the first N layers stay in host memory (llama.cpp --n-cpu-moe)
    cpu_moe: bool = False  # all routed experts in host memory (llama.cpp --cpu-moe)
    moe_part: str = "none"  # FFN tensors of layer n_cpu_moe in host memory too (MOE_PARTS; llama-server: one -ot)
    overrides: tuple[str, ...] = ()  # raw -ot PATTERN=BUFFER entries
    rpc: str = ""  # llama.cpp RPC servers whose devices join the GPUs: "host:port,host:port" (llama-server --rpc)
    # parallel sequences (llama-server -np, llama-batched-bench -npl): 0 = one request measured as llama-bench
    # (pp and tg as separate tests); N >= 1 = N sequences decoded together as llama-batched-bench does
    n_seq: int = 0
    kv_unified: bool = False  # one KV cache for all sequences (llama-server -kvu), else n_ctx / n_seq cells each
    n_prompt: int = 512
    n_gen: int = 128
    n_depth: int = 0
    repetitions: int = 5
    warmup: bool = True

    # Parameters that change what is loaded; a worker may keep a model loaded across trials that agree on these.
    LOAD_KEYS = (
        "model",
        "n_gpu_layers",
        "split_mode",
        "main_gpu",
        "tensor_split",
        "use_mmap",
        "use_mlock",
        "n_cpu_moe",
        "cpu_moe",
        "moe_part",
        "overrides",
        "rpc",
    )
    # How a config is measured, not what: never part of its key.
    NOT_KEY = ("repetitions", "warmup")

    def __post_init__(self) -> None:
        self.overrides = tuple(self.overrides or ())

    def load_key(self) -> tuple:
        return tuple(getattr(self, k) for k in self.LOAD_KEYS)

    def experts_in_host(self) -> float:
        """How many layers' routed experts stay in host memory (--cpu-moe: all), the partial layer counted by its
        share: orders configs along the hybrid region (more host, less device)."""
        return float("inf") if self.cpu_moe else self.n_cpu_moe + MOE_PART_SHARE.get(self.moe_part, 0.0)

    def effective_ctx(self) -> int:
        """The context's cells: n_ctx, or what the test needs (with --parallel: every sequence's share)."""
        return self.n_ctx or self.streams() * self.seq_need()

    def streams(self) -> int:
        """Sequences decoded together (1 without --parallel)."""
        return max(self.n_seq, 1)

    def seq_need(self) -> int:
        """Cells one sequence of the test shape fills."""
        return self.n_depth + self.n_prompt + self.n_gen

    def seq_cells(self) -> int:
        """Cells each sequence may use, as llama.cpp splits the context (llama_context: n_ctx padded to 256,
        then n_ctx / n_seq_max padded to 256 per sequence; a unified cache lets one sequence use all of it)."""
        total = _pad256(self.effective_ctx())
        if self.kv_unified or self.n_seq <= 1:
            return total
        return _pad256(total // self.n_seq)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["overrides"] = list(self.overrides)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config parameter(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def params(self) -> dict[str, Any]:
        """Parameters without the model path (what a search dimension or a comparison key sees)."""
        d = self.to_dict()
        d.pop("model")
        return d

    def key(self, ignore: tuple[str, ...] = ()) -> tuple:
        """What makes two trials the same config, so that they pool: every parameter and the test shape (the
        model path included) as (name, value) pairs sorted by name, without how the config was measured (NOT_KEY)
        and without the names in `ignore` (tuner compare --ignore).

        A comparison across result sets or rigs, where paths differ, ignores "model" and puts its own name for
        the file in front: its content hash (tuner.report.compare), its name (tuner.report.charts).
        """
        return tuple(
            (k, tuple(v) if isinstance(v, list) else v)
            for k, v in sorted(self.to_dict().items())
            if k not in self.NOT_KEY and k not in ignore
        )


def _pad256(n: int) -> int:
    return -(-max(n, 1) // 256) * 256


def invalid_reason(cfg: TrialConfig) -> str | None:
    """Configs llama.cpp rejects outright: not worth a trial, recorded as skipped."""
    if cfg.type_v not in FULL_PRECISION_KV and cfg.flash_attn == "off":
        return f"quantized V cache ({cfg.type_v}) needs flash attention; flash_attn=off"
    if cfg.n_seq < 0:
        return f"--parallel must be at least 1, got {cfg.n_seq}"
    if cfg.n_seq:
        need = cfg.seq_need()
        if cfg.kv_unified and _pad256(cfg.effective_ctx()) < cfg.n_seq * need:
            return (
                f"--parallel {cfg.n_seq} with a unified KV cache of {_pad256(cfg.effective_ctx())} cells cannot hold "
                f"{cfg.n_seq} sequences of {need} (n_depth + n_prompt + n_gen)"
            )
        if cfg.seq_cells() < need:
            return (
                f"--parallel {cfg.n_seq} leaves {cfg.seq_cells()} KV cells per sequence (n_ctx {cfg.effective_ctx()} / "
                f"{cfg.n_seq}), fewer than the test needs (n_depth + n_prompt + n_gen = {need}); raise --ctx or add "
                "--kv-unified"
            )
        return None
    need = cfg.n_depth + max(cfg.n_prompt, cfg.n_gen)
    if cfg.n_ctx and cfg.n_ctx < need:
        return f"n_ctx {cfg.n_ctx} is smaller than the test needs (n_depth + max(n_prompt, n_gen) = {need})"
    return None


def summarize(samples: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n-1), as llama-bench reports avg_ts / stddev_ts."""
    if not samples:
        return None, None
    mean = statistics.fmean(samples)
    sd = statistics.stdev(samples) if len(samples) > 1 else 0.0
    return mean, sd


@dataclass
class TrialRecord:
    """One trial: config, outcome and every measured figure. Flattens to one Parquet row."""

    config: TrialConfig
    outcome: str = "error"
    cause: str = ""  # one line: why it failed (or was skipped)
    stderr_tail: str = ""
    # metrics (t/s per repetition, as llama-bench's samples_ts)
    pp_samples: list[float] = field(default_factory=list)
    tg_samples: list[float] = field(default_factory=list)
    ttft_samples_ms: list[float] = field(default_factory=list)
    # --parallel N (config.n_seq): pp/tg samples above are the aggregate of the N sequences (llama-batched-bench's
    # S_PP, S_TG), these are one sequence's t/s per repetition, TTFT above is the mean over the sequences per
    # repetition and ttft_stream_ms each sequence's TTFT (mean over the repetitions, in the order they start)
    pp_stream_samples: list[float] = field(default_factory=list)
    tg_stream_samples: list[float] = field(default_factory=list)
    ttft_stream_ms: list[float] = field(default_factory=list)
    load_ms: float | None = None
    peak_rss_bytes: int | None = None
    peak_vram_bytes: int | None = None
    peak_vram_by_gpu: list[int] = field(default_factory=list)
    # where the VRAM figures come from: "process" (NVML's per-process figure for the worker), "device" (the
    # device's used memory over its level when the worker started: true only while nothing else uses the GPU;
    # a container's NVML lists host PIDs, so the worker's own is never found), "none" (unknown: null, never 0)
    vram_by: str = ""
    vram_device_by_gpu: list[int] = field(default_factory=list)  # the device-wide figure per GPU, whichever vram_by
    model_loaded: bool | None = None  # this trial loaded the model (False: a reused worker had it loaded)
    # a depth (-d) is filled once per run and context settings, then restored from a state file (the runner's,
    # shared by its workers) before each repetition: the fill this trial paid (None: restored from an earlier
    # trial's) and the median restore
    depth_fill_ms: float | None = None
    depth_restore_ms: float | None = None
    page_cache_pct: float | None = None  # share of the model file in the page cache just before that load
    swap_in_bytes: int | None = None
    mem_limit_bytes: int | None = None  # --mem-limit, when one applied
    mem_limit_by: str = ""  # how it was enforced (tuner.measure.memlimit: a cgroup + RLIMIT_DATA, or RLIMIT_DATA only)
    wall_s: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    n_gpu_layers_effective: int | None = None
    flash_attn_resolved: str = ""  # what flash_attn=auto became in llama.cpp (on/off)
    # model facts
    model_size_bytes: int | None = None
    model_arch: str = ""
    model_name: str = ""
    model_n_params: int | None = None
    model_n_layer: int | None = None
    model_file_type: str = ""
    model_hash: str = ""
    # hardware and build fingerprint
    hw: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    hw_fingerprint: str = ""
    build_fingerprint: str = ""
    overrides_applied: list[str] = field(default_factory=list)  # "tensor=buffer" as llama.cpp reported them
    # llama.cpp's own buffer sizes per buffer type, from its log ({"CPU": {"model": b, "kv": b, "compute": b},
    # "RPC0[127.0.0.1:50052]": {...}}): what it allocated on each device, beside the measured peaks above
    buffers: dict[str, dict[str, int]] = field(default_factory=dict)
    started_utc: str = ""
    finished_utc: str = ""
    # filled by the study (empty for tuner bench)
    study: str = ""
    trial_number: int | None = None
    state: str = ""
    constraint: list[float] = field(default_factory=list)
    drift: bool = False
    skipped_by: int | None = None
    baseline: str = ""  # which enqueued baseline this trial is ("llama.cpp defaults", "heuristic"), if any
    confirm_round: int | None = None  # a confirmation run (state "confirm"): its round
    predicted_ram_bytes: int | None = None
    predicted_vram_bytes: int | None = None
    tg_roofline_ts: float | None = None
    # the model file's quality (with this config's KV-cache types) when the search measured it (tuner.quality)
    kld_mean: float | None = None
    kld_mean_err: float | None = None
    same_top_pct: float | None = None
    ppl_ratio: float | None = None
    quality_ok: bool | None = None  # within the search's quality budget
    quality_basis: str = ""  # what the figures were measured against (reference, text, ctx, top-k): compare pairs

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def searched(self) -> bool:
        """A trial the sampler chose, not a re-measurement beside the search (drift anchor, confirmation)."""
        return self.state not in SIDE_STATES

    @property
    def measured_config(self) -> bool:
        """A search trial that counts as its config measured (an interrupted one measured nothing: run it again)."""
        return self.searched and self.outcome != "interrupted"

    def samples(self, name: str) -> list[float]:
        """One metric's value per repetition: tg and pp in t/s (with --parallel: all sequences together), ttft in
        ms; tg_stream and pp_stream: one sequence's t/s (without --parallel: tg, pp). The record's own list."""
        if name in ("pp_stream", "tg_stream"):
            own = self.pp_stream_samples if name == "pp_stream" else self.tg_stream_samples
            return own if own or self.config.n_seq else self.samples(name[:2])
        return {"pp": self.pp_samples, "tg": self.tg_samples, "ttft": self.ttft_samples_ms}[name]

    def metric(self, name: str) -> tuple[float | None, float | None]:
        """Mean and sd of samples(name)."""
        return summarize(self.samples(name))

    def objective(self, name: str) -> float | None:
        """What a search maximizes (tg, pp, mixed) or minimizes (ttft). mixed: end-to-end tokens/s of one
        request of the test shape, prompt then generation (with --parallel: of the N requests together, as
        llama-batched-bench's S). *_stream: the same for one of the N sequences."""
        if name in ("mixed", "mixed_stream"):
            sfx = name[5:]
            tg, pp, c = self.metric("tg" + sfx)[0], self.metric("pp" + sfx)[0], self.config
            if tg and pp:
                return (c.n_prompt + c.n_gen) / (c.n_prompt / pp + c.n_gen / tg)
            return tg or pp
        return self.metric(name)[0]

    def to_row(self) -> dict[str, Any]:
        """Flat dict for one Parquet row: config params become columns, metrics get mean/sd columns."""
        row: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "config":
                continue
            v = getattr(self, f.name)
            row[f.name] = json.dumps(v, sort_keys=True) if isinstance(v, dict) else v
        cfg = self.config.to_dict()
        cfg["overrides"] = list(cfg["overrides"])
        row.update(cfg)
        for name in ("pp", "tg", "ttft") + (("pp_stream", "tg_stream") if self.config.n_seq else ()):
            mean, sd = self.metric(name)
            unit = "ms" if name == "ttft" else "ts"
            row[f"{name}_{unit}_mean"] = mean
            row[f"{name}_{unit}_sd"] = sd
        # the bound is one sequence's: N sequences together read the weights once for N tokens
        tg_one = self.metric("tg_stream")[0]
        row["tg_roofline_pct"] = 100.0 * tg_one / self.tg_roofline_ts if tg_one and self.tg_roofline_ts else None
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "TrialRecord":
        cfg_names = {f.name for f in fields(TrialConfig)}
        rec_names = {f.name for f in fields(cls)} - {"config"}
        dict_fields = {f.name for f in fields(cls) if str(f.type).startswith("dict")}
        cfg = {k: _plain(row[k]) for k in cfg_names if k in row and not _missing(row[k])}
        # a column that is missing in some rows (an older file appended to) comes back as floats or objects
        for f in fields(TrialConfig):
            if f.name in cfg and f.type in ("int", "bool") and not isinstance(cfg[f.name], str):
                cfg[f.name] = int(cfg[f.name]) if f.type == "int" else bool(cfg[f.name])
        if "overrides" in cfg:
            cfg["overrides"] = tuple(cfg["overrides"])
        rec = {}
        for k in rec_names:
            if k not in row or _missing(row[k]):
                continue
            v = _plain(row[k])
            if k in dict_fields and isinstance(v, str):  # to_row wrote dicts as JSON
                v = json.loads(v) if v else {}
            rec[k] = v
        return cls(config=TrialConfig(**cfg), **rec)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["config"] = self.config.to_dict()
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "TrialRecord":
        d = json.loads(text)
        d["config"] = TrialConfig.from_dict(d["config"])
        return cls(**d)


def _missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return isinstance(v, float) and math.isnan(v)
    except TypeError:
        return False


def _plain(v: Any) -> Any:
    """Parquet gives numpy scalars and arrays; turn them back into Python values."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")

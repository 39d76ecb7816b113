"""The memory planner: what a config needs in host RAM and VRAM, predicted from GGUF metadata alone.

Terms of a prediction (all bytes):
- weights: every tensor's exact size from the GGUF header, placed as llama.cpp places it: token embeddings on
  the host, the last `n_gpu_layers` blocks (and the output layer when all n_layer + 1 are offloaded) on the
  GPU, routed experts of the first `n_cpu_moe` layers (or all, `cpu_moe`, or any `-ot ...=CPU` match) on the
  host. On the CPU, llama.cpp repacks some types into a CPU_REPACK buffer; with mmap the file pages it read to
  repack stay resident too, so those tensors count twice (measured: dense q4_0, mmap on/off differ by the
  repacked bytes).
- KV cache: n_ctx cells × (K + V row bytes) per layer, per the layer's KV heads and head dims (GQA aware; MLA
  files store one latent "head" of kv_lora_rank + rope dims, so the same formula holds), sliding-window layers
  hold only n_swa + n_ubatch cells. KV lives where its layer lives.
- compute: llama.cpp's graph buffers. The raw term below follows the graph's largest live tensors for the
  tokens that really go through one ubatch; `Calibration` scales it and learns the process baseline (Python,
  numpy and the llama.cpp libraries: tens of MB of RSS; the CUDA context on a GPU) from measured trials. An RPC
  device's own part of the graph: tuner.plan.compute.
"""

from __future__ import annotations

import dataclasses
import math
import platform
from dataclasses import dataclass, field
from functools import lru_cache

import gguf
import numpy as np

from tuner.model.meta import EXPS_RE, ModelInfo, read_model
from tuner.plan.compute import device_buffers, no_alloc_excess
from tuner.plan.placement import gpu_layer_start, layer_devices, split_fractions, tensor_devices, tied_output_copy
from tuner.record import KV_TYPE_BYTES, TrialConfig, TrialRecord
from tuner.units import fmt_size

MiB = 1 << 20
# The process itself (Python, numpy, the llama.cpp libraries, threads, graph metadata), measured on the reference
# rig with llama-cpp-python 0.3.36: an idle worker holds 49.4 MiB; after a minimal trial (1.5 MiB model, 4.25 MiB
# KV, 3.2 MiB compute buffer) 63.6 MiB, i.e. 54.7 MiB besides its buffers. Calibration replaces it per rig.
DEFAULT_BASELINE_RAM = 55 * MiB
DEFAULT_COMPUTE_SCALE = 1.0
# A CUDA context plus cuBLAS workspace, per process, as NVML reports it; calibrated from trials with VRAM.
DEFAULT_BASELINE_VRAM = 400 * MiB
DEFAULT_HEADROOM = 0.05  # keep 5 % of each memory free
# llama.cpp's vocabulary in memory (token strings, the token -> id map, the piece cache), per token, at its
# peak during load: measured 197 B/token with Gemma 3's 262k-token vocabulary (48 MiB; vocab_only load, VmHWM)
VOCAB_BYTES_PER_TOKEN = 192
KV_PAD = 256  # llama.cpp pads the KV cache size to 256 cells

# Tensor types llama.cpp's CPU backend repacks (CPU_REPACK buffer), by CPU family. Measured on x86-64 with
# AVX2 (tiny models in every type: q4_0, q4_K, q2_K and iq4_nl got a CPU_REPACK buffer, q8_0/q5_K/q6_K... not).
REPACK_X86 = frozenset({"Q4_0", "Q4_K", "Q2_K", "IQ4_NL"})
REPACK_ARM = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "Q8_0"})

# Sliding-window layers, as llama.cpp's load_swa_pattern sets them: (period, dense_first) per architecture, used
# when the GGUF has no attention.sliding_window_pattern. A period n makes il % n < n - 1 sliding (dense_first:
# il % n != 0). "all": every attention layer slides (lfm2 with a window).
SWA_PATTERN = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "cohere2": (4, False),
    "llama4": (4, False),
    "gpt-oss": (2, False),
    "exaone4": (4, False),
    "olmo2": (4, False),
    "smallthinker": (4, True),
    "afmoe": (4, False),
    "lfm2": "all",
    "lfm2moe": "all",
}
# Architectures whose memory layout the planner models: checked against llama.cpp by tuner.plan.oracle (first line),
# or built from the same standard attention/FFN blocks (the rest). Anything else: weights only, with a note.
ORACLE_CHECKED = frozenset({"deepseek2", "qwen3moe", "gpt-oss", "gemma3", "llama", "glm4moe", "lfm2"})
MODELLED = ORACLE_CHECKED | frozenset(
    {
        "qwen2",
        "qwen2moe",
        "qwen3",
        "gemma2",
        "mistral3",
        "phi3",
        "granite",
        "granitemoe",
        "olmo2",
        "olmoe",
        "glm4",
        "deepseek",
        "mixtral",
        "smollm3",
        "exaone4",
        "cohere2",
        "command-r",
        "starcoder2",
        "lfm2moe",
        "ernie4_5",
        "ernie4_5-moe",
        "seed_oss",
        "apertus",
        "hunyuan-moe",
        "hunyuan-dense",
        "dots1",
        "arcee",
    }
)
# Recurrent-state layouts llama.cpp sizes from these keys (llama_hparams::n_embd_r / n_embd_s).
RECURRENT_ALL = frozenset({"mamba", "mamba2"})
HYBRID_SSM = frozenset({"granitehybrid", "nemotron_h", "jamba", "falcon-h1"})


def unmodelled_note(info: ModelInfo) -> str:
    """ "" when the planner models this architecture's KV cache and compute buffers, else the note to show."""
    if info.arch in MODELLED or info.arch in RECURRENT_ALL or info.arch in HYBRID_SSM:
        return ""
    return (
        f"unknown architecture {info.arch}: KV and compute not modelled "
        f"(weights only, from tensor sizes: {_gib(sum(t.n_bytes for t in info.tensors))})"
    )


@lru_cache(maxsize=1)
def repack_types() -> frozenset[str]:
    """Which weight types this machine's CPU backend repacks (empty when no SIMD path exists)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return REPACK_ARM
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return REPACK_X86 if " avx2" in flags else frozenset()


def type_bytes(type_name: str, n_elements: int) -> int:
    """Bytes of n_elements in a ggml type (block size and block bytes from the gguf package)."""
    qt = gguf.GGMLQuantizationType[type_name.upper()]
    blck, size = gguf.GGML_QUANT_SIZES[qt]
    return n_elements // blck * size


def kv_row_bytes(type_name: str, n: int) -> int:
    if type_name.upper() in gguf.GGMLQuantizationType.__members__:
        return type_bytes(type_name, n)
    return math.ceil(n * KV_TYPE_BYTES[type_name])


@dataclass
class Calibration:
    """The rig-specific terms of a prediction, learned from measured trials (see `from_records`)."""

    baseline_ram: int = DEFAULT_BASELINE_RAM
    compute_scale: float = DEFAULT_COMPUTE_SCALE
    baseline_vram: int = DEFAULT_BASELINE_VRAM
    compute_scale_gpu: float = DEFAULT_COMPUTE_SCALE
    n_ram: int = 0  # trials the host terms were learned from (0 = defaults)
    n_vram: int = 0
    worst_ram_error: float | None = None  # largest |predicted/measured - 1| over those trials

    @classmethod
    def from_records(cls, records: list[TrialRecord], infos: dict[str, ModelInfo] | None = None) -> "Calibration":
        """Fit baseline + scale × raw compute to (measured peak - weights - KV) over completed trials.

        Least squares on relative error (each row divided by the measured peak), so small and big models
        count alike; the scale is kept within [0.25, 4] and the baseline non-negative. Trials whose model
        file is gone are skipped. With one usable trial only the baseline is learned.
        """
        from scipy.optimize import lsq_linear  # noqa: PLC0415 - scipy.optimize is heavy: only a calibration fit needs it

        infos = dict(infos or {})
        ram_rows, vram_rows = [], []
        for r in records:
            if r.outcome != "ok" or not r.peak_rss_bytes:
                continue
            info = infos.get(r.config.model)
            if info is None:
                try:
                    info = infos[r.config.model] = read_model(r.config.model)
                except (OSError, ValueError):
                    continue
            gpu = bool(r.build.get("gpu_offload")) if r.build else False
            raw = predict(r.config, info, RAW, gpu_offload=gpu)
            ram_rows.append((r.peak_rss_bytes, raw.ram_bytes - raw.compute_host, raw.compute_host))
            if gpu and r.peak_vram_bytes:
                vram_rows.append((r.peak_vram_bytes, raw.vram_bytes - raw.compute_gpu, raw.compute_gpu))
        cal = cls()

        def fit(rows, base_default, scale_default):
            if not rows:
                return base_default, scale_default
            y, fixed, x = (np.array(c, dtype=float) for c in zip(*rows))
            resid = y - fixed
            if len(rows) == 1 or np.ptp(x) < 0.02 * max(np.mean(x), 1.0):
                b = float(np.median(resid - scale_default * x))
                return max(b, 0.0), scale_default
            a = np.stack([np.ones_like(x), x], axis=1) / y[:, None]
            res = lsq_linear(a, resid / y, bounds=([0.0, 0.25], [np.inf, 4.0]))
            return float(res.x[0]), float(res.x[1])

        b, s = fit(ram_rows, DEFAULT_BASELINE_RAM, DEFAULT_COMPUTE_SCALE)
        cal.baseline_ram, cal.compute_scale, cal.n_ram = int(b), s, len(ram_rows)
        b, s = fit(vram_rows, DEFAULT_BASELINE_VRAM, DEFAULT_COMPUTE_SCALE)
        cal.baseline_vram, cal.compute_scale_gpu, cal.n_vram = int(b), s, len(vram_rows)
        if ram_rows:
            errs = [(fixed + cal.baseline_ram + cal.compute_scale * x) / y - 1 for y, fixed, x in ram_rows]
            cal.worst_ram_error = max(errs, key=abs)
        return cal

    @classmethod
    def from_store(cls, paths, hw_fingerprint: str | None = None) -> "Calibration":
        """Learn from Parquet result files (missing files are skipped), only trials of this rig."""
        from tuner.measure import store  # noqa: PLC0415 - pandas and pyarrow load only when a calibration reads trials

        recs = []
        for p in paths:
            try:
                recs += store.records(store.read(p, missing_ok=True)) if store.resolve(p).exists() else []
            except store.StoreError:
                continue
        if hw_fingerprint:
            recs = [r for r in recs if r.hw_fingerprint == hw_fingerprint]
        return cls.from_records(recs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Zero baseline, unit scale: the raw terms a calibration fits against.
RAW = Calibration(baseline_ram=0, compute_scale=1.0, baseline_vram=0, compute_scale_gpu=1.0)


@dataclass
class Prediction:
    ram_bytes: int  # predicted peak RSS of the worker
    vram_bytes: int  # predicted peak VRAM (0 without offload)
    weights_host: int  # resident host bytes for weights (file pages + repacked copies)
    weights_gpu: int
    kv_bytes: int
    compute_bytes: int
    kv_host: int = 0
    kv_gpu: int = 0
    compute_host: int = 0
    compute_gpu: int = 0
    baseline_ram: int = 0
    baseline_vram: int = 0
    repack_bytes: int = 0
    reclaimable_bytes: int = 0  # ram_bytes - resident_bytes: mmap'd file pages the kernel may drop (never swapped)
    weights_total: int = 0
    n_gpu_layers: int = 0  # effective layers on the GPU
    resident_bytes: int = 0  # anonymous host memory: what must fit in RAM (repacked weights, KV, buffers, process)
    file_bytes: int = 0  # mmap'd weight pages on the host: resident while there is room, else re-read from disk
    compute_reserved: int = 0  # the host compute buffer llama.cpp reserves (a full ubatch, every token an output)
    output_bytes: int = 0  # logits buffer and the vocabulary held by llama.cpp
    note: str = ""  # set when the architecture's KV/compute are not modelled (unknown architecture)
    layers_host: list[int] = field(default_factory=list, repr=False)
    vram_by_device: list[int] = field(default_factory=list)  # per GPU, in NVML's order (sums to vram_bytes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("layers_host")
        return d


def n_attn_layers(info: ModelInfo) -> int:
    """Blocks of the main context (NextN/MTP blocks at the end have their own context and cache)."""
    return max(info.n_layer - info.n_layer_nextn, 0)


def is_swa(info: ModelInfo, il: int) -> bool:
    if not info.sliding_window:
        return False
    pat = info.swa_pattern
    if isinstance(pat, list):
        return bool(pat[il]) if il < len(pat) else False
    rule = SWA_PATTERN.get(info.arch)
    if rule == "all":
        return True
    n, dense_first = (int(pat), False) if pat else (rule or (0, False))
    if not n:
        return False
    return il % n != 0 if dense_first else il % n < n - 1


def is_recurrent(info: ModelInfo, il: int) -> bool:
    """Layers that keep a recurrent state instead of a KV cache (all of a Mamba; head_count_kv 0 in a hybrid)."""
    if info.arch in RECURRENT_ALL:
        return True
    if info.shortconv_l_cache or info.arch in HYBRID_SSM:
        return info.head_kv(il) == 0
    return False


def kv_size(n_ctx: int) -> int:
    """Cells of the (non-SWA) KV cache: llama.cpp pads the context to 256."""
    return pad(max(n_ctx, 1), KV_PAD)


def kv_streams(cfg: TrialConfig) -> int:
    """KV streams llama.cpp allocates: one per sequence (--parallel N without a unified cache), else one."""
    return 1 if cfg.kv_unified or cfg.n_seq <= 1 else cfg.n_seq


def kv_cells(cfg: TrialConfig, info: ModelInfo, il: int) -> int:
    """Cells of layer il's cache per stream: the padded context (with --parallel N and no unified cache: its
    n_ctx / N share, TrialConfig.seq_cells), or for a sliding-window layer the window plus one ubatch
    (llama_kv_cache_iswa: pad(min(size, n_swa x (N if unified else 1) + n_ubatch), 256)); 0 for a layer without
    KV. Every stream holds this many (`kv_streams`)."""
    if il >= n_attn_layers(info) or info.head_kv(il) <= 0 or is_recurrent(info, il):
        return 0
    size = cfg.seq_cells()
    if is_swa(info, il):
        windows = cfg.streams() if cfg.kv_unified else 1
        return pad(min(size, info.sliding_window * windows + cfg.n_ubatch), KV_PAD)
    return size


def v_transposed(cfg: TrialConfig) -> bool:
    """Without flash attention llama.cpp stores V transposed, padded to the widest layer's V row."""
    return cfg.flash_attn == "off"


def kv_layer_bytes(cfg: TrialConfig, info: ModelInfo, il: int, cells: int | None = None) -> int:
    """K and V bytes of one layer's cache, as llama_kv_cache allocates them.

    GQA: head_count_kv x key/value_length per cell. MLA (DeepSeek-2/3, key_length_mla present): one latent
    "head" of kv_lora_rank + rope dims in K and no V tensor (V is a view of K). V without flash attention is
    transposed and padded to the widest layer. 0 for a layer without attention (recurrent, NextN).
    """
    return sum(kv_layer_kv(cfg, info, il, cells))


def kv_layer_kv(cfg: TrialConfig, info: ModelInfo, il: int, cells: int | None = None) -> tuple[int, int]:
    """K and V bytes of layer il: of the whole cache (every stream's) by default, of `cells` cells when given
    (what one token reads at that depth)."""
    if cells is None:
        k, v = kv_layer_kv(cfg, info, il, kv_cells(cfg, info, il))
        return k * kv_streams(cfg), v * kv_streams(cfg)
    if not cells:
        return 0, 0
    k = cells * kv_row_bytes(cfg.type_k, info.head_kv(il) * info.head_dim_k)
    if info.kv_mla:
        return k, 0
    if v_transposed(cfg):
        width = max(info.head_kv(j) for j in range(n_attn_layers(info))) * info.head_dim_v
    else:
        width = info.head_kv(il) * info.head_dim_v
    return k, cells * kv_row_bytes(cfg.type_v, width)


def rs_layer_bytes(info: ModelInfo, il: int, n_seq: int = 1) -> int:
    """Recurrent state of one layer (f32 R and S rows, one per sequence): llama_hparams::n_embd_r/n_embd_s."""
    if not is_recurrent(info, il):
        return 0
    if info.shortconv_l_cache:
        r, s = info.n_embd * (info.shortconv_l_cache - 1), 0
    else:
        d_conv, d_inner = info.ssm.get("conv_kernel", 0), info.ssm.get("inner_size", 0)
        d_state, n_group = info.ssm.get("state_size", 0), info.ssm.get("group_count", 0)
        r = max(d_conv - 1, 0) * (d_inner + 2 * n_group * d_state)
        s = d_state * d_inner
    return 4 * (r + s) * max(n_seq, 1)


def ubatch_tokens(cfg: TrialConfig) -> int:
    """Tokens one ubatch really carries in a llama-bench style trial (what the graph touches); --parallel N: the
    N prompts go in one batch."""
    chunk = max(cfg.n_prompt, cfg.n_depth, 1) * cfg.streams()
    return max(1, min(cfg.n_ubatch, cfg.n_batch, chunk))


def used_cells(cfg: TrialConfig) -> int:
    """KV cells a trial really fills (the graph's n_kv grows with them, in steps of 256); per stream with
    --parallel N (a unified cache: all N sequences)."""
    filled = (cfg.n_depth + cfg.n_prompt + cfg.n_gen + 1) * (cfg.streams() if cfg.kv_unified else 1)
    return min(cfg.seq_cells(), pad(filled, KV_PAD))


def _ffn_live(info: ModelInfo) -> int:
    """Floats per token alive at the widest FFN of any block.

    Dense: gate, up and their product (3 x n_ff) next to 4 x n_embd of residual and norms. MoE: the selected
    experts' gate and up rows and their down projections before and after the routing weights
    (2 x used x (n_ff_exp + n_embd)); the leading dense blocks of DeepSeek-style models count too.
    """
    n = n_attn_layers(info) or info.n_layer
    dense = max((info.ff(il) for il in range(n)), default=0)
    dense_live = 3 * dense + 4 * info.n_embd
    if not info.is_moe:
        return dense_live
    moe = 2 * max(info.n_expert_used, 1) * ((info.n_ff_exp or dense) + info.n_embd)
    return max(moe, dense_live if info.n_layer_dense_lead else 0)


def compute_raw(cfg: TrialConfig, info: ModelInfo, n_tok: int, n_out: int, n_kv: int) -> int:
    """llama.cpp's CPU compute buffer for a graph of n_tok tokens, n_out outputs and n_kv cached cells (bytes).

    ggml's graph allocator reuses memory, so the buffer is the largest set of tensors alive at once. Per
    token (f32 = 4 bytes) it is the larger of:
    - the output phase: logits (n_vocab per output) next to the final norm and its input (2 x n_embd);
    - a block with flash attention: the KQ mask (f16, n_kv) alive through every block, plus the widest of
      the FFN (`_ffn_live`) and, for MLA, the attention itself: per head the absorbed query, its concat with
      the rope part and the latent output (2 x (kv_lora_rank + rope) + kv_lora_rank);
    - a block without flash attention: the KQ scores (n_kv per head) and an f32 mask (n_kv), plus Q (twice
      when it is cast to f16 for an f16 K cache), 2 x n_embd and the K/V rows written to the cache (or the
      FFN next to the f32 mask, when that is wider).
    The allocator places tensors first-fit, so fragmentation moves the figure by a few % from one shape to
    the next; checked against llama.cpp's own figures by benchmarks/planner_oracle.py.
    """
    if not n_attn_layers(info):
        return 4 * n_tok * 3 * info.n_embd + 4 * n_out * info.n_vocab
    q_dim = info.n_head * info.head_dim_k
    kv_dim = max(info.head_kv(il) for il in range(n_attn_layers(info))) * (info.head_dim_k + info.head_dim_v)
    attn = info.n_head * (2 * info.head_dim_k + info.kv_lora_rank) if info.kv_mla else 0
    ffn = _ffn_live(info)
    if cfg.flash_attn == "off":
        cast = q_dim if cfg.type_k.lower() in ("f16", "bf16") else 0
        layer = max(
            4 * n_kv * (info.n_head + 1) + 4 * max(attn, q_dim + cast + 2 * info.n_embd + 5 * kv_dim),
            4 * n_kv + 4 * ffn,
        )
    else:
        layer = 2 * n_kv + 4 * max(attn, ffn)
    out = 4 * (n_out * info.n_vocab + n_tok * 2 * info.n_embd)
    return max(n_tok * layer, out)


def refusal(cfg: TrialConfig, info: ModelInfo) -> str:
    """Why llama.cpp refuses to create this context ("" when it does not): its own checks on cache types."""
    quant = ("f32", "f16", "bf16")
    if info.kv_mla and cfg.type_k.lower() != cfg.type_v.lower():
        return f"MLA caches V inside K: llama.cpp refuses different K ({cfg.type_k}) and V ({cfg.type_v}) cache types"
    if cfg.flash_attn == "off" and cfg.type_v.lower() not in quant:
        return f"a quantized V cache ({cfg.type_v}) needs flash attention: llama.cpp refuses it with -fa off"
    return ""


def output_bytes(info: ModelInfo, n_seq: int = 1) -> int:
    """llama.cpp's output buffer at context creation: logits (f32) for one output per sequence."""
    return 4 * info.n_vocab * max(n_seq, 1)


def max_kv_cells(cfg: TrialConfig, info: ModelInfo) -> int:
    return max((kv_cells(cfg, info, il) for il in range(info.n_layer)), default=0)


def buffers(cfg: TrialConfig, info: ModelInfo) -> dict:
    """llama.cpp's buffers for `cfg` on the CPU, as it logs them when it creates the context (bytes):
    model (mmap'd weights), kv (K + V, per cache kind), rs (recurrent state), output, compute (the graph
    buffer reserved for a full ubatch with every token an output). kv/compute are None for an architecture
    the planner does not model (see `unmodelled_note`)."""
    note = unmodelled_note(info)
    k = v = 0
    cells: dict[int, int] = {}
    for il in range(info.n_layer):
        kk, vv = kv_layer_kv(cfg, info, il)
        k, v = k + kk, v + vv
        c = kv_cells(cfg, info, il)
        if c:
            cells[c] = cells.get(c, 0) + 1
    n_tok = reserve_tokens(cfg)
    return {
        "model": sum(t.n_bytes for t in info.tensors),
        "kv": None if note else k + v,
        "kv_k": None if note else k,
        "kv_v": None if note else v,
        "kv_cells": {} if note else cells,
        "rs": None if note else sum(rs_layer_bytes(info, il, cfg.streams()) for il in range(info.n_layer)),
        "output": output_bytes(info, cfg.streams()),
        "compute": None if note else compute_raw(cfg, info, n_tok, n_tok, max_kv_cells(cfg, info)),
        "note": note,
    }


def predict(
    cfg: TrialConfig,
    info: ModelInfo,
    calib: Calibration | None = None,
    gpu_offload: bool = False,
    free: list[int] | None = None,
    device_baselines: list[int] | None = None,
    names: tuple[str, ...] | list[str] = (),
    compute_of=None,
) -> Prediction:
    """Peak host RAM and VRAM of one trial of `cfg` on `info`'s model, and what of it must stay resident.

    Host memory is split the way the kernel sees it: anonymous memory that cannot be reclaimed without swap
    (repacked weights, weights read without mmap, KV cache, recurrent state, compute and output buffers, the
    process itself) and file-backed pages of the mmap'd GGUF, which count in RSS once read but which the
    kernel can drop and read again (slower, never swapped). `fits` judges the first.

    `free`: each GPU's free memory, for llama.cpp's default split of the layers over several GPUs (see
    `layer_devices`); VRAM is predicted per device (`vram_by_device`), each device holding layers with its own
    CUDA context and compute buffer (an upper bound: llama.cpp sizes each device's buffer by its part of the
    graph). split_mode row spreads the matrices of offloaded layers over the GPUs by the split, rows-wise.
    `device_baselines`: each device's fixed cost besides its buffers (default: the calibrated CUDA context for
    every device; 0 for an RPC device, whose memory holds llama.cpp's buffers only). `names`: the devices' buffer
    names (RPC0[host:port], CUDA0): an RPC device's compute buffer is its own part of the graph
    (`compute_by_device`: RPC has no offload_op), a GPU's the whole graph's (CUDA offloads the matmuls of host
    weights for big batches too). `compute_of(cfg)`: each device's compute buffer (then the host's) as llama.cpp
    sizes it (tuner.plan.llama_sizes, where the devices are reachable), or None: the model's figures stand in.
    """
    calib = calib or Calibration()
    note = unmodelled_note(info)
    where, ngl = tensor_devices(cfg, info, gpu_offload, free, tuple(names))
    n_dev = len(free) if free else 1
    shares = _row_shares(cfg, free) if n_dev > 1 and cfg.split_mode == "row" else None
    # a GPU build puts host weights in the GPU's host buffer type, listed before the CPU's repack buffers
    # (src/llama-model.cpp make_cpu_buft_list: "ACCEL -> GPU host -> CPU extra -> CPU"), and with mmap the
    # loader swaps that host buffer for the mapped file (llama-model-loader.cpp: "avoid using a host buffer when
    # using mmap"): nothing is repacked (llama.cpp's --no-host would change that)
    rp = frozenset() if gpu_offload else repack_types()
    w_host = repack = 0
    w_dev = [0] * n_dev
    for t, dev in zip(info.tensors, where):
        if dev >= 0:
            if shares and len(t.shape) >= 2 and not EXPS_RE.search(t.name):
                for i, s in enumerate(shares):
                    w_dev[i] += int(t.n_bytes * s)
            else:
                w_dev[min(dev, n_dev - 1)] += t.n_bytes
            continue
        w_host += t.n_bytes
        # only matrices used by MUL_MAT are repacked (not the embeddings, read with GET_ROWS)
        if t.type in rp and len(t.shape) >= 2 and t.shape[1] % 8 == 0 and t.group != "embd":
            repack += t.n_bytes
    dev, extra = tied_output_copy(info, where)
    if extra:
        w_dev[min(dev, n_dev - 1)] += extra
    mapped = cfg.use_mmap and not cfg.use_mlock
    # with mmap the host weights are file pages (the repacked ones too: read once to repack, then clean);
    # their repacked copies, and every weight read without mmap, are anonymous
    file_pages = w_host if mapped else 0
    anon_weights = repack if mapped else w_host
    start, _, _ = gpu_layer_start(info, cfg.n_gpu_layers, gpu_offload)
    devs = layer_devices(cfg, info, gpu_offload, free) if gpu_offload else [-1] * (info.n_layer + 1)
    kv_host = 0
    kv_dev = [0] * n_dev
    layers_host = []
    for il in range(info.n_layer):
        b = 0 if note else kv_layer_bytes(cfg, info, il) + rs_layer_bytes(info, il, cfg.streams())
        if devs[il] < 0:
            kv_host += b
            layers_host.append(il)
        else:
            kv_dev[devs[il]] += b
    n_tok = ubatch_tokens(cfg)
    full_tok = reserve_tokens(cfg)
    n_kv_full = max_kv_cells(cfg, info)
    if note:
        touched = reserved = 0
    else:
        touched = int(calib.compute_scale * compute_raw(cfg, info, n_tok, 1, min(used_cells(cfg), n_kv_full)))
        reserved = compute_raw(cfg, info, full_tok, full_tok, n_kv_full)
    if ngl and gpu_offload:
        # the GPU buffer is reserved (and committed) for a full ubatch with every token an output
        c_gpu = 0 if note else int(calib.compute_scale_gpu * reserved)
        # blocks left on the CPU run their graph there; with every block offloaded the host only stages
        # the layer inputs and outputs (not measured here: no GPU on the reference rig)
        c_host = touched if start > 0 else int(calib.compute_scale * 4 * (info.n_embd + info.n_vocab) * n_tok)
        c_host_reserved = reserved if start > 0 else c_host
    else:
        c_gpu = 0
        c_host, c_host_reserved = touched, reserved
    out = output_bytes(info, cfg.streams()) + VOCAB_BYTES_PER_TOKEN * info.n_vocab
    # the compute pages a trial touches (its ubatch, one output) are resident; the rest of the reserved
    # buffer is address space until a bigger batch touches it
    resident = calib.baseline_ram + anon_weights + kv_host + c_host + out
    ram = resident + file_pages
    used = {d for d in devs if d >= 0} | {i for i, w in enumerate(w_dev) if w}
    rpc = [i < len(names) and names[i].startswith("RPC") for i in range(n_dev)]
    asked = compute_of(cfg) if compute_of is not None and gpu_offload and ngl else None
    if asked and getattr(compute_of, "stands_in", False) and host_matmuls(info, where):
        # RPC devices standing in for described GPUs: a GPU also runs the matmuls of host weights for big batches
        # (CUDA's offload_op), which an RPC device never does: the whole graph's bound stays
        asked = None
    if asked:  # llama.cpp's own figures (no_alloc), as a real load allocates them: nothing else to model or scale
        c_dev = as_allocated(asked, cfg, info, devs, n_dev)[:n_dev]
    else:
        by_graph = compute_by_device(cfg, info, where, devs, n_dev) if gpu_offload and ngl and any(rpc) else None
        c_dev = [int(calib.compute_scale_gpu * by_graph[i]) if by_graph and rpc[i] else c_gpu for i in range(n_dev)]
    base = [
        device_baselines[i] if device_baselines and i < len(device_baselines) else calib.baseline_vram
        for i in range(n_dev)
    ]
    by_dev = [
        (base[i] + w_dev[i] + kv_dev[i] + c_dev[i]) if (gpu_offload and ngl and i in used) else 0 for i in range(n_dev)
    ]
    vram, w_gpu, kv_gpu = sum(by_dev), sum(w_dev), sum(kv_dev)
    c_gpu = sum(c_dev[i] for i in used) if vram else 0  # one compute buffer per device that holds layers
    return Prediction(
        ram_bytes=int(ram),
        vram_bytes=int(vram),
        weights_host=file_pages + anon_weights,
        weights_gpu=w_gpu,
        kv_bytes=kv_host + kv_gpu,
        compute_bytes=c_host + c_gpu,
        kv_host=kv_host,
        kv_gpu=kv_gpu,
        compute_host=c_host,
        compute_gpu=c_gpu,
        baseline_ram=calib.baseline_ram,
        baseline_vram=sum(base[i] for i in used) if vram else 0,
        repack_bytes=repack,
        reclaimable_bytes=file_pages,
        weights_total=sum(t.n_bytes for t in info.tensors),
        n_gpu_layers=ngl,
        resident_bytes=int(resident),
        file_bytes=file_pages,
        compute_reserved=c_host_reserved,
        output_bytes=out,
        note=note,
        layers_host=layers_host,
        vram_by_device=by_dev if vram else [0] * n_dev,
    )


def reserve_tokens(cfg: TrialConfig) -> int:
    """Tokens of the graph llama.cpp reserves its compute buffers for: a full ubatch, within the KV cache."""
    return min(cfg.n_ubatch, cfg.n_batch, kv_size(cfg.effective_ctx()))


def as_allocated(asked: list[int], cfg: TrialConfig, info: ModelInfo, layer_dev, n_dev: int) -> list[int]:
    """llama.cpp's no_alloc compute figures (each device's, then the host's) as a real load allocates them: what a
    no_alloc load reports above the allocation (tuner.plan.compute.no_alloc_excess: a pipeline's later devices) is
    taken off, every other figure stays llama.cpp's."""
    if unmodelled_note(info):
        return list(asked)
    excess = no_alloc_excess(cfg, info, layer_dev, n_dev, reserve_tokens(cfg))
    return [max(a - x, 0) for a, x in zip(asked, excess)]


def host_matmuls(info: ModelInfo, where: list[int]) -> bool:
    """A weight matrix of the graph in host memory besides the token embeddings (read with GET_ROWS, which no GPU
    offloads): what a GPU backend's offload_op would run on the device for a big batch."""
    return any(d < 0 and len(t.shape) >= 2 and t.group != "embd" for t, d in zip(info.tensors, where))


def compute_by_device(
    cfg: TrialConfig, info: ModelInfo, where: list[int], layer_dev: list[int], n_dev: int, no_alloc: bool = False
) -> list[int]:
    """The compute buffer each backend reserves for a full ubatch of T tokens, every one an output: each device's
    as tuner.plan.compute.device_buffers models it, then (index -1) the host's CPU backend: compute_raw without
    devices, else tuner.plan.compute.host_buffer (the graph inputs, host experts, or the layers it runs)."""
    out = [0] * (n_dev + 1)
    if unmodelled_note(info):
        return out
    n_tok = reserve_tokens(cfg)
    n_kv = max_kv_cells(cfg, info)
    if n_dev == 0:
        out[-1] = compute_raw(cfg, info, n_tok, n_tok, n_kv)
        return out
    cells = [kv_cells(cfg, info, il) for il in range(info.n_layer)]
    raw = lambda n_out: compute_raw(cfg, info, n_tok, n_out, n_kv)  # noqa: E731 - the host's, if it runs layers
    return device_buffers(cfg, info, where, layer_dev, n_dev, cells, n_tok, raw, no_alloc)


def _row_shares(cfg: TrialConfig, free: list[int]) -> list[float]:
    """Each GPU's share of a matrix with split_mode row: the differences of the split points."""
    cum = split_fractions(cfg.tensor_split, free)
    return [c - p for c, p in zip(cum, [0.0] + cum[:-1])]


def fits(
    pred: Prediction,
    ram_total: int | None,
    vram_total: int | None,
    max_ram: int | None = None,
    max_vram: int | None = None,
    headroom: float = DEFAULT_HEADROOM,
) -> tuple[bool, str]:
    """Whether a prediction fits the machine: (ok, one-line reason). `max_*` are user caps below the totals.

    Host RAM short is the swap trap: the trial would page and crawl (or be OOM-killed) rather than fail fast.
    """

    def budget(total, cap):
        vals = [v for v in (total, cap) if v]
        return int(min(vals) * (1 - headroom)) if vals else None

    ram_budget, vram_budget = budget(ram_total, max_ram), budget(vram_total, max_vram)
    if pred.vram_bytes and vram_budget is not None and pred.vram_bytes > vram_budget:
        return False, (f"needs {_gib(pred.vram_bytes)} VRAM, {_gib(vram_budget)} usable ({headroom:.0%} headroom)")
    if ram_budget is not None and pred.resident_bytes > ram_budget:
        return False, (
            f"needs {_gib(pred.resident_bytes)} resident host RAM, {_gib(ram_budget)} usable "
            f"({headroom:.0%} headroom): it would swap"
        )
    return True, "fits"


def weights_cached(
    pred: Prediction, ram_total: int | None, max_ram: int | None = None, headroom: float = DEFAULT_HEADROOM
) -> bool | None:
    """Whether the mmap'd weights stay in the page cache next to the resident memory (full speed). When they
    do not, llama.cpp still runs (the kernel drops clean file pages, it never swaps them) but re-reads weights
    from disk for every token: this, not "RAM > model size + 10 GB", is the real boundary for mmap."""
    vals = [v for v in (ram_total, max_ram) if v]
    if not vals:
        return None
    return pred.resident_bytes + pred.file_bytes <= int(min(vals) * (1 - headroom))


def device_budgets(vram: int | list[int], headroom: float) -> tuple[list[float], list[int] | None]:
    """Usable VRAM per GPU (a total, or one per GPU) and the `free` list that llama.cpp's default split uses."""
    totals = [int(v) for v in vram] if isinstance(vram, (list, tuple)) else [int(vram)]
    return [v * (1 - headroom) for v in totals], (totals if len(totals) > 1 else None)


def vram_fits(pred: Prediction, budgets: list[float]) -> bool:
    """Every GPU's predicted VRAM within its own budget (two 24 GiB cards are not one 48 GiB pool)."""
    by_dev = pred.vram_by_device or [pred.vram_bytes]
    return all(v <= b for v, b in zip(by_dev, budgets))


def first_true(lo: int, hi: int, ok) -> int | None:
    """The smallest n in lo..hi with ok(n), ok monotone (False then True); None when even hi fails."""
    if not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def last_true(lo: int, hi: int, ok) -> int | None:
    """The largest n in lo..hi with ok(n), ok monotone (True then False); None when even lo fails."""
    if not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def max_gpu_layers(
    cfg: TrialConfig,
    info: ModelInfo,
    vram_total: int | list[int],
    headroom: float = DEFAULT_HEADROOM,
    calib: Calibration | None = None,
    names: tuple[str, ...] = (),
    device_baselines: list[int] | None = None,
) -> int:
    """The largest n_gpu_layers (0..n_layer + 1) whose predicted VRAM fits, on every GPU, with headroom.
    `vram_total`: one GPU's memory, or a list of every GPU's; `names` / `device_baselines` as `predict` takes them."""
    budgets, free = device_budgets(vram_total, headroom)

    def ok(n):  # VRAM grows with every offloaded layer
        c = dataclasses.replace(cfg, n_gpu_layers=n)
        return vram_fits(predict(c, info, calib, True, free, device_baselines, names), budgets)

    return last_true(0, info.n_layer + 1, ok) or 0


def pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


# -- `tuner estimate` as a library: one row per context -----------------------------------------------------
def estimate(
    info: ModelInfo,
    ctxs: list[int],
    ram: int,
    vram: int | list[int],
    headroom: float,
    base: TrialConfig,
    calib: Calibration | None = None,
    ngl: int | None = None,
    names: tuple[str, ...] = (),
    device_baselines: list[int] | None = None,
) -> list[dict]:
    """One row per context: sizes, the largest n_gpu_layers that fits and the host/GPU split it gives.
    `vram`: one device's memory, or each device's (llama.cpp's default split over them, each judged on its own);
    `names` / `device_baselines`: the devices as the planner's `predict` takes them (RPC devices: RPC0[...], 0)."""
    rows = []
    budgets, free = device_budgets(vram, headroom)
    for ctx in ctxs:
        cfg = dataclasses.replace(base, model=info.path, n_ctx=ctx)
        gpu = sum(budgets) > 0

        def pred(n: int, cfg=cfg) -> Prediction:
            return predict(dataclasses.replace(cfg, n_gpu_layers=n), info, calib, True, free, device_baselines, names)

        if ngl is not None:  # asked for: show its split
            use = info.n_layer + 1 if ngl < 0 else min(ngl, info.n_layer + 1)
        else:
            use = max_gpu_layers(cfg, info, vram, headroom, calib, names, device_baselines) if gpu else 0
        p = pred(use) if gpu else predict(dataclasses.replace(cfg, n_gpu_layers=0), info, calib, gpu_offload=False)
        ok, why = fits(p, ram, None, headroom=headroom)
        if ok and gpu and not vram_fits(p, budgets):
            ok, why = (
                False,
                "VRAM short: "
                + ", ".join(
                    f"device {i} needs {_gib(v)}, {_gib(b)} usable"
                    for i, (v, b) in enumerate(zip(p.vram_by_device, budgets))
                ),
            )
        cached = weights_cached(p, ram, headroom=headroom)
        usable = int(ram * (1 - headroom))
        refused = refusal(cfg, info)
        warning = ""
        if refused:
            warning = f"llama.cpp refuses this config: {refused}"
        elif p.resident_bytes > usable:
            warning = (
                f"host RAM short: needs {fmt_size(p.resident_bytes)} resident (KV cache, compute and output "
                f"buffers, repacked weights), {fmt_size(usable)} usable - it would swap (use more GPU layers, "
                "a smaller quant or context)"
            )
        elif not ok:
            warning = why
        elif cached is False:
            warning = (
                f"mmap'd weights ({fmt_size(p.file_bytes)}) do not all fit next to {fmt_size(p.resident_bytes)} "
                f"resident in {fmt_size(usable)} usable: it runs (the kernel drops clean file pages, never "
                "swaps them) but re-reads weights from disk for every token"
            )
        row = {
            "model": info.path,
            "name": info.name,
            "file_type": info.file_type,
            "n_ctx": ctx,
            "size_bytes": p.weights_total,
            "kv_bytes": p.kv_bytes,
            "n_layer": info.n_layer,
            "max_gpu_layers": use,
            "gpu_bytes": p.vram_bytes,
            "host_bytes": p.ram_bytes,
            "resident_bytes": p.resident_bytes,
            "mmap_bytes": p.file_bytes,
            "weights_cached": cached,
            "repack_bytes": p.repack_bytes,
            "weights_gpu": p.weights_gpu,
            "weights_host": p.weights_host,
            "compute_bytes": p.compute_bytes,
            "compute_reserved": p.compute_reserved,
            "fits": ok and not refused and p.resident_bytes <= usable,
            "warning": warning,
            "note": p.note,
        }
        if gpu and len(budgets) > 1:
            row["gpu_by_device"] = list(p.vram_by_device)
        if info.is_moe and gpu:
            row["min_n_cpu_moe"] = first_true(  # all layers offloaded, the experts of the first n in host RAM
                0,
                info.n_layer,
                lambda n: vram_fits(pred(info.n_layer + 1, dataclasses.replace(cfg, n_cpu_moe=n)), budgets),
            )
        rows.append(row)
    return rows

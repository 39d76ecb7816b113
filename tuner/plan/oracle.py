"""llama.cpp as a memory oracle: model shapes without weights, loaded by llama.cpp, which reports its own buffers.

`write_sparse()` writes a GGUF with real metadata and tensor infos (the `gguf` package) whose tensor data is a
hole (`os.truncate`): a 400 GB DeepSeek-V3 takes a few MB of disk. `measure()` loads files in a worker process
(`python -m tuner.plan.oracle RESULT_FD`, one per model: a crash costs one model, never the caller), creates contexts
and returns the sizes llama.cpp logs for each buffer:

- mode "sim": `llama_model_params.no_alloc` (mmap off): llama.cpp sizes every buffer without allocating any,
  the way its memory-fit pass does, so a 128k-token KV cache of a 70B model costs nothing here;
- mode "real": mmap on, `use_extra_bufts` off (no repacked copies), buffers really allocated. llama.cpp maps
  with MAP_POPULATE, so only small files are loaded this way (a hole is read as zero pages into the page cache).

SHAPES holds the flagship architectures people run big (Q4_K_M-like tensor types); `shrink()` makes a copy with
fewer layers/experts for fast tests. Nothing is decoded: no weight is ever read.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import select
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from tuner import files
from tuner.measure.buffers import parse_log
from tuner.measure.worker import FLASH_ATTN, SPLIT_MODE, ggml_type, set_pdeathsig, status_kib
from tuner.record import TrialConfig, parse_tensor_split

MiB = 1 << 20
Q = gguf.GGMLQuantizationType
ALIGN = 32
# A file bigger than this is only loaded in "sim" mode (see the module docstring: MAP_POPULATE).
REAL_LOAD_MAX = 1 << 30


@dataclass
class Shape:
    """An architecture's GGUF metadata and tensor list (name, ggml ne, type): everything but the weights."""

    arch: str
    name: str
    meta: dict  # a key starting with "." gets the "{arch}" prefix; values are typed by _add_meta
    tensors: list[tuple[str, tuple[int, ...], Q]] = field(default_factory=list)

    @property
    def n_bytes(self) -> int:
        return sum(_nbytes(qt, _numel(ne)) for _, ne, qt in self.tensors)


def _numel(ne) -> int:
    n = 1
    for d in ne:
        n *= d
    return n


def _nbytes(qt: Q, n: int) -> int:
    blck, size = gguf.GGML_QUANT_SIZES[qt]
    return n // blck * size


def q4_k_m_type(name: str, ne: tuple[int, ...]) -> Q:
    """A Q4_K_M-like type: norms, biases, routers and 1-D tensors F32; V / down projections and the output Q6_K;
    the rest Q4_K; a row length that no K-quant block divides falls back to Q8_0 (then F16), as the quantizer does."""
    if len(ne) == 1 or any(
        k in name for k in ("norm", "ffn_gate_inp", "exp_probs_b", "attn_sinks", ".bias", "shortconv.conv")
    ):
        return Q.F32
    want = Q.Q6_K if any(k in name for k in ("attn_v.", "ffn_down", "output.weight")) else Q.Q4_K
    for qt in (want, Q.Q8_0, Q.F16):
        if ne[0] % gguf.GGML_QUANT_SIZES[qt][0] == 0:
            return qt
    return Q.F16


def _t(tensors, name, ne, qt=None):
    tensors.append((name, tuple(int(x) for x in ne), qt or q4_k_m_type(name, ne)))


def _common(n_embd, n_layer, n_head, n_head_kv, n_ff, n_vocab, n_ctx, **extra) -> dict:
    meta = {
        ".context_length": n_ctx,
        ".embedding_length": n_embd,
        ".block_count": n_layer,
        ".attention.head_count": n_head,
        ".attention.head_count_kv": n_head_kv,
        ".attention.layer_norm_rms_epsilon": 1e-6,
        ".rope.freq_base": 10000.0,
        ".vocab_size": n_vocab,
    }
    if n_ff is not None:
        meta[".feed_forward_length"] = n_ff
    meta.update(extra)
    return meta


def _attn(t, p, n_embd, q_dim, kv_dim, bias=False):
    _t(t, f"{p}.attn_q.weight", (n_embd, q_dim))
    _t(t, f"{p}.attn_k.weight", (n_embd, kv_dim))
    _t(t, f"{p}.attn_v.weight", (n_embd, kv_dim))
    if bias:
        _t(t, f"{p}.attn_q.bias", (q_dim,))
        _t(t, f"{p}.attn_k.bias", (kv_dim,))
        _t(t, f"{p}.attn_v.bias", (kv_dim,))
    _t(t, f"{p}.attn_output.weight", (q_dim, n_embd))


def _ffn(t, p, n_embd, n_ff, suffix=""):
    _t(t, f"{p}.ffn_gate{suffix}.weight", (n_embd, n_ff))
    _t(t, f"{p}.ffn_up{suffix}.weight", (n_embd, n_ff))
    _t(t, f"{p}.ffn_down{suffix}.weight", (n_ff, n_embd))


def _exps(t, p, n_embd, n_ff_exp, n_exp, qt=None):
    _t(t, f"{p}.ffn_gate_inp.weight", (n_embd, n_exp))
    _t(t, f"{p}.ffn_gate_exps.weight", (n_embd, n_ff_exp, n_exp), qt)
    _t(t, f"{p}.ffn_up_exps.weight", (n_embd, n_ff_exp, n_exp), qt)
    _t(t, f"{p}.ffn_down_exps.weight", (n_ff_exp, n_embd, n_exp), qt)


def _io(t, n_embd, n_vocab, tied=False, norm="output_norm.weight"):
    _t(t, "token_embd.weight", (n_embd, n_vocab))
    _t(t, norm, (n_embd,))
    if not tied:
        _t(t, "output.weight", (n_embd, n_vocab))


def deepseek_v3(
    n_layer=61,
    n_expert=256,
    n_vocab=129280,
    n_embd=7168,
    n_head=128,
    q_lora=1536,
    kv_lora=512,
    n_ff=18432,
    n_ff_exp=2048,
    n_used=8,
    n_dense=3,
) -> Shape:
    """DeepSeek-V3/R1: MLA (kv_lora_rank 512 + 64 rope dims cached), 256 routed experts (8 used) + 1 shared."""
    rope, nope, vdim = 64, 128, 128
    n_dense = min(n_dense, n_layer - 1)
    meta = _common(
        n_embd,
        n_layer,
        n_head,
        1,
        n_ff,
        n_vocab,
        163840,
        **{
            ".attention.key_length": kv_lora + rope,
            ".attention.value_length": kv_lora,
            ".attention.key_length_mla": nope + rope,
            ".attention.value_length_mla": vdim,
            ".attention.q_lora_rank": q_lora,
            ".attention.kv_lora_rank": kv_lora,
            ".rope.dimension_count": rope,
            ".expert_count": n_expert,
            ".expert_used_count": n_used,
            ".expert_shared_count": 1,
            ".expert_feed_forward_length": n_ff_exp,
            ".leading_dense_block_count": n_dense,
            ".expert_weights_scale": 2.5,
            ".expert_weights_norm": True,
            ".expert_gating_func": 2,
        },
    )
    t: list = []
    _io(t, n_embd, n_vocab)
    for il in range(n_layer):
        p = f"blk.{il}"
        for name, ne in [
            ("attn_norm.weight", (n_embd,)),
            ("attn_q_a_norm.weight", (q_lora,)),
            ("attn_kv_a_norm.weight", (kv_lora,)),
            ("attn_q_a.weight", (n_embd, q_lora)),
            ("attn_q_b.weight", (q_lora, n_head * (nope + rope))),
            ("attn_kv_a_mqa.weight", (n_embd, kv_lora + rope)),
            ("attn_k_b.weight", (nope, kv_lora, n_head)),
            ("attn_v_b.weight", (kv_lora, vdim, n_head)),
            ("attn_output.weight", (n_head * vdim, n_embd)),
            ("ffn_norm.weight", (n_embd,)),
        ]:
            _t(t, f"{p}.{name}", ne, Q.Q8_0 if name.startswith(("attn_k_b", "attn_v_b")) else None)
        _dense_or_shared_moe(t, p, il < n_dense, n_embd, n_ff, n_ff_exp, n_expert)
    return Shape("deepseek2", "DeepSeek-V3 shape", meta, t)


def _dense_or_shared_moe(t, p: str, dense: bool, n_embd: int, n_ff: int, n_ff_exp: int, n_expert: int) -> None:
    """DeepSeek-style FFN: a dense FFN in the leading layers, else routed experts with a selection bias and a
    shared expert (deepseek2 and glm4moe lay them out alike)."""
    if dense:
        _ffn(t, p, n_embd, n_ff)
    else:
        _exps(t, p, n_embd, n_ff_exp, n_expert)
        _t(t, f"{p}.exp_probs_b.bias", (n_expert,))
        _ffn(t, p, n_embd, n_ff_exp, "_shexp")


def qwen3_moe(
    n_layer=94, n_expert=128, n_vocab=151936, n_embd=4096, n_head=64, n_kv=4, hd=128, n_ff_exp=1536, n_used=8
) -> Shape:
    """Qwen3-235B-A22B: 64 query / 4 KV heads of 128, 128 experts (8 used), QK norm."""
    meta = _common(
        n_embd,
        n_layer,
        n_head,
        n_kv,
        12288,
        n_vocab,
        40960,
        **{
            ".attention.key_length": hd,
            ".attention.value_length": hd,
            ".expert_count": n_expert,
            ".expert_used_count": n_used,
            ".expert_feed_forward_length": n_ff_exp,
            ".rope.freq_base": 1e6,
        },
    )
    t: list = []
    _io(t, n_embd, n_vocab)
    for il in range(n_layer):
        p = f"blk.{il}"
        _t(t, f"{p}.attn_norm.weight", (n_embd,))
        _attn(t, p, n_embd, n_head * hd, n_kv * hd)
        _t(t, f"{p}.attn_k_norm.weight", (hd,))
        _t(t, f"{p}.attn_q_norm.weight", (hd,))
        _t(t, f"{p}.ffn_norm.weight", (n_embd,))
        _exps(t, p, n_embd, n_ff_exp, n_expert)
    return Shape("qwen3moe", "Qwen3-235B-A22B shape", meta, t)


def gpt_oss(n_layer=36, n_expert=128, n_vocab=201088, n_embd=2880, n_head=64, n_kv=8, hd=64, n_ff_exp=2880) -> Shape:
    """gpt-oss-120b: attention sinks, sliding window 128 on every other layer, MXFP4 experts with biases."""
    meta = _common(
        n_embd,
        n_layer,
        n_head,
        n_kv,
        n_ff_exp,
        n_vocab,
        131072,
        **{
            ".attention.key_length": hd,
            ".attention.value_length": hd,
            ".rope.dimension_count": hd,
            ".expert_count": n_expert,
            ".expert_used_count": 4,
            ".expert_feed_forward_length": n_ff_exp,
            ".attention.sliding_window": 128,
            ".rope.freq_base": 150000.0,
            ".attention.layer_norm_rms_epsilon": 1e-5,
        },
    )
    t: list = []
    _io(t, n_embd, n_vocab)
    for il in range(n_layer):
        p = f"blk.{il}"
        _t(t, f"{p}.attn_norm.weight", (n_embd,))
        _t(t, f"{p}.post_attention_norm.weight", (n_embd,))
        _attn(t, p, n_embd, n_head * hd, n_kv * hd, bias=True)
        _t(t, f"{p}.attn_output.bias", (n_embd,))
        _t(t, f"{p}.attn_sinks.weight", (n_head,))
        _exps(t, p, n_embd, n_ff_exp, n_expert, Q.MXFP4)
        _t(t, f"{p}.ffn_gate_inp.bias", (n_expert,))
        _t(t, f"{p}.ffn_gate_exps.bias", (n_ff_exp, n_expert))
        _t(t, f"{p}.ffn_up_exps.bias", (n_ff_exp, n_expert))
        _t(t, f"{p}.ffn_down_exps.bias", (n_embd, n_expert))
    return Shape("gpt-oss", "gpt-oss-120b shape", meta, t)


def gemma3(n_layer=62, n_vocab=262208, n_embd=5376, n_head=32, n_kv=16, hd=128, n_ff=21504) -> Shape:
    """Gemma 3 27B: 5 of every 6 layers attend to a 1024-token window; tied output."""
    meta = _common(
        n_embd,
        n_layer,
        n_head,
        n_kv,
        n_ff,
        n_vocab,
        131072,
        **{
            ".attention.key_length": hd,
            ".attention.value_length": hd,
            ".attention.sliding_window": 1024,
            ".rope.freq_base": 1e6,
        },
    )
    t: list = []
    _io(t, n_embd, n_vocab, tied=True)
    for il in range(n_layer):
        p = f"blk.{il}"
        for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            _t(t, f"{p}.{n}.weight", (n_embd,))
        _t(t, f"{p}.attn_k_norm.weight", (hd,))
        _t(t, f"{p}.attn_q_norm.weight", (hd,))
        _attn(t, p, n_embd, n_head * hd, n_kv * hd)
        _ffn(t, p, n_embd, n_ff)
    return Shape("gemma3", "Gemma 3 27B shape", meta, t)


def llama_70b(n_layer=80, n_vocab=128256, n_embd=8192, n_head=64, n_kv=8, n_ff=28672) -> Shape:
    """Llama 3.x 70B: dense, 64 query / 8 KV heads of 128."""
    hd = n_embd // n_head
    meta = _common(
        n_embd,
        n_layer,
        n_head,
        n_kv,
        n_ff,
        n_vocab,
        131072,
        **{".rope.dimension_count": hd, ".rope.freq_base": 500000.0, ".attention.layer_norm_rms_epsilon": 1e-5},
    )
    t: list = []
    _io(t, n_embd, n_vocab)
    for il in range(n_layer):
        p = f"blk.{il}"
        _t(t, f"{p}.attn_norm.weight", (n_embd,))
        _attn(t, p, n_embd, n_head * hd, n_kv * hd)
        _t(t, f"{p}.ffn_norm.weight", (n_embd,))
        _ffn(t, p, n_embd, n_ff)
    return Shape("llama", "Llama 3 70B shape", meta, t)


def glm45_air(
    n_layer=46,
    n_expert=128,
    n_vocab=151552,
    n_embd=4096,
    n_head=96,
    n_kv=8,
    hd=128,
    n_ff=10944,
    n_ff_exp=1408,
    n_dense=1,
) -> Shape:
    """GLM-4.5-Air (glm4moe): 96 query / 8 KV heads of 128, partial rotary, 128 experts + 1 shared, QKV bias."""
    meta = _common(
        n_embd,
        n_layer,
        n_head,
        n_kv,
        n_ff,
        n_vocab,
        131072,
        **{
            ".attention.key_length": hd,
            ".attention.value_length": hd,
            ".rope.dimension_count": hd // 2,
            ".expert_count": n_expert,
            ".expert_used_count": 8,
            ".expert_shared_count": 1,
            ".expert_feed_forward_length": n_ff_exp,
            ".leading_dense_block_count": n_dense,
            ".expert_gating_func": 2,
            ".expert_weights_norm": True,
            ".expert_weights_scale": 1.0,
            ".nextn_predict_layers": 0,
        },
    )
    t: list = []
    _io(t, n_embd, n_vocab)
    for il in range(n_layer):
        p = f"blk.{il}"
        _t(t, f"{p}.attn_norm.weight", (n_embd,))
        _attn(t, p, n_embd, n_head * hd, n_kv * hd, bias=True)
        _t(t, f"{p}.post_attention_norm.weight", (n_embd,))
        _dense_or_shared_moe(t, p, il < n_dense, n_embd, n_ff, n_ff_exp, n_expert)
    return Shape("glm4moe", "GLM-4.5-Air shape", meta, t)


LFM2_ATTN = (2, 5, 8, 10, 12, 14)  # LFM2-1.2B: attention layers; the rest are short convolutions


def lfm2(
    n_layer=16, attn_layers=LFM2_ATTN, n_vocab=65536, n_embd=2048, n_head=32, n_kv=8, n_ff=8192, l_cache=3
) -> Shape:
    """LFM2-1.2B (hybrid): gated short-convolution layers (a recurrent state) and 6 GQA attention layers."""
    hd = n_embd // n_head
    heads_kv = [n_kv if il in attn_layers else 0 for il in range(n_layer)]
    meta = _common(
        n_embd,
        n_layer,
        n_head,
        heads_kv,
        n_ff,
        n_vocab,
        128000,
        **{".shortconv.l_cache": l_cache, ".rope.freq_base": 1e6, ".attention.layer_norm_rms_epsilon": 1e-5},
    )
    t: list = []
    _t(t, "token_embd.weight", (n_embd, n_vocab))
    _t(t, "token_embd_norm.weight", (n_embd,))
    for il in range(n_layer):
        p = f"blk.{il}"
        _t(t, f"{p}.ffn_norm.weight", (n_embd,))
        _ffn(t, p, n_embd, n_ff)
        _t(t, f"{p}.attn_norm.weight", (n_embd,))
        if il in attn_layers:
            _t(t, f"{p}.attn_q_norm.weight", (hd,))
            _t(t, f"{p}.attn_k_norm.weight", (hd,))
            _attn(t, p, n_embd, n_embd, n_kv * hd)
        else:
            _t(t, f"{p}.shortconv.conv.weight", (l_cache, n_embd))
            _t(t, f"{p}.shortconv.in_proj.weight", (n_embd, 3 * n_embd))
            _t(t, f"{p}.shortconv.out_proj.weight", (n_embd, n_embd))
    return Shape("lfm2", "LFM2-1.2B shape", meta, t)


SHAPES = {
    "deepseek2": deepseek_v3,
    "qwen3moe": qwen3_moe,
    "gpt-oss": gpt_oss,
    "gemma3": gemma3,
    "llama": llama_70b,
    "glm4moe": glm45_air,
    "lfm2": lfm2,
}
# Few layers/experts and a small vocabulary: the same layout rules, loaded in a fraction of a second (tests).
SMALL = {
    "deepseek2": dict(n_layer=4, n_expert=16, n_vocab=4096),
    "qwen3moe": dict(n_layer=3, n_expert=16, n_vocab=4096),
    "gpt-oss": dict(n_layer=4, n_expert=8, n_vocab=4096),
    "gemma3": dict(n_layer=7, n_vocab=4096),
    "llama": dict(n_layer=3, n_vocab=4096),
    "glm4moe": dict(n_layer=3, n_expert=16, n_vocab=4096),
    "lfm2": dict(n_layer=6, attn_layers=(2, 5), n_vocab=4096),
}


# Other published sizes of the same architectures: never looked at while the planner's formulas were written,
# so they test that the formulas follow the dimensions rather than the seven shapes above.
HELD_OUT = {
    "deepseek2/Kimi-K2": ("deepseek2", dict(n_expert=384, n_head=64, n_vocab=163840, n_dense=1)),
    "qwen3moe/30B-A3B": ("qwen3moe", dict(n_layer=48, n_embd=2048, n_head=32, n_kv=4, n_ff_exp=768)),
    "gpt-oss/20b": ("gpt-oss", dict(n_layer=24, n_expert=32)),
    "gemma3/12B": ("gemma3", dict(n_layer=48, n_embd=3840, n_head=16, n_kv=8, hd=256, n_ff=15360)),
    "llama/8B": ("llama", dict(n_layer=32, n_embd=4096, n_head=32, n_kv=8, n_ff=14336)),
    "glm4moe/GLM-4.5": (
        "glm4moe",
        dict(n_layer=92, n_embd=5120, n_head=96, n_kv=8, n_ff=12288, n_ff_exp=1536, n_expert=160, n_dense=3),
    ),
    "lfm2/LFM2-2.6B": ("lfm2", dict(n_layer=30, attn_layers=(2, 5, 8, 10, 12, 14, 17, 21), n_ff=10752)),
}


def shape(arch: str, small: bool = False, **dims) -> Shape:
    if arch not in SHAPES:
        raise ValueError(f"no oracle shape for architecture {arch!r} (known: {', '.join(SHAPES)})")
    return SHAPES[arch](**{**(SMALL[arch] if small else {}), **dims})


def _add_meta(w: gguf.GGUFWriter, arch: str, meta: dict) -> None:
    for key, v in meta.items():
        k = f"{arch}{key}" if key.startswith(".") else key
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, (list, tuple)):
            w.add_array(k, list(v))
        else:
            raise TypeError(f"metadata {k}: unsupported value {v!r}")


def write_sparse(s: Shape, path: str | os.PathLike) -> Path:
    """Write `s` as a GGUF whose tensor data is a hole: real header, apparent full size, a few MB on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(path, tmp=path.with_suffix(".gguf.part")) as part:
        w = gguf.GGUFWriter(str(part), s.arch)
        w.add_name(s.name)
        w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_K_M))
        w.add_tokenizer_model("none")  # llama.cpp makes vocab_size dummy tokens: no vocabulary in the header
        _add_meta(w, s.arch, s.meta)
        data = 0
        for name, ne, qt in s.tensors:
            nb = _nbytes(qt, _numel(ne))
            w.add_tensor_info(name, tuple(reversed(ne)), np.float32, nb, raw_dtype=qt)
            data += -(-nb // ALIGN) * ALIGN
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        start = -(-part.stat().st_size // ALIGN) * ALIGN
        os.truncate(part, start + data)  # the data region: a hole, never read
    return path


def model_file(arch: str, out_dir: str | os.PathLike, small: bool = False, tag: str = "", **dims) -> Path:
    """The sparse GGUF of an oracle shape (with `dims` changed) in out_dir."""
    name = f"oracle-{arch}{'-small' if small else ''}{'-' + tag if tag else ''}.gguf"
    return write_sparse(shape(arch, small, **dims), Path(out_dir) / name)


# -- what llama.cpp reports ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    model: str
    n_ctx: int = 4096
    n_batch: int = 2048
    n_ubatch: int = 512
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: str = "on"  # on | off | auto
    mode: str = "sim"  # sim (no_alloc) | real (mmap, buffers allocated)
    n_gpu_layers: int = 0
    n_cpu_moe: int = 0
    moe_part: str = "none"
    rpc: str = ""  # llama.cpp RPC servers ("host:port,..."): their devices join, as `--rpc` adds them
    tensor_split: str = ""
    split_mode: str = "layer"  # none | layer (row: CUDA/SYCL only)
    cpu_moe: bool = False
    overrides: tuple[str, ...] = ()  # raw -ot PATTERN=BUFFER entries
    main_gpu: int = 0
    n_seq: int = 1
    kv_unified: bool = False

    @classmethod
    def of(cls, cfg: TrialConfig, mode: str = "sim") -> Job:
        """The load and context of a trial config, as llama.cpp would size them (what decides its buffers only)."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("mode", "n_ctx", "n_seq", "overrides")]
        return cls(
            mode=mode,
            n_ctx=cfg.effective_ctx(),
            n_seq=cfg.streams(),
            overrides=tuple(cfg.overrides),
            **{k: getattr(cfg, k) for k in names},
        )

    def config(self) -> TrialConfig:
        """The job as a TrialConfig: the planner's side of a comparison with what llama.cpp reported."""
        fields = ("n_ctx", "n_batch", "n_ubatch", "type_k", "type_v", "flash_attn", "n_gpu_layers", "n_cpu_moe")
        more = ("moe_part", "rpc", "tensor_split", "split_mode", "cpu_moe", "overrides", "main_gpu", "kv_unified")
        n_seq = {"n_seq": self.n_seq} if self.n_seq > 1 else {}
        return TrialConfig(model=self.model, **{k: getattr(self, k) for k in fields + more}, **n_seq)

    def load_key(self) -> tuple:
        return (
            self.model,
            self.mode,
            self.n_gpu_layers,
            self.n_cpu_moe,
            self.moe_part,
            self.tensor_split,
            self.split_mode,
            self.cpu_moe,
            tuple(self.overrides),
            self.main_gpu,
        )


def measure(jobs: list[Job], timeout: float = 300.0) -> list[dict]:
    """Run jobs in worker processes (one per model/load parameters, in order); one result dict per job.

    A result holds `outcome` ("ok", or "error"/"crash" with `cause`), the parsed figures (`parse_log`) and the
    worker's peak RSS. A worker that dies fails only the jobs it had not answered.
    """
    groups: dict[tuple, list[int]] = {}
    for i, j in enumerate(jobs):
        groups.setdefault((j.rpc, *j.load_key()), []).append(i)  # a process registers RPC servers for good
    results: list[dict | None] = [None] * len(jobs)
    for idx in groups.values():
        for i, res in zip(idx, _run_group([jobs[i] for i in idx], timeout)):
            results[i] = res
    return results  # type: ignore[return-value]


def _spawn(log, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """An oracle worker (its own session, logging into `log`; `env`: its environment, default ours) and the read
    end of the pipe it answers on."""
    rfd, wfd = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuner.plan.oracle", str(wfd)],
        stdin=subprocess.PIPE,
        stdout=log,
        stderr=log,
        pass_fds=(wfd,),
        start_new_session=True,
        env=dict(env or os.environ, PYTHONUNBUFFERED="1", GGML_NO_BACKTRACE="1"),
    )
    os.close(wfd)
    return proc, rfd


def _run_group(jobs: list[Job], timeout: float) -> list[dict]:
    with tempfile.TemporaryFile() as log:
        proc, rfd = _spawn(log)
        payload = "".join(json.dumps(dataclasses.asdict(j)) + "\n" for j in jobs)
        try:
            proc.communicate(payload.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        with os.fdopen(rfd) as f:
            lines = [json.loads(ln) for ln in f.read().splitlines() if ln.strip()]
        why = f"worker exited with {proc.returncode}" if proc.returncode else "no result (timeout)"
        crash = _crash(why, log)
    return [lines[i] if i < len(lines) else crash for i in range(len(jobs))]


def _crash(why: str, log) -> dict:
    """A job the worker did not answer: why, and the last lines of its log."""
    log.seek(0)
    tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
    return {"outcome": "crash", "cause": f"{why}: {' | '.join(tail)[-300:]}"}


class Session:
    """One oracle worker kept for many questions, answered in turn (no process start per job: a search asks one
    per placement it plans). A worker that dies or hangs answers "crash" with its log's tail; the next question
    starts a new one. Use as a context manager, or close()."""

    def __init__(self, timeout: float = 120.0, env: dict | None = None):
        self.timeout = timeout
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.answers = None
        self.log = None

    def _start(self) -> None:
        self.log = tempfile.TemporaryFile()
        self.proc, rfd = _spawn(self.log, self.env)
        self.answers = os.fdopen(rfd)

    def ask(self, job: Job) -> dict:
        """llama.cpp's figures for one job (as `measure` gives them)."""
        if self.proc is None or self.proc.poll() is not None:
            self.close()
            self._start()
        try:
            self.proc.stdin.write((json.dumps(dataclasses.asdict(job)) + "\n").encode())
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.answers], [], [], self.timeout)
            line = self.answers.readline() if ready else ""
        except OSError:  # the worker died before it read the question
            line = ""
        if line.strip():
            return json.loads(line)
        why = "no answer within the timeout" if self.proc.poll() is None else f"worker exited with {self.proc.poll()}"
        crash = _crash(why, self.log)
        self.close()
        return crash

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, 9)
            self.proc.wait()
            try:
                self.proc.stdin.close()
            except OSError:  # a question still buffered for a worker that died
                pass
            self.proc = None
        for f in (self.answers, self.log):
            if f is not None:
                f.close()
        self.answers = self.log = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the worker side (python -m tuner.plan.oracle RESULT_FD) -----------------------------------------------------


def _worker(out) -> None:
    # llama.cpp loads in the oracle's subprocess only: the parent sizes files and reads logs without it
    import llama_cpp.llama_cpp as L  # noqa: PLC0415 - the oracle's child process only

    from tuner import llama as glue  # noqa: PLC0415 - loads llama_cpp: the oracle's child process only

    set_pdeathsig()
    L.llama_backend_init()
    log = glue.LogCapture(echo_level=4, stream=sys.stderr)
    model, key, overrides, rpc = None, None, None, ""
    for line in sys.stdin:
        if not line.strip():
            continue
        fields = json.loads(line)
        job = Job(**{**fields, "overrides": tuple(fields.get("overrides", ()))})
        log.lines.clear()  # one job's log at a time (LogCapture trims long logs, which would shift a mark)
        mark = 0
        res: dict = {"outcome": "ok"}
        try:
            if key != job.load_key():
                if model is not None:
                    L.llama_model_free(model)
                    model = None
                if job.rpc and job.rpc != rpc:
                    glue.rpc_add_servers(job.rpc.split(","))
                    rpc = job.rpc
                mp = L.llama_model_default_params()
                mp.n_gpu_layers = job.n_gpu_layers
                mp.split_mode = SPLIT_MODE[job.split_mode]
                mp.main_gpu = job.main_gpu
                if job.tensor_split:
                    parts = parse_tensor_split(job.tensor_split)
                    n = L.llama_max_devices()
                    split = (ctypes.c_float * n)(*(parts + [0.0] * (n - len(parts)))[:n])  # kept by the loop
                    mp.tensor_split = split
                mp.use_extra_bufts = False  # no repacked copies: weights stay in the (sparse) file
                mp.no_alloc = job.mode == "sim"
                # no_alloc sizes buffers without mapping the file; "real" maps it
                mp.load_mode = L.LLAMA_LOAD_MODE_NONE if job.mode == "sim" else L.LLAMA_LOAD_MODE_AUTO
                pairs = glue.override_patterns(job.n_cpu_moe, job.cpu_moe, tuple(job.overrides), job.moe_part)
                overrides = glue.Overrides(pairs) if pairs else None
                if overrides:
                    mp.tensor_buft_overrides = overrides.pointer
                model = L.llama_model_load_from_file(job.model.encode(), mp)
                if not model:
                    raise RuntimeError(_last_error(log.lines[mark:], "llama.cpp failed to load the model"))
                key = job.load_key()
                res["model_size"] = int(L.llama_model_size(model))
                load_text = "".join(log.lines)
                log.lines.clear()
            else:
                load_text = ""
            cp = L.llama_context_default_params()
            cp.n_ctx, cp.n_batch, cp.n_ubatch = job.n_ctx, job.n_batch, job.n_ubatch
            cp.n_seq_max = job.n_seq
            cp.kv_unified = job.kv_unified
            cp.flash_attn_type = FLASH_ATTN[job.flash_attn]
            cp.type_k, cp.type_v = ggml_type(job.type_k), ggml_type(job.type_v)
            cp.swa_full = False
            cp.no_perf = True
            ctx = L.llama_init_from_model(model, cp)
            text = load_text + "".join(log.lines[mark:])
            if not ctx:
                raise RuntimeError(_last_error(log.lines[mark:], "llama.cpp failed to create the context"))
            L.llama_free(ctx)
            res.update(parse_log(text))
            if not load_text:
                res.pop("model")
        except Exception as e:  # noqa: BLE001 - reported per job
            res = {"outcome": "error", "cause": str(e)[:300]}
        res["peak_rss_bytes"] = (status_kib("VmHWM") or 0) * 1024
        out.write(json.dumps(res) + "\n")
        out.flush()
    out.close()


def _last_error(lines: list[str], fallback: str) -> str:
    """The line that names the cause: llama.cpp's "error loading model: ..." or else its last log line
    ("llama_init_from_model: model does not support different K (q8_0) and V (f16) cache types")."""
    text = [ln.strip() for ln in lines if ln.strip()]
    named = [ln for ln in text if "error loading model" in ln]
    return (named[0] if named else text[-1] if text else fallback)[:300]


if __name__ == "__main__":
    _worker(os.fdopen(int(sys.argv[1]), "w"))

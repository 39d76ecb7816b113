"""Synthetic GGUF models: real llama-architecture files with random weights.

The `gguf` package writes an F16 (or F32) file; llama.cpp's own quantizer (`llama_model_quantize`) turns it
into every other quant type asked for. Nothing is downloaded, and the same seed gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from tuner import files
from tuner.errors import TunerError
from tuner.model.meta import ModelError, read_model


class SynthError(TunerError):
    """A synthetic model that cannot be made as asked (a size, a shape, a quant type): one line."""


@dataclass(frozen=True)
class Shape:
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_expert: int = 0
    n_expert_used: int = 0
    n_ctx_train: int = 131072  # as today's models; tuner refuses a --ctx above a model's trained context

    def n_params(self) -> int:
        head_dim = self.n_embd // self.n_head
        attn = 2 * self.n_embd * self.n_embd + 2 * self.n_embd * self.n_head_kv * head_dim
        ffn = 3 * self.n_embd * self.n_ff * max(1, self.n_expert) + self.n_embd * self.n_expert
        return self.n_layer * (attn + ffn + 2 * self.n_embd) + 2 * self.n_vocab * self.n_embd + self.n_embd


# Row sizes are multiples of 256 so that K-quants apply to every matrix.
PRESETS: dict[str, Shape] = {
    # loads in milliseconds: unit tests
    "tiny": Shape(n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512, n_vocab=512),
    # ~130 M params: threads and batch sizes make a measurable difference
    "dense": Shape(n_embd=1024, n_layer=10, n_head=16, n_head_kv=4, n_ff=2816, n_vocab=8192),
    # ~575 M params (1.2 GB as f16): a load from the disk is a large part of a short trial (the replay's cold grid)
    "dense-xl": Shape(n_embd=2048, n_layer=12, n_head=16, n_head_kv=4, n_ff=5632, n_vocab=8192),
    # Mixtral-style MoE: routed experts in blk.N.ffn_{gate,up,down}_exps
    "moe": Shape(n_embd=512, n_layer=6, n_head=8, n_head_kv=4, n_ff=1024, n_vocab=2048, n_expert=8, n_expert_used=2),
}

BASE_TYPES = {"f16": gguf.GGMLQuantizationType.F16, "f32": gguf.GGMLQuantizationType.F32}


def quant_ftypes() -> dict[str, int]:
    """Quant names llama.cpp's quantizer accepts, as `q4_k_m` → LLAMA_FTYPE_MOSTLY_Q4_K_M."""
    return {
        ft.name.removeprefix("MOSTLY_").lower(): int(ft) for ft in gguf.LlamaFileType if ft.name.startswith("MOSTLY_")
    }


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: unk/bos/eos, the 256 byte tokens, then word pieces."""
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    if n_vocab < len(tokens) + 1:
        raise SynthError(f"n_vocab must be at least {len(tokens) + 1} (specials + 256 byte tokens)")
    letters = "abcdefghijklmnopqrstuvwxyz"
    i = 0
    while len(tokens) < n_vocab:
        piece, k = "", i
        while True:
            piece = letters[k % 26] + piece
            k = k // 26 - 1
            if k < 0:
                break
        tokens.append("\u2581" + piece)
        types.append(T.NORMAL)
        i += 1
    scores = [0.0] * 259 + [-float(j) for j in range(n_vocab - 259)]
    return tokens, scores, [int(t) for t in types]


def write_base(path: Path, shape: Shape, name: str, base_type: str = "f16", seed: int = 0) -> None:
    """Write an F16/F32 llama GGUF with random weights (norms are ones, as trained models start)."""
    rng = np.random.default_rng(seed)
    wtype = np.float16 if base_type == "f16" else np.float32
    head_dim = shape.n_embd // shape.n_head
    kv_dim = shape.n_head_kv * head_dim

    def mat(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(wtype)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(shape.n_vocab)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if base_type == "f16" else gguf.LlamaFileType.ALL_F32))
    if shape.n_expert:
        w.add_expert_count(shape.n_expert)
        w.add_expert_used_count(shape.n_expert_used)
    tokens, scores, types = _vocab(shape.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    ones = np.ones(shape.n_embd, dtype=np.float32)
    # numpy shapes are ggml's ne reversed: (out_features, in_features)
    w.add_tensor("token_embd.weight", mat(shape.n_vocab, shape.n_embd))
    for i in range(shape.n_layer):
        p = f"blk.{i}"
        w.add_tensor(f"{p}.attn_norm.weight", ones)
        w.add_tensor(f"{p}.attn_q.weight", mat(shape.n_embd, shape.n_embd))
        w.add_tensor(f"{p}.attn_k.weight", mat(kv_dim, shape.n_embd))
        w.add_tensor(f"{p}.attn_v.weight", mat(kv_dim, shape.n_embd))
        w.add_tensor(f"{p}.attn_output.weight", mat(shape.n_embd, shape.n_embd))
        w.add_tensor(f"{p}.ffn_norm.weight", ones)
        if shape.n_expert:
            w.add_tensor(f"{p}.ffn_gate_inp.weight", mat(shape.n_expert, shape.n_embd).astype(np.float32))
            w.add_tensor(f"{p}.ffn_gate_exps.weight", mat(shape.n_expert, shape.n_ff, shape.n_embd))
            w.add_tensor(f"{p}.ffn_up_exps.weight", mat(shape.n_expert, shape.n_ff, shape.n_embd))
            w.add_tensor(f"{p}.ffn_down_exps.weight", mat(shape.n_expert, shape.n_embd, shape.n_ff))
        else:
            w.add_tensor(f"{p}.ffn_gate.weight", mat(shape.n_ff, shape.n_embd))
            w.add_tensor(f"{p}.ffn_up.weight", mat(shape.n_ff, shape.n_embd))
            w.add_tensor(f"{p}.ffn_down.weight", mat(shape.n_embd, shape.n_ff))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", mat(shape.n_vocab, shape.n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _current(path: Path, shape: Shape) -> bool:
    """A cached file made from an older shape (e.g. another trained context) is made again."""
    if not path.exists():
        return False
    try:
        info = read_model(str(path))
    except ModelError:
        return False
    return (info.n_ctx_train, info.n_layer, info.n_embd) == (shape.n_ctx_train, shape.n_layer, shape.n_embd)


def synthesize(
    out_dir: str | os.PathLike,
    preset: str = "tiny",
    quants: tuple[str, ...] = ("f16",),
    seed: int = 0,
    force: bool = False,
    **sizes: int,
) -> list[Path]:
    """Make `<preset>-<quant>.gguf` files in out_dir; existing files are kept unless `force`.

    `sizes` override the preset's shape (n_embd=..., n_layer=..., ...).
    """
    shape = dataclasses.replace(PRESETS[preset], **{k: v for k, v in sizes.items() if v is not None})
    if shape.n_embd % 256 or shape.n_ff % 256:
        raise SynthError("n_embd and n_ff must be multiples of 256 (K-quant block size)")
    if shape.n_embd % shape.n_head or shape.n_head % shape.n_head_kv:
        raise SynthError("n_embd must divide by n_head, and n_head by n_head_kv")
    ftypes = quant_ftypes()
    unknown = [q for q in quants if q not in ftypes and q not in BASE_TYPES]
    if unknown:
        raise SynthError(f"unknown quant type(s): {', '.join(unknown)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"tuner-synth-{preset}"
    paths = [out / f"{preset}-{q}.gguf" for q in quants]
    todo = [(q, p) for q, p in zip(quants, paths) if force or not _current(p, shape)]
    if not todo:
        return paths
    base_type = "f32" if "f32" in quants else "f16"
    base = out / f"{preset}-{base_type}.gguf"
    keep_base = base_type in quants
    if force or not _current(base, shape):
        with files.atomic_path(base, suffix=".part", chmod=0o644) as tmp:
            write_base(tmp, shape, name, base_type, seed)
    from tuner.llama import quantize  # noqa: PLC0415 - loads llama_cpp: metadata-only callers never do

    for q, p in todo:
        if q in BASE_TYPES:
            continue
        with files.atomic_path(p, tmp=p.with_suffix(".gguf.part")) as part:
            quantize(base, part, ftypes[q])
    if not keep_base:
        base.unlink()
    return paths

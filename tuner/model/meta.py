"""GGUF metadata: what a model is, read with the `gguf` package, never touching tensor data.

Split models (`*-00001-of-0000N.gguf`) are read shard by shard and summed. Everything the rest of tuner
knows about a model file comes from `read_model()`; bad files raise `ModelError` with a one-line message.
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from tuner.errors import TunerError

GGUF_MAGIC = b"GGUF"
SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<idx>\d{5})-of-(?P<n>\d{5})\.gguf$")
LAYER_RE = re.compile(r"^blk\.(\d+)\.")
SUPPORTED_ARCHS = frozenset(gguf.MODEL_ARCH_NAMES.values()) - {"clip"}
# Expert tensors (routed): llama.cpp's LLM_FFN_EXPS_REGEX; shared experts are dense per layer.
EXPS_RE = re.compile(r"\.ffn_(up|down|gate|gate_up)_(ch|)exps")
# GGUF value types: fixed sizes of the scalars; 8 = string, 9 = array (gguf.GGUFValueType)
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
# The gguf reader walks arrays element by element in Python; a damaged count would make it loop over the
# whole file (hours and GBs of objects for a big model). Real headers hold < 2 M elements (vocab + merges).
MAX_ARRAY_ELEMENTS = 1 << 23
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_LAYERS = 4096  # llama.cpp allows 512 (LLAMA_MAX_LAYERS); bounded, with room


class ModelError(TunerError):
    """A model file tuner cannot use; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # ggml type name, e.g. Q4_K
    shape: tuple[int, ...]  # ggml ne order
    n_elements: int
    n_bytes: int
    layer: int | None  # blk.N, None for embeddings/output/norms
    group: str  # attn | ffn | exps | shexp | norm | embd | output | other
    offset: int = -1  # where its data starts in its file (bytes; -1: unknown)
    shard: int = 0  # which file of a split model holds it


@dataclass
class ModelInfo:
    path: str
    shards: list[str]
    file_size: int
    arch: str
    name: str
    file_type: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int | list[int]
    head_dim_k: int
    head_dim_v: int
    n_ff: int | list[int]
    n_vocab: int
    n_ctx_train: int
    n_expert: int = 0
    n_expert_used: int = 0
    n_expert_shared: int = 0
    kv_lora_rank: int = 0  # MLA (DeepSeek-2/3)
    rope_dim: int = 0
    sliding_window: int = 0
    n_params: int = 0
    content_hash: str = ""
    n_ff_exp: int = 0  # expert FFN width (expert_feed_forward_length); 0 = n_ff
    n_layer_dense_lead: int = 0  # DeepSeek: leading layers with a dense FFN
    header_bytes: int = 0  # metadata + tensor infos, summed over shards (what a re-quantized file keeps)
    alignment: int = 32
    kv_mla: bool = False  # MLA as llama.cpp runs it (key/value_length_mla present): the cache holds K only
    swa_pattern: int | list | None = None  # attention.sliding_window_pattern: a period or per-layer flags
    shortconv_l_cache: int = 0  # LFM2 short-convolution kernel length (recurrent state of l_cache - 1 columns)
    ssm: dict = field(default_factory=dict)  # Mamba-style state sizes: d_conv, d_inner, d_state, n_group
    n_layer_nextn: int = 0  # trailing NextN/MTP blocks: not part of the main context's KV cache
    tensors: list[TensorInfo] = field(default_factory=list, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    def head_kv(self, il: int) -> int:
        """KV heads of layer il (some models vary it per layer; 0 = a layer without attention)."""
        if isinstance(self.n_head_kv, list):
            return int(self.n_head_kv[il]) if il < len(self.n_head_kv) else int(self.n_head_kv[-1])
        return int(self.n_head_kv)

    def ff(self, il: int) -> int:
        if isinstance(self.n_ff, list):
            return int(self.n_ff[il]) if il < len(self.n_ff) else int(self.n_ff[-1])
        return int(self.n_ff or 0)

    def bytes_by_group(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.group] = out.get(t.group, 0) + t.n_bytes
        return out

    def layer_bytes(self) -> list[dict[str, int]]:
        """Per layer: bytes of attention, dense FFN, routed experts, shared experts and norms."""
        layers = [dict.fromkeys(("attn", "ffn", "exps", "shexp", "norm", "other"), 0) for _ in range(self.n_layer)]
        for t in self.tensors:
            if t.layer is not None and t.layer < self.n_layer:
                layers[t.layer][t.group] = layers[t.layer].get(t.group, 0) + t.n_bytes
        return layers

    def facts(self) -> dict:
        """The model columns of a trial row."""
        return {
            "model_size_bytes": self.file_size,
            "model_arch": self.arch,
            "model_name": self.name,
            "model_n_params": self.n_params,
            "model_n_layer": self.n_layer,
            "model_file_type": self.file_type,
            "model_hash": self.content_hash,
        }


def _group(name: str) -> str:
    if EXPS_RE.search(name):
        return "exps"
    if "_shexp" in name:
        return "shexp"
    if name.startswith("token_embd") or name.startswith("per_layer_token_embd"):
        return "embd"
    if name.startswith("output.") or name == "output":
        return "output"
    if "norm" in name:
        return "norm"
    if ".attn_" in name:
        return "attn"
    if ".ffn_" in name:
        return "ffn"
    return "other"


def shard_paths(path: Path) -> list[Path]:
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    n = int(m["n"])
    paths = [path.with_name(f"{m['prefix']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ModelError(f"split model {path.name}: missing shard(s) {', '.join(missing)}")
    return paths


def check_file(path: Path) -> None:
    """Cheap checks before the gguf reader: exists, a file, not empty, GGUF magic."""
    if not path.exists():
        raise ModelError(f"model not found: {path}")
    if path.is_dir():
        raise ModelError(f"model path is a directory, not a GGUF file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"model file is empty (0 bytes): {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"cannot read model {path}: {e.strerror}") from None
    if magic != GGUF_MAGIC:
        raise ModelError(f"not a GGUF file (no GGUF magic): {path}")


def scan_header(path: Path) -> None:
    """Walk the GGUF header with bounds checks before the gguf reader sees it.

    Every count and length must fit in the bytes that follow it, so a damaged header fails here in
    bounded time and memory instead of sending the reader into a file-sized loop.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        size = len(m)
        pos = 4
        n_elements = 0

        def bad(what: str):
            return ModelError(f"truncated or damaged GGUF header ({what} at byte {pos}): {path}")

        def take(n: int) -> int:
            nonlocal pos
            if n < 0 or n > size - pos:
                raise bad(f"{n} bytes needed, {size - pos} left")
            at, pos = pos, pos + n
            return at

        if size < 24:
            raise bad("file shorter than a GGUF header")
        version = struct.unpack_from("<I", m, 4)[0]
        e = ">" if version & 0xFFFF == 0 else "<"  # a big-endian file reads as version << 16 here

        def u32() -> int:
            return struct.unpack_from(e + "I", m, take(4))[0]

        def u64() -> int:
            return struct.unpack_from(e + "Q", m, take(8))[0]

        def array(itype: int, count: int) -> None:
            nonlocal n_elements
            n_elements += count
            if n_elements > MAX_ARRAY_ELEMENTS:
                raise bad(f"more than {MAX_ARRAY_ELEMENTS} array elements")
            if itype in _SCALAR_SIZE:
                take(count * _SCALAR_SIZE[itype])
            elif itype == _STRING:
                if count * 8 > size - pos:
                    raise bad(f"{count} strings cannot fit in {size - pos} bytes")
                for _ in range(count):
                    take(u64())
            else:
                raise bad(f"array of unsupported value type {itype}")

        u32()
        n_tensors, n_kv = u64(), u64()
        if n_kv * 13 > size - pos or n_tensors * 24 > size - pos:  # smallest KV / tensor-info entries
            raise bad(f"{n_kv} KV pairs and {n_tensors} tensors cannot fit in the file")
        for _ in range(n_kv):
            take(u64())  # key
            vtype = u32()
            if vtype in _SCALAR_SIZE:
                take(_SCALAR_SIZE[vtype])
            elif vtype == _STRING:
                take(u64())
            elif vtype == _ARRAY:
                itype = u32()
                array(itype, u64())
            else:
                raise bad(f"unknown value type {vtype}")
        for _ in range(n_tensors):
            take(u64())  # name
            n_dims = u32()
            if n_dims > MAX_DIMS:
                raise bad(f"tensor with {n_dims} dimensions")
            take(8 * n_dims + 4 + 8)  # dims, type, offset


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


class _MetaReader(gguf.GGUFReader):
    """The gguf package's reader, minus its per-element walk over big arrays.

    GGUFReader makes numpy views for every element of every array: a 129 k-token vocabulary plus merges
    costs seconds and hundreds of MB. Scalar arrays become one view (ReaderField.contents() still returns
    the whole list); string arrays (tokens, merges: never needed for planning) are stepped over and keep
    only their type and length parts.
    """

    SMALL = 256  # arrays up to this length keep the reader's own per-element parts

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type != gguf.GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        n = int(alen[0])
        if n <= self.SMALL:
            return super()._get_field_parts(orig_offs, raw_type)
        itype = gguf.GGUFValueType(int(raw_itype[0]))
        offs = orig_offs + 12
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:
            arr = self._get(offs, nptype, n)
            if arr.size != n:
                raise ValueError(f"array of {n} elements runs past the end of the file")
            return offs + int(arr.nbytes) - orig_offs, [raw_itype, alen, arr], [2], [raw_type, itype]
        if itype == gguf.GGUFValueType.STRING:
            fmt = ">Q" if self.byte_order == "S" else "<Q"
            size = len(self.data)
            for _ in range(n):
                if offs + 8 > size:
                    raise ValueError("string array runs past the end of the file")
                offs += 8 + struct.unpack_from(fmt, self.data, offs)[0]
            return offs - orig_offs, [raw_itype, alen], [], [raw_type, itype]
        return super()._get_field_parts(orig_offs, raw_type)


def _array_len(f) -> int:
    """Element count of an array field (parts: key length, key, type, item type, count, ...)."""
    return int(f.parts[4][0]) if f is not None and len(f.parts) > 4 else 0


def _reader(path: Path) -> gguf.GGUFReader:
    scan_header(path)
    try:
        return _MetaReader(path)
    except Exception as e:  # noqa: BLE001 - the gguf reader raises many types on damaged files
        raise ModelError(f"truncated or damaged GGUF ({type(e).__name__}: {str(e)[:120]}): {path}") from None


def content_hash(paths: list[Path], header_bytes: list[int]) -> str:
    """A fingerprint cheap enough for a 400 GB model: sizes, headers and 16 sampled 64 KiB blocks per shard."""
    h = hashlib.blake2b(digest_size=16)
    for p, hb in zip(paths, header_bytes):
        size = p.stat().st_size
        h.update(size.to_bytes(8, "little"))
        with open(p, "rb") as f:
            h.update(f.read(min(hb, 32 << 20)))
            for i in range(16):
                f.seek(hb + (size - hb) * i // 16)
                h.update(f.read(65536))
    return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _read_cached(path: str, mtime_ns: int, size: int) -> ModelInfo:
    try:
        return _read(Path(path))
    except ModelError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        # a damaged header can give any key a value of the wrong type (a string where a count belongs)
        msg = str(e).splitlines()[0][:100] if str(e) else ""
        raise ModelError(f"GGUF metadata has a value of the wrong type ({type(e).__name__}: {msg}): {path}") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_model(path: str | os.PathLike) -> ModelInfo:
    """Read a GGUF model's metadata (all shards of a split model). Raises ModelError on bad input."""
    p = Path(path)
    check_file(p)
    st = p.stat()
    return _read_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


def _read(path: Path) -> ModelInfo:
    shards = shard_paths(path)
    for s in shards[1:]:
        check_file(s)
    readers = [_reader(s) for s in shards]
    r0 = readers[0]
    arch = _field(r0, "general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"GGUF has no general.architecture: {path}")
    if arch not in SUPPORTED_ARCHS:
        raise ModelError(f"unsupported architecture {arch!r} (not a llama.cpp text model): {path}")

    def kv(key: str, default=None):
        return _field(r0, f"{arch}.{key}", default)

    tensors: list[TensorInfo] = []
    header_bytes = []
    for i, (s, r) in enumerate(zip(shards, readers)):
        size = s.stat().st_size
        header_bytes.append(r.data_offset)
        for t in r.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise ModelError(f"truncated GGUF: tensor {t.name} ends at byte {end}, file has {size}: {s}")
            m = LAYER_RE.match(t.name)
            tensors.append(
                TensorInfo(
                    t.name,
                    t.tensor_type.name,
                    tuple(int(x) for x in t.shape),
                    int(t.n_elements),
                    int(t.n_bytes),
                    int(m[1]) if m else None,
                    _group(t.name),
                    int(t.data_offset),
                    i,
                )
            )
    n_layer = kv("block_count")
    n_embd = kv("embedding_length")
    n_head = kv("attention.head_count")
    heads = n_head if isinstance(n_head, list) else [n_head]
    if not (_is_int(n_layer) and _is_int(n_embd) and heads and all(_is_int(h) for h in heads)):
        raise ModelError(f"GGUF lacks {arch}.block_count / embedding_length / attention.head_count: {path}")
    head0 = max(heads)
    # Bounds before anything is sized by them (layer_bytes makes n_layer entries).
    if not 1 <= n_layer <= MAX_LAYERS or n_embd < 1 or head0 < 1:
        raise ModelError(
            f"GGUF has implausible sizes (block_count {n_layer}, embedding_length {n_embd}, head_count {head0}): {path}"
        )
    n_head_kv = kv("attention.head_count_kv", n_head)
    head_dim_k = kv("attention.key_length", n_embd // max(head0, 1))
    head_dim_v = kv("attention.value_length", n_embd // max(head0, 1))
    tokens = r0.fields.get("tokenizer.ggml.tokens")
    n_vocab = kv("vocab_size") or _array_len(tokens)
    ftype = _field(r0, "general.file_type")
    try:
        ftype_name = gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_") if ftype is not None else "unknown"
    except ValueError:
        ftype_name = f"ftype{ftype}"
    return ModelInfo(
        path=str(path),
        shards=[str(s) for s in shards],
        file_size=sum(s.stat().st_size for s in shards),
        arch=arch,
        name=str(_field(r0, "general.name", path.stem)),
        file_type=ftype_name,
        n_layer=int(n_layer),
        n_embd=int(n_embd),
        n_head=int(head0),
        n_head_kv=n_head_kv,
        head_dim_k=int(head_dim_k),
        head_dim_v=int(head_dim_v),
        n_ff=kv("feed_forward_length", 0),
        n_vocab=int(n_vocab),
        n_ctx_train=int(kv("context_length", 0) or 0),
        n_expert=int(kv("expert_count", 0) or 0),
        n_expert_used=int(kv("expert_used_count", 0) or 0),
        n_expert_shared=int(kv("expert_shared_count", 0) or 0),
        kv_lora_rank=int(kv("attention.kv_lora_rank", 0) or 0),
        rope_dim=int(kv("rope.dimension_count", 0) or 0),
        sliding_window=int(kv("attention.sliding_window", 0) or 0),
        n_params=sum(t.n_elements for t in tensors),
        content_hash=content_hash(shards, header_bytes),
        tensors=tensors,
        n_ff_exp=int(kv("expert_feed_forward_length", 0) or 0),
        n_layer_dense_lead=int(kv("leading_dense_block_count", 0) or 0),
        header_bytes=sum(header_bytes),
        alignment=int(_field(r0, "general.alignment", 32) or 32),
        kv_mla=bool(kv("attention.key_length_mla", 0) and kv("attention.value_length_mla", 0)),
        swa_pattern=kv("attention.sliding_window_pattern"),
        shortconv_l_cache=int(kv("shortconv.l_cache", 0) or 0),
        ssm={
            k: int(kv(f"ssm.{k}", 0) or 0)
            for k in ("conv_kernel", "inner_size", "state_size", "group_count")
            if kv(f"ssm.{k}") is not None
        },
        n_layer_nextn=int(kv("nextn_predict_layers", 0) or 0),
    )


def tokenizer_hash(path: str | os.PathLike) -> str:
    """A fingerprint of the tokenizer: the raw bytes of every `tokenizer.ggml.*` key (vocabulary, scores, types,
    merges, special ids). Quants of one model share it; a model with another tokenizer does not."""
    p = Path(path)
    check_file(p)
    st = p.stat()
    return _tokenizer_hash(str(p.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _tokenizer_hash(path: str, mtime_ns: int, size: int) -> str:
    r = _reader(Path(path))
    # Fields lie back to back in file order: each one ends where the next begins (the last one where the
    # tensor infos begin), so a field's bytes are known without parsing its strings.
    fields = list(r.fields.values())
    ends = [f.offset for f in fields[1:]] + [r.tensors[0].field.offset if r.tensors else r.data_offset]
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for fld, end in zip(fields, ends):
            if fld.name.startswith("tokenizer.ggml."):
                f.seek(fld.offset)
                h.update(f.read(end - fld.offset))
    return h.hexdigest()

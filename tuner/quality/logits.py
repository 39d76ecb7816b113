"""The reference logits file (.npz), what identifies it, and the inputs of a reference: the text, the file.

Written by the reference pass (tuner/quality/evaluate.py), read by every comparison pass and by `tuner quality
--reference-logits`; see tuner/quality/__init__.py's docstring for what the summary holds.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from tuner import files
from tuner.errors import TunerError
from tuner.model.meta import ModelInfo, tokenizer_hash
from tuner.quality.kld import KLD_CUTOFF

FORMAT = "tuner-reference-logits"
FORMAT_VERSION = 1
DEFAULT_TEXT = "quality-text.txt"


class QualityError(TunerError):
    """Bad input for a quality measurement: one line naming the problem."""


@dataclass
class ReferenceLogits:
    """A reference's summary on one text (see the module docstring). `header` identifies model, text and ctx.

    File: numpy .npz with `header` (a JSON string), `tokens` (int32, n_chunk × ctx, before BOS replacement),
    `ids` (int32, positions × k), `logp` (float32, positions × k), `tail` and `nll` (float64, positions).
    Positions are chunk-major: chunk c holds rows c·(ctx-1-ctx//2) onwards.
    """

    header: dict
    tokens: np.ndarray
    ids: np.ndarray
    logp: np.ndarray
    tail: np.ndarray
    tail_ids: np.ndarray
    tail_logp: np.ndarray
    nll: np.ndarray

    ARRAYS = ("tokens", "ids", "logp", "tail", "tail_ids", "tail_logp", "nll")

    @property
    def ctx(self) -> int:
        return int(self.header["ctx"])

    @property
    def n_chunk(self) -> int:
        return len(self.tokens) // self.ctx

    def chunk(self, c: int) -> dict[str, np.ndarray]:
        per = per_chunk(self.ctx)
        s = slice(c * per, (c + 1) * per)
        return {k: getattr(self, k)[s] for k in self.ARRAYS if k != "tokens"}

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (a complete temp file renamed into place): a reader never sees half a file."""
        with files.atomic_file(path, chmod=files.default_mode(), fsync=True) as f:
            np.savez(
                f,
                header=np.array(json.dumps(self.header, sort_keys=True)),
                **{k: getattr(self, k) for k in self.ARRAYS},
            )

    @classmethod
    def read_header(cls, path: str | os.PathLike) -> dict:
        return cls._open(path, header_only=True).header

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceLogits":
        return cls._open(path, header_only=False)

    @classmethod
    def _open(cls, path, header_only: bool) -> "ReferenceLogits":
        p = Path(path)
        if not p.is_file():
            raise QualityError(f"reference logits file not found: {p}")
        try:
            with np.load(p, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
                    raise QualityError(f"{p} is not a tuner reference logits file (format {FORMAT} v{FORMAT_VERSION})")
                if header_only:
                    return cls(header, *(np.empty(0),) * len(cls.ARRAYS))
                ref = cls(header, *(z[k] for k in cls.ARRAYS))
        except QualityError:
            raise
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise QualityError(f"{p} is not a tuner reference logits file ({type(e).__name__})") from None
        per = per_chunk(ref.ctx)
        if (
            len(ref.tokens) % ref.ctx
            or len(ref.nll) != ref.n_chunk * per
            or ref.ids.shape != ref.logp.shape
            or ref.tail_ids.shape != ref.tail_logp.shape
        ):
            raise QualityError(f"{p} is damaged: its arrays do not match its header (ctx {ref.ctx})")
        return ref


def per_chunk(ctx: int) -> int:
    """Scored positions per chunk: first = ctx//2 .. ctx-2."""
    return ctx - 1 - ctx // 2


def reference_header(
    info: ModelInfo,
    text_hash: str,
    text_name: str,
    ctx: int,
    top_k: int,
    tail_samples: int = 0,
    type_k: str = "f16",
    type_v: str = "f16",
) -> dict:
    """What identifies a reference summary: model (arch, vocabulary, tokenizer), text, ctx, top-k, KV types."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "arch": info.arch,
        "n_vocab": info.n_vocab,
        "tokenizer_hash": tokenizer_hash(info.path),
        "model_hash": info.content_hash,
        "model_file": Path(info.path).name,
        "model_name": info.name,
        "file_type": info.file_type,
        "text_hash": text_hash,
        "text_name": text_name,
        "ctx": ctx,
        "top_k": top_k,
        "tail_samples": tail_samples,
        "type_k": type_k,
        "type_v": type_v,
        "kld_cutoff": KLD_CUTOFF,
    }


def check_model(header: dict, info: ModelInfo, source: str) -> None:
    """Refuse a model that cannot be compared with this reference (other architecture or tokenizer)."""
    name = Path(info.path).name
    if header["arch"] != info.arch:
        raise QualityError(f"{name} is a {info.arch} model but the reference ({source}) is {header['arch']}")
    if header["n_vocab"] != info.n_vocab:
        raise QualityError(
            f"{name} has a vocabulary of {info.n_vocab} tokens but the reference ({source}) has {header['n_vocab']}"
        )
    if header["tokenizer_hash"] != tokenizer_hash(info.path):
        raise QualityError(
            f"{name} has another tokenizer than the reference ({source}): same vocabulary size, different tokens"
        )


def default_text_path() -> Path:
    return Path(str(resources.files("tuner") / "data" / DEFAULT_TEXT))


def read_text(path: str | os.PathLike | None) -> tuple[Path, str]:
    """(path, hash) of the text; raises QualityError for a missing, empty or non-UTF-8 file."""
    p = Path(path) if path else default_text_path()
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise QualityError(f"text file not found: {p}") from None
    except IsADirectoryError:
        raise QualityError(f"text path is a directory: {p}") from None
    except OSError as e:
        raise QualityError(f"cannot read text file {p}: {e.strerror}") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QualityError(f"text file is not UTF-8 (byte {e.start}): {p}") from None
    if not data.strip():
        raise QualityError(f"text file is empty: {p}")
    return p, hashlib.blake2b(data, digest_size=16).hexdigest()


def bits_per_weight(info: ModelInfo) -> float:
    n = sum(t.n_elements for t in info.tensors)
    return 8.0 * sum(t.n_bytes for t in info.tensors) / n if n else 0.0


def pick_reference(infos: list[ModelInfo]) -> ModelInfo:
    """The highest-precision file: most bits per weight over its tensors (F32 > BF16/F16 > Q8_0 > ... ); the
    first given wins a tie."""
    return max(infos, key=bits_per_weight)

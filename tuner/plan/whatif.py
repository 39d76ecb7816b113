"""What-if quants: the size of a model in other quant types, as llama.cpp's quantizer would type each tensor
(llama-quant.cpp, no imatrix), from the GGUF header alone: `tuner estimate --what-if q8_0,q4_k_m`.
"""

from __future__ import annotations

import gguf

from tuner.errors import TunerError
from tuner.model.meta import ModelInfo
from tuner.plan.planner import pad, type_bytes

ATTN_V_LIKE = ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight")
NO_QUANT_SUBSTR = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "time_mix_",
    "attn_rel_b.weight",
    "position_embd",
    "token_types.weight",
    "pos_embd.weight",
)
DEFAULT_TYPE = {  # llama_ftype_get_default_type
    "Q4_0": "Q4_0",
    "Q4_1": "Q4_1",
    "Q5_0": "Q5_0",
    "Q5_1": "Q5_1",
    "Q8_0": "Q8_0",
    "F16": "F16",
    "BF16": "BF16",
    "ALL_F32": "F32",
    "Q2_K_S": "Q2_K",
    "Q2_K": "Q2_K",
    "IQ3_XS": "IQ3_S",
    "Q3_K_S": "Q3_K",
    "Q3_K_M": "Q3_K",
    "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K",
    "Q4_K_M": "Q4_K",
    "Q5_K_S": "Q5_K",
    "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K",
    "TQ1_0": "TQ1_0",
    "TQ2_0": "TQ2_0",
    "IQ2_XXS": "IQ2_XXS",
    "IQ2_XS": "IQ2_XS",
    "IQ2_S": "IQ2_XS",
    "IQ2_M": "IQ2_S",
    "IQ3_XXS": "IQ3_XXS",
    "IQ1_S": "IQ1_S",
    "IQ1_M": "IQ1_M",
    "IQ4_NL": "IQ4_NL",
    "IQ4_XS": "IQ4_XS",
    "IQ3_S": "IQ3_S",
    "IQ3_M": "IQ3_S",
    "MXFP4_MOE": "MXFP4",
}
FALLBACK = {
    "IQ1_S": "IQ4_NL",
    "IQ1_M": "IQ4_NL",
    "IQ2_XXS": "IQ4_NL",
    "IQ2_XS": "IQ4_NL",
    "IQ2_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL",
    "IQ3_S": "IQ4_NL",
    "IQ4_XS": "IQ4_NL",
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "TQ1_0": "Q4_0",
    "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}
LOW_IQ = {"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"}


class QuantTypeError(TunerError):
    """A quant type llama.cpp's quantizer does not know (`--what-if q9_k`)."""


def ftype_names() -> list[str]:
    return [k.lower() for k in DEFAULT_TYPE if k != "ALL_F32"] + ["f32"]


def ftype_key(name: str) -> str:
    key = name.strip().upper()
    key = "ALL_F32" if key == "F32" else key
    if key not in DEFAULT_TYPE:
        raise QuantTypeError(f"unknown quant type {name!r} (known: {', '.join(ftype_names())})")
    return key


def _blck(type_name: str) -> int:
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]


def _is_quantized(type_name: str) -> bool:
    return type_name not in ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def quant_types(info: ModelInfo, ftype: str) -> dict[str, str]:
    """The ggml type llama.cpp's quantizer gives each tensor for `ftype` (llama-quant.cpp, no imatrix)."""
    ft = ftype_key(ftype)
    default = DEFAULT_TYPE[ft]
    names = sorted(t.name for t in info.tensors)  # llama.cpp walks its weights map, sorted by name
    by_name = {t.name: t for t in info.tensors}
    n_attn_v = sum(1 for n in names if any(k in n for k in ATTN_V_LIKE))
    tied = "output.weight" not in by_name
    n_head_kv = max(info.head_kv(0), 1)
    gqa = info.n_head // n_head_kv
    n_exp = info.n_expert
    n_layer = info.n_layer
    i_v = i_down = i_gate = i_up = 0
    out: dict[str, str] = {}
    for name in names:
        t = by_name[name]
        if not _q_allowed(t, name):
            out[name] = t.type  # norms, router, 1-D tensors: copied as they are
            continue
        if not _is_quantized(default):
            out[name] = default
            continue
        new = default

        def layer_of(counter):
            return t.layer if n_exp > 1 and t.layer is not None else counter

        is_output = name == "output.weight" or (tied and name == "token_embd.weight")
        if is_output:
            if ft == "MXFP4_MOE" or info.arch == "falcon" or t.shape[0] % _blck(new):
                new = "Q8_0"
            elif ft in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
                new = "Q5_K"
            elif new != "Q8_0":
                new = "Q6_K"
        elif ft == "MXFP4_MOE":
            new = "MXFP4" if len(t.shape) > 2 and t.shape[2] > 1 else "Q8_0"
        elif name in ("token_embd.weight", "per_layer_token_embd.weight"):
            if ft in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
                new = "Q2_K"
            elif ft in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
                new = "IQ3_S"
            elif ft in ("TQ1_0", "TQ2_0"):
                new = "Q4_K"
        elif ft in LOW_IQ:
            if any(k in name for k in ATTN_V_LIKE):
                if gqa >= 4 or n_exp >= 4:
                    new = "Q4_K"
                else:
                    new = "IQ3_S" if ft in ("IQ2_S", "IQ2_M") else "Q2_K"
                i_v += 1
            elif n_exp == 8 and "attn_k.weight" in name:
                new = "Q4_K"
            elif "ffn_down" in name:
                if i_down < n_layer // 8:
                    new = "IQ3_S" if ft in ("IQ2_S", "IQ2_M") else "Q2_K"
                i_down += 1
            elif "attn_output.weight" in name:
                if n_exp == 8:
                    new = "Q5_K"
                elif ft in ("IQ1_S", "IQ1_M"):
                    new = "IQ2_XXS"
                elif ft in ("IQ2_S", "IQ2_M"):
                    new = "IQ3_S"
        elif any(k in name for k in ATTN_V_LIKE):
            if ft == "Q2_K":
                new = "Q4_K" if gqa >= 4 else "Q3_K"
            elif ft == "Q2_K_S" and gqa >= 4:
                new = "Q4_K"
            elif ft == "IQ3_XXS":
                new = "Q4_K" if gqa >= 4 else "IQ3_S"
            elif ft in ("IQ3_XS", "IQ3_S") and gqa >= 4:
                new = "Q4_K"
            elif ft == "IQ3_M":
                new = "Q4_K"
            elif ft == "Q3_K_M":
                new = "Q5_K" if i_v < 2 else "Q4_K"
            elif ft == "Q3_K_L":
                new = "Q5_K"
            elif ft in ("IQ4_NL", "IQ4_XS") and gqa >= 4:
                new = "Q5_K"
            elif ft in ("Q4_K_M", "Q5_K_M") and _more_bits(i_v, n_attn_v):
                new = "Q6_K"
            elif ft == "Q4_K_S" and i_v < 4:
                new = "Q5_K"
            if info.arch == "llama" and n_layer == 80 and new in ("Q3_K", "Q4_K"):
                new = "Q5_K"  # LLM_TYPE_70B: attn_v is 8x smaller than attn_q, give it more bits
            if n_exp == 8:
                new = "Q8_0"
            i_v += 1
        elif "attn_k.weight" in name:
            if n_exp == 8:
                new = "Q8_0"
            elif ft == "IQ3_XS":
                new = "IQ3_XXS"
            elif ft == "IQ3_XXS":
                new = "IQ2_S"
        elif "attn_q.weight" in name:
            if ft == "IQ3_XS":
                new = "IQ3_XXS"
            elif ft == "IQ3_XXS":
                new = "IQ2_S"
        elif "attn_output.weight" in name:
            if info.arch != "falcon":
                if n_exp == 8:
                    if ft in (
                        "Q2_K",
                        "IQ3_XS",
                        "IQ3_XXS",
                        "Q3_K_S",
                        "Q3_K_M",
                        "IQ4_NL",
                        "Q4_K_S",
                        "Q4_K_M",
                        "IQ3_S",
                        "IQ3_M",
                        "IQ4_XS",
                    ):
                        new = "Q5_K"
                else:
                    new = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(
                        ft, new
                    )
            elif ft == "Q3_K_L":
                new = "Q4_K"
        elif "ffn_up" in name:
            il = layer_of(i_up)
            if ft == "IQ3_XS" and n_layer // 8 <= il < 7 * n_layer // 8:
                new = "IQ3_XXS"
            i_up += 1
        elif "ffn_gate" in name:
            il = layer_of(i_gate)
            if ft == "IQ3_XS" and n_layer // 8 <= il < 7 * n_layer // 8:
                new = "IQ3_XXS"
            i_gate += 1
        elif "ffn_down" in name:
            il = layer_of(i_down)
            falcon = info.arch == "falcon"
            if ft == "Q2_K":
                new = "Q3_K"
            elif ft == "Q2_K_S":
                if il < n_layer // 8:
                    new = "Q4_K"
            elif ft == "IQ3_XXS":
                new = "Q4_K" if il < n_layer // 8 else "Q3_K"
            elif ft == "Q3_K_M":
                new = "Q5_K" if il < n_layer // 16 else ("Q4_K" if not falcon or _more_bits(il, n_layer) else "Q3_K")
            elif ft == "IQ3_M" and (il < n_layer // 8 or (n_exp == 8 and _more_bits(il, n_layer))):
                new = "Q4_K"
            elif ft == "Q3_K_L":
                new = "Q4_K" if falcon else "Q5_K"
            elif ft == "Q4_K_M":
                if falcon:
                    new = "Q6_K" if il < n_layer // 16 else ("Q5_K" if _more_bits(il, n_layer) else "Q4_K")
                elif _more_bits(il, n_layer):
                    new = "Q6_K"
            elif il < n_layer // 8 and ft in ("IQ4_NL", "IQ4_XS"):
                new = "Q5_K"
            elif ft == "Q5_K_M" and _more_bits(il, n_layer):
                new = "Q6_K"
            elif ft == "Q4_K_S" and not falcon and il < n_layer // 8:
                new = "Q5_K"
            i_down += 1
        if _is_quantized(new) and t.shape[0] % _blck(new):
            fb = FALLBACK.get(new, "F16")
            new = fb if t.shape[0] % _blck(fb) == 0 else "F16"
        out[name] = new
    return out


def _q_allowed(t, name: str) -> bool:
    return len(t.shape) >= 2 and name.endswith("weight") and not any(s in name for s in NO_QUANT_SUBSTR)


def quant_size(info: ModelInfo, ftype: str) -> int:
    """Bytes of the file llama.cpp's quantizer would write for this model in `ftype`."""
    types = quant_types(info, ftype)
    al = info.alignment or 32
    data = sum(pad(type_bytes(types[t.name], t.n_elements), al) for t in info.tensors)
    # the header keeps the same keys and tensor infos
    return pad(info.header_bytes, al) + data


def what_if(info: ModelInfo, ftypes: list[str]) -> list[dict]:
    """One row per quant type: predicted file size and bits per weight."""
    rows = []
    for ft in ftypes:
        size = quant_size(info, ft)
        rows.append(
            {
                "quant": ft.lower(),
                "size_bytes": size,
                "bpw": 8 * (size - info.header_bytes) / max(info.n_params, 1),
                "vs_current": size / info.file_size if info.file_size else None,
            }
        )
    return rows

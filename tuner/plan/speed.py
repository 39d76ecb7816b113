"""Speed before download: predicted tg and pp t/s of a model (or a what-if quant of it) on this rig.

A token costs what its tensors cost on the kernels that run them. `terms` counts, per (backend, ggml type),
the bytes read to generate one token (tg: every weight in use once, MoE only the routed experts in use, the
embedding one row, the KV cache filled so far) and the multiply-adds of a prompt token (pp: 2 FLOP per weight
in use; the output matrix runs once per batch, since only the last token's logits are computed). The rig probe
(tuner.plan.probe) measured, per type and thread count, seconds per byte (tg) and per FLOP (pp) of llama.cpp's
kernels on one-type models beyond the caches, plus a fixed cost per layer and per token (graph launch, thread
barriers) and one per matrix row a token computes (a dot product's setup and reduction), and what routed experts cost
beyond their weights (measured on a MoE: the routing per MoE layer and
token in tg, the expert matrix products' efficiency at the few rows each expert gets in pp); `predict` adds
them up. It is a prediction of what `tuner bench` would measure, not a bound.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import gguf

from tuner.model.meta import ModelInfo
from tuner.plan import placement, planner, whatif
from tuner.record import TrialConfig

HOST, DEVICE = "cpu", "gpu"
KV_TYPE = {
    "f16": "F16",
    "bf16": "BF16",
    "f32": "F32",
    "q8_0": "Q8_0",
    "q4_0": "Q4_0",
    "q4_1": "Q4_1",
    "q5_0": "Q5_0",
    "q5_1": "Q5_1",
    "iq4_nl": "IQ4_NL",
}
# llama.cpp hands a host weight's matrix multiply to the GPU (copying the weight over the link) from this batch
# size on (ggml-cuda's offload_op: get_op_batch_size >= 32)
OP_OFFLOAD_MIN_BATCH = 32


def tensor_types(info: ModelInfo, quant: str | None = None) -> dict[str, str]:
    """name → ggml type: the file's own, or what `quant` would make of it. Raises ValueError on a bad quant."""
    if quant is None:
        return {t.name: t.type for t in info.tensors}
    return whatif.quant_types(info, quant)


@dataclass
class Terms:
    """What one token costs, by (backend, ggml type): the counts the probe's figures multiply."""

    tg_bytes: dict = field(default_factory=lambda: defaultdict(float))  # bytes read per generated token
    pp_flops: dict = field(default_factory=lambda: defaultdict(float))  # FLOP per prompt token (batch work)
    out_bytes: dict = field(default_factory=lambda: defaultdict(float))  # read once per prompt batch
    link_bytes: float = 0.0  # host weights a GPU build copies to the device per prompt batch (op offload)
    # blocks that compute on each backend: a block whose experts stay in RAM (--n-cpu-moe) counts on both, since
    # the host runs part of it, with its own graph split and thread barriers
    layers: dict = field(default_factory=lambda: defaultdict(int))
    # the routed experts' share of pp_flops, and the MoE layers per backend (where their experts are)
    exp_pp_flops: dict = field(default_factory=lambda: defaultdict(float))
    moe_layers: dict = field(default_factory=lambda: defaultdict(int))
    # matrix rows computed per generated token, per backend (MoE: the routed experts'), and the output matrix's
    # (once per prompt batch): each row costs a dot product's setup and its reduction beyond its bytes, which a
    # short row (Gemma's 640-wide output over a 262k vocabulary) does not amortize
    rows: dict = field(default_factory=lambda: defaultdict(float))
    out_rows: dict = field(default_factory=lambda: defaultdict(float))


def _bytes(type_name: str, n_elements: int) -> int:
    return planner.type_bytes(type_name, n_elements)


def terms(info: ModelInfo, cfg: TrialConfig, types: dict[str, str] | None = None, gpu_offload: bool = False) -> Terms:
    """Per-token work of `info` (in `types`, default the file's) placed as llama.cpp places it for cfg."""
    types = types or tensor_types(info)
    host, _ = placement.placement(cfg, info, gpu_offload)
    start, out_gpu, _ = placement.gpu_layer_start(info, cfg.n_gpu_layers, gpu_offload)
    tied = not any(t.name.startswith("output.weight") for t in info.tensors)
    frac = info.n_expert_used / info.n_expert if info.n_expert else 1.0
    out = Terms()
    n_prompt = max(cfg.n_prompt, 1)
    computes: dict = defaultdict(set)  # backend -> blocks with a weight matrix there
    experts: dict = defaultdict(set)  # backend -> blocks whose routed experts are there
    for t, on_host in zip(info.tensors, host):
        where = HOST if on_host else DEVICE
        ty = types.get(t.name, t.type)
        full = _bytes(ty, t.n_elements)
        n_rows = t.n_elements // t.shape[0] if len(t.shape) >= 2 and t.shape[0] else 0
        if t.group == "embd" and t.name.startswith("token_embd"):
            out.tg_bytes[(where, ty)] += full // max(info.n_vocab, 1)  # a row lookup
            if tied:  # the output matrix is the embedding: read whole per token, once per prompt batch
                # llama.cpp keeps the input layer on the CPU, but a tied output goes with the output layer
                ow = DEVICE if out_gpu else HOST
                out.tg_bytes[(ow, ty)] += full
                out.out_bytes[(ow, ty)] += full
                out.rows[ow] += n_rows
                out.out_rows[ow] += n_rows
            continue
        if t.group == "output" and len(t.shape) >= 2:
            out.tg_bytes[(where, ty)] += full
            out.out_bytes[(where, ty)] += full
            out.rows[where] += n_rows
            out.out_rows[where] += n_rows
            continue
        active = frac if t.group == "exps" else 1.0
        out.tg_bytes[(where, ty)] += full * active
        if len(t.shape) >= 2:
            out.rows[where] += n_rows * active
            if t.layer is not None:
                computes[where].add(t.layer)
            out.pp_flops[(where, ty)] += 2.0 * t.n_elements * active
            if t.group == "exps":
                out.exp_pp_flops[(where, ty)] += 2.0 * t.n_elements * active
                experts[where].add(t.layer)
            if where == HOST and gpu_offload and n_prompt >= OP_OFFLOAD_MIN_BATCH:
                # with a GPU present a host matrix still runs on the GPU for a batch: copied over per batch
                out.link_bytes += full / n_prompt
    # attention: the KV cache read per generated token (tg) and the score/value products per prompt token (pp)
    cells = cfg.n_depth + cfg.n_gen // 2 + 1  # mean fill over the tg test, as the roofline counts it
    kv_type = KV_TYPE.get(cfg.type_k, "F16")
    for il in range(info.n_layer):
        where = HOST if il < start else DEVICE
        computes[where].add(il)  # attention and its KV cache live with the block
        out.tg_bytes[(where, kv_type)] += planner.kv_layer_bytes(cfg, info, il, cells=cells)
        n_kv = cfg.n_depth + n_prompt / 2
        if planner.is_swa(info, il) and info.sliding_window:
            n_kv = min(n_kv, info.sliding_window)
        heads = info.n_head if isinstance(info.n_head, int) else max(info.n_head)
        out.pp_flops[(where, kv_type)] += 2.0 * heads * (info.head_dim_k + info.head_dim_v) * n_kv
    out.layers.update({where: len(blocks) for where, blocks in computes.items()})
    out.moe_layers.update({where: len(blocks) for where, blocks in experts.items()})
    return out


# -- the probe's figures -------------------------------------------------------------------------------------


def _bpw(type_name: str) -> float:
    blck, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return 8 * size / blck


def rate(fig: dict, key: str, type_name: str, unprobed: set) -> float:
    """Seconds per byte (or FLOP) of a type; a type the probe did not measure borrows the figure of the probed
    type closest in bits per weight, and is reported."""
    table = fig[key]
    if type_name not in table and type_name != "F32":  # F32 holds only norms and biases: not worth a report
        unprobed.add(type_name)
    return table[nearest(table, type_name)]


def nearest(table: dict, type_name: str) -> str:
    """The probed type whose figure `type_name` uses: itself, else the closest in bits per weight."""
    if type_name in table:
        return type_name
    try:
        want = _bpw(type_name)
        return min(table, key=lambda k: abs(_bpw(k) - want))
    except KeyError:
        return "F16" if "F16" in table else next(iter(table))


def figures(probe: dict, backend: str, threads: int) -> dict | None:
    """The probe's fitted figures at `threads`, interpolated between the thread counts it measured (throughput,
    i.e. 1/seconds, is interpolated; beyond the last one measured it is held)."""
    fits = probe.get(backend)
    if not fits:
        return None
    if backend == DEVICE:
        return fits
    counts = sorted(int(k) for k in fits)
    if threads in counts:
        return fits[str(threads)]
    lo = max([c for c in counts if c <= threads], default=counts[0])
    hi = min([c for c in counts if c >= threads], default=counts[-1])
    if lo == hi:
        return fits[str(lo)]
    a, b = fits[str(lo)], fits[str(hi)]
    w = (threads - lo) / (hi - lo)

    def mix(x, y):  # interpolate speeds, not times
        return 1.0 / ((1 - w) / x + w / y) if x > 0 and y > 0 else (1 - w) * x + w * y

    out = {}
    for k, v in a.items():
        if isinstance(v, dict):
            out[k] = {t: mix(v[t], b[k][t]) for t in v if t in b[k]}
        elif isinstance(v, (int, float)):
            out[k] = mix(v, b[k])
    return out


@dataclass
class SpeedPrediction:
    pred_tg_tps: float | None
    pred_pp_tps: float | None
    threads: int
    n_gpu_layers: int
    unprobed_types: list[str]
    note: str = ""

    def to_dict(self) -> dict:
        return {
            "pred_tg_tps": self.pred_tg_tps,
            "pred_pp_tps": self.pred_pp_tps,
            "threads": self.threads,
            "n_gpu_layers": self.n_gpu_layers,
            "unprobed_types": self.unprobed_types,
            "note": self.note,
        }


def predict(
    info: ModelInfo,
    probe: dict,
    threads: int,
    quant: str | None = None,
    n_gpu_layers: int = 0,
    n_cpu_moe: int = 0,
    cpu_moe: bool = False,
    n_prompt: int | None = None,
    n_gen: int | None = None,
    gpu_offload: bool = False,
) -> SpeedPrediction:
    """tg and pp t/s `tuner bench` would measure for this model (or its `quant` what-if) at this config.

    Predicts nothing (None, with a note) for an architecture the planner does not model, and for GPU layers
    when the probe has no GPU figures."""
    shape = probe.get("shape", {})
    n_prompt = n_prompt or shape.get("n_prompt", 128)
    n_gen = n_gen or shape.get("n_gen", 32)
    ngl = n_gpu_layers if gpu_offload else 0
    none = SpeedPrediction(None, None, threads, ngl, [])
    note = planner.unmodelled_note(info)
    if note:
        none.note = f"no speed prediction: {note}"
        return none
    cfg = TrialConfig(
        model=info.path,
        n_gpu_layers=ngl,
        n_cpu_moe=n_cpu_moe,
        cpu_moe=cpu_moe,
        n_prompt=n_prompt,
        n_gen=n_gen,
        n_threads=threads,
    )
    tm = terms(info, cfg, tensor_types(info, quant), gpu_offload)
    cpu = figures(probe, HOST, threads)
    gpu = figures(probe, DEVICE, threads) if gpu_offload else None
    # a GPU build multiplies a prompt batch's host matrices on the GPU too (tm.link_bytes): that needs its figures
    if (any(w == DEVICE for w, _ in tm.tg_bytes) or tm.link_bytes) and gpu_offload and gpu is None:
        none.note = (
            "no speed prediction for GPU layers: the probe has no GPU figures (run `tuner probe` on a GPU build)"
        )
        return none
    unprobed: set = set()
    tg = pp = 0.0
    probe_np = shape.get("n_prompt", 128)
    for backend, fig in ((HOST, cpu), (DEVICE, gpu)):
        if fig is None:
            continue
        tg += sum(b * rate(fig, "tg_s_per_byte", ty, unprobed) for (w, ty), b in tm.tg_bytes.items() if w == backend)
        tg += tm.moe_layers.get(backend, 0) * fig.get("tg_moe_layer_s", 0.0)  # routing: top-k, gathers, sums
        tg += tm.rows.get(backend, 0.0) * fig.get("tg_s_per_row", 0.0)
        # the fixed costs belong to a backend that runs layers or the output matrix (not a lone embedding row)
        active = tm.layers.get(backend, 0) > 0 or any(w == backend for w, _ in tm.out_bytes)
        if not active:
            continue
        tg += tm.layers.get(backend, 0) * fig["tg_layer_s"] + fig["tg_fixed_s"]
        # a GPU build multiplies a prompt batch's host matrices on the GPU too (their copy is the link term)
        pp_fig = gpu if backend == HOST and tm.link_bytes else fig
        pp += sum(f * rate(pp_fig, "pp_s_per_flop", ty, unprobed) for (w, ty), f in tm.pp_flops.items() if w == backend)
        # an expert's product (mul_mat_id) gets only the rows routed to it, and no tiled GEMM: the probe's factor
        pp += (pp_fig.get("pp_moe_factor", 1.0) - 1.0) * sum(
            f * rate(pp_fig, "pp_s_per_flop", ty, unprobed) for (w, ty), f in tm.exp_pp_flops.items() if w == backend
        )
        pp += (
            sum(b * rate(fig, "tg_s_per_byte", ty, unprobed) for (w, ty), b in tm.out_bytes.items() if w == backend)
            + tm.out_rows.get(backend, 0.0) * fig.get("tg_s_per_row", 0.0)
        ) / n_prompt
        # the fixed costs are per batch, fitted per token at the probe's prompt length
        pp += (tm.layers.get(backend, 0) * fig["pp_layer_s"] + fig["pp_fixed_s"]) * probe_np / n_prompt
    if tm.link_bytes and gpu is not None:
        pp += tm.link_bytes / gpu["link_bytes_per_s"]
    return SpeedPrediction(1.0 / tg if tg > 0 else None, 1.0 / pp if pp > 0 else None, threads, ngl, sorted(unprobed))


def rows(info: ModelInfo, probe: dict, quants: list[str], threads: int, **config) -> list[dict]:
    """One row per quant (the file itself first, as its file type): predicted tg and pp t/s."""
    out = []
    for q in [None, *quants]:
        p = predict(info, probe, threads, quant=q, **config)
        out.append({"quant": (q or info.file_type).lower(), "file": q is None, **p.to_dict()})
    return out

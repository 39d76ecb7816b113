"""The compute buffer each llama.cpp device reserves, from the placement of a model's tensors (tuner.plan.placement).

llama_context::graph_reserve builds the worst-case graph (a full ubatch of T tokens, every one an output) and hands
it to ggml's scheduler (ggml/src/ggml-backend.cpp, ggml_backend_sched_split_graph): an op runs on the backend that
holds its weights (RPC has no `offload_op`, so an op whose weights are in host memory stays on the CPU), ops without
weights follow their neighbours (the GPU expansions), and a source computed on another backend is copied into the
split's backend as a split input. ggml-alloc.c (ggml_gallocr) then sizes one buffer per backend: each node's
tensor is allocated when it is computed, best fit, in its parent's place when the op can work in place, and freed
after its last consumer; with pipeline parallelism the split inputs are flagged input + output and never freed.
So a device's buffer is the widest set of its tensors alive at once: `device_buffers` takes the widest phase.

The host's buffer (`host_buffer`): the graph's inputs are the CPU backend's (ggml_backend_sched_split_graph
gives every input tensor the last backend), so with every layer on the devices it holds the token embeddings and
the KQ masks (N_COPIES of them with pipeline parallelism), plus what it computes itself: routed experts in host
memory, or whole layers (tuner.plan.planner.compute_raw). benchmarks/device_oracle.py checks every device's
figure and the host's against llama.cpp's on RPC devices.
"""

from __future__ import annotations

import re

from tuner.model.meta import ModelInfo
from tuner.record import TrialConfig

N_COPIES = 4  # ggml-backend.cpp GGML_SCHED_MAX_COPIES: input copies with pipeline parallelism
UP_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate_)?up(_exps)?\.")
DOWN_EXPS_RE = re.compile(r"^blk\.(\d+)\.ffn_down_exps\.")


def mask_bytes(cells: set[int], n_tok: int, fa: bool) -> int:
    """The KQ masks for layers with these KV cell counts (one per distinct count; 0: no KV cache): n_tok rows,
    f16 with flash attention, else f32."""
    return sum(c * n_tok * (2 if fa else 4) for c in cells - {0})


def pipelined(cfg: TrialConfig, layer_dev: list[int], n_dev: int) -> bool:
    """llama_context's pipeline parallelism: several devices split by layer, every layer offloaded (the first
    layer's input then comes from the host's embeddings), no tensor overrides."""
    full = all(d >= 0 for d in layer_dev)
    return n_dev > 1 and cfg.split_mode == "layer" and full and not (cfg.overrides or cfg.n_cpu_moe or cfg.cpu_moe)


def no_alloc_excess(cfg: TrialConfig, info: ModelInfo, layer_dev: list[int], n_dev: int, n_tok: int) -> list[int]:
    """Per device, then the host (0): what a no_alloc load (what --fit plans with) reports above what a real load
    allocates. With pipeline parallelism every device after the first that runs layers reports 4E per token more
    (ggml's debug dump shows two inputs there: the previous device's last output and the norm it computed from
    it)."""
    out = [0] * (n_dev + 1)
    if not pipelined(cfg, layer_dev, n_dev):
        return out
    first = True
    for d in range(n_dev):
        if any(layer_dev[il] == d for il in range(info.n_layer)):
            out[d] = 0 if first else 4 * info.n_embd * n_tok * 4
            first = False
    return out


def device_buffers(
    cfg: TrialConfig,
    info: ModelInfo,
    where: list[int],
    layer_dev: list[int],
    n_dev: int,
    cells: list[int],
    n_tok: int,
    raw,
    no_alloc: bool = False,
) -> list[int]:
    """Each device's compute buffer (bytes) for a graph of n_tok tokens, then the host's (`host_buffer`; `raw(n_out)`:
    the CPU graph's buffer with n_out outputs, tuner.plan.planner.compute_raw): `where` the device of each tensor
    (-1: host memory), `layer_dev` of each layer (the output layer last), `cells` each layer's KV cells (0: none).

    Per device, in floats per token (E n_embd, V n_vocab, F n_ff, Fe expert width, u experts used), the widest of
    its phases, plus the KQ mask of the layers it runs (f16 with flash attention) while the mask is alive: a split
    input is freed after its last consumer, so the device's last layer's FFN and the output layer go without it
    (pipeline copies are flagged input + output and never freed). The phases:
    - attention (FA: Q, K, V, output and 2E; MLA: the absorbed query per head and four rope-sized parts);
    - a dense FFN 3F + 2E (3F + 3E with every layer offloaded, or in the model's last layer fed from the host);
    - routed experts on the device: gate, up and their product 3·Fe·u + 3E (one E less in the device's last
      layer), then the down projection and its weighting 2E·u + Fe·u + 2E (2E more before another layer of the
      device, without shared experts); with the down projection in host memory, its input next to the copy of its
      output E·u + Fe·u + 2E;
    - a layer whose routed experts are in host memory: the copy of their output, weighted and summed on the device
      (the ops after the expert matmuls expand up from the next device node) E·u + 3E, 4E from the device's second
      such layer, one E more with shared experts (the FFN input stays alive for them: ggml's debug dump of
      DeepSeek-V3's graph shows ffn_norm used 4 times); with MLA the next attention's Q concat does not fit in the
      hole that copy leaves: the absorbed query, the roped part, their concat and 2E above E·u;
    - the output layer V + E, 2E more with shared experts. After a last layer whose routed experts ran on the host:
      on that layer's device with shared experts V + E·u + 3E (their output alive above the hole of the experts'
      output copy: the logits go above it), on another device without shared experts V + E·u + 2E (the weighting
      expands up from the output norm), else V + E.
    With pipeline parallelism (several devices, every layer offloaded, no overrides: llama_context) each split input
    is held N_COPIES times (the mask and the layer input, on an output-only device too); sized by a no_alloc load
    (`no_alloc`: what --fit plans with) a later device reports 4E more than it allocates when loaded for real
    (ggml's debug dump shows two inputs there: the previous device's last output and the norm it computed from it).

    The allocator's best fit leaves holes, so these are fitted where the live set alone falls short: each is
    checked on llama.cpp's figures by benchmarks/device_oracle.py (159 of 170 buffers within 2 %: the misses are a
    synthetic model's 1 MiB, E, left in or out by the packing, Gemma 3's first pipeline device and DeepSeek-V3's)
    and benchmarks/fit_equivalence.py."""
    out = [0] * n_dev
    fa = cfg.flash_attn != "off"
    e, v, u = info.n_embd, info.n_vocab, max(info.n_expert_used, 1)
    fe = info.n_ff_exp or info.ff(0)
    moe_up, moe_down = 3 * fe * u + 3 * e, 2 * e * u + fe * u + 2 * e
    up_dev: dict[int, set[int]] = {}  # layer -> devices holding an up (or fused gate_up) FFN tensor of it
    exps_layer: set[int] = set()
    down_dev: dict[int, int] = {}  # layer -> where its routed experts' down projection is
    for t, d in zip(info.tensors, where):
        m = UP_RE.match(t.name)
        if m:
            up_dev.setdefault(int(m[1]), set()).add(d)
            if m[3]:
                exps_layer.add(int(m[1]))
        m = DOWN_EXPS_RE.match(t.name)
        if m:
            down_dev[int(m[1])] = d
    if info.kv_mla:
        attn = info.n_head * (info.head_dim_k + info.kv_lora_rank + 4 * info.rope_dim) + 3 * e
    else:
        attn = (
            2 * info.n_head * info.head_dim_k
            + 2 * max(info.head_kv(il) for il in range(info.n_layer)) * info.head_dim_k
            + 2 * e
        )
    # MLA's attention at its Q concat: the absorbed query, the roped part, their concat, the layer input and norm
    mla_live = info.n_head * 2 * (info.kv_lora_rank + info.rope_dim) + 2 * e
    if not fa:
        attn = max(attn, max(cells, default=0) * info.n_head + info.n_head * info.head_dim_k + 3 * e)
    # next to the logits and the final norm's input: with shared experts 2E more (their output); after a last layer
    # whose routed experts ran on the host, the copy of their output on the output's device (see below)
    shared = 1 if info.n_expert_shared else 0
    last_main = info.n_layer - 1 - info.n_layer_nextn
    host_tail = down_dev.get(last_main, 0) < 0
    full = all(d >= 0 for d in layer_dev)  # the first layer's input comes from the host's embeddings
    pp = pipelined(cfg, layer_dev, n_dev)
    excess = no_alloc_excess(cfg, info, layer_dev, n_dev, n_tok) if no_alloc else [0] * (n_dev + 1)
    for d in range(n_dev):
        layers = [il for il in range(info.n_layer) if layer_dev[il] == d]
        phases = [(0, True)]  # (floats per token, whether the KQ mask is alive then)
        elsewhere = False  # a layer of this device with its routed experts in host memory came before
        for il in layers:
            phases.append((attn, True))
            alive = pp or il != layers[-1]
            if il in exps_layer and d in up_dev.get(il, ()):
                phases.append((moe_up if alive else moe_up - e, alive))
                if down_dev.get(il, d) == d:
                    phases.append((moe_down + (0 if pp or not alive or shared else 2 * e), True))
                else:
                    phases.append((e * u + fe * u + 2 * e, True))
            elif il in exps_layer:
                phases.append((e * u + (4 if elsewhere else 3) * e + shared * e, alive))
                elsewhere = True
                if info.kv_mla:  # the next attention's absorbed query and Q concat land past the copy's hole
                    phases.append((mla_live + e * u, True))
            elif d in up_dev.get(il, ()) and alive:
                phases.append((3 * info.ff(il) + (3 if full else 2) * e, alive))
            elif d in up_dev.get(il, ()):  # one E more in the model's last layer when its input came from the host
                from_host = il == info.n_layer - 1 and (il == 0 or layer_dev[il - 1] < 0)
                phases.append((3 * info.ff(il) + (3 if from_host else 2) * e, alive))
        for il, ds in up_dev.items():  # FFN weights of another device's layer (an overflowing part)
            if d in ds and layer_dev[min(il, info.n_layer - 1)] != d:
                phases.append((max(moe_up, moe_down) if il in exps_layer else 3 * info.ff(il) + 3 * e, True))
        mask = mask_bytes({cells[il] for il in layers}, n_tok, fa)
        if layer_dev[info.n_layer] == d:
            here = layer_dev[last_main] == d
            if host_tail and shared and here:  # the shared expert's output alive above the copy's hole
                tail = e * u + 2 * e
            elif host_tail and not shared and not here:  # the weighting expands up from the output norm
                tail = e * u + e
            else:  # host experts: nothing above the hole, or the host's shared expert keeps the weighting there
                tail = 2 * shared * e if not host_tail else 0
            phases.append((v + e + tail, pp))
        buf = max(f * n_tok * 4 + (mask if alive else 0) for f, alive in phases)
        if pp and (layers or layer_dev[info.n_layer] == d):
            buf += (N_COPIES - 1) * mask + N_COPIES * e * n_tok * 4 + excess[d]
        out[d] = buf
    return out + [host_buffer(cfg, info, where, layer_dev, n_dev, cells, n_tok, raw)]


def host_buffer(cfg: TrialConfig, info: ModelInfo, where, layer_dev, n_dev: int, cells, n_tok: int, raw) -> int:
    """The host's compute buffer (bytes) when devices hold layers (device_buffers' arguments); a host that runs
    whole layers: `raw(n_out)`, with the logits only when the output layer is the host's too.

    With every layer on the devices, in floats per token: the graph inputs, 2E for the token embeddings (llama.cpp's
    figure on every shape checked) and the KQ masks; with pipeline parallelism each input is held N_COPIES times,
    N_COPIES x (E + masks) + E (the same split inputs as on each device). Routed experts in host memory run there:
    gate, up and their product 3·Fe·u beside the down projection's output E·u, above the inputs, E·u + 3·Fe·u + 2E +
    masks; with only the down projection there E·u + Fe·u + E + masks. These two are fitted to one device-oracle run
    (benchmarks/results/device-oracle-20261207-190940.json: Qwen3-MoE, DeepSeek-V3, GLM-4.5 shapes) and checked on
    shapes held out of it: exact on DeepSeek-V3, Qwen3-MoE with 8 used and GLM-4.5, an upper bound elsewhere (up to
    62 % over where the allocator fits the expert tensors into holes: Qwen3-MoE with 2 or 4 used; gpt-oss 27 %)."""
    if any(d < 0 for d in layer_dev[: info.n_layer]):
        return raw(n_tok if layer_dev[info.n_layer] < 0 else 0)
    mask = mask_bytes(set(cells), n_tok, cfg.flash_attn != "off")
    e, u = info.n_embd, max(info.n_expert_used, 1)
    fe = info.n_ff_exp or info.ff(0)
    host_up = host_down = False
    for t, d in zip(info.tensors, where):
        if d < 0:
            host_up = host_up or bool((m := UP_RE.match(t.name)) and m[3])
            host_down = host_down or bool(DOWN_EXPS_RE.match(t.name))
    if host_up:
        return (e * u + 3 * fe * u + 2 * e) * n_tok * 4 + mask
    if host_down:
        return (e * u + fe * u + e) * n_tok * 4 + mask
    pp = pipelined(cfg, layer_dev, n_dev)  # every layer is on the devices here
    return N_COPIES * (e * n_tok * 4 + mask) + e * n_tok * 4 if pp else 2 * e * n_tok * 4 + mask

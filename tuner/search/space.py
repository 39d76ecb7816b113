"""The search space: each llama.cpp parameter fixed, a list or a range, bounded by what the model and build allow.

Spec syntax (command line or experiment file): `8` (fixed), `4096,8192` (list), `0:61` (inclusive range),
`4:16:2` (range with step). Experiment files may also give TOML lists: `n_ctx = [4096, 8192]`.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from tuner.errors import TunerError
from tuner.model.meta import ModelInfo
from tuner.record import (
    FLASH_ATTN,
    KV_TYPES,
    MOE_PARTS,
    PARAMS,
    SPLIT_MODES,
    TrialConfig,
    invalid_reason,
    parse_tensor_split,
)

CHOICES = {
    "flash_attn": FLASH_ATTN,
    "type_k": KV_TYPES,
    "type_v": KV_TYPES,
    "split_mode": SPLIT_MODES,
    "moe_part": MOE_PARTS,
}
BOOLS = {"use_mmap", "kv_unified"}
SPLITS = {"tensor_split"}  # each value "3/1"; a list of them "1/1,3/1", as llama-bench -ts
INTS = {p.name for p in PARAMS} - set(CHOICES) - SPLITS - BOOLS
DIMENSIONS = tuple(p.name for p in PARAMS) + ("use_mmap",)
# Dimensions whose best value can change with the filled context, so the ladder re-judges them at every rung:
# flash attention (the attention kernel, whose share of a token's work grows with the cells it reads), the KV
# types (bytes read per token grow with the depth), n_ubatch (the KQ product and its compute buffer scale with
# ubatch x context) and the offload split (the KV cache takes memory the layers would use). Threads, batch
# chunking, mmap and the quant file change the per-token weight work, which a context does not.
CONTEXT_DIMS = ("flash_attn", "type_k", "type_v", "n_ubatch", "n_gpu_layers", "n_cpu_moe", "moe_part")


class SpaceError(TunerError):
    """A space the user wrote that cannot be searched; one-line message."""


@dataclass
class Dimension:
    name: str
    values: list  # every value, in order
    step: int | None = None  # set for integer ranges: the sampler treats them as ordered

    @property
    def is_range(self) -> bool:
        return self.step is not None and len(self.values) > 1

    def spec(self) -> str:
        if self.is_range:
            return f"{self.values[0]}:{self.values[-1]}" + (f":{self.step}" if self.step != 1 else "")
        return ",".join(str(v) for v in self.values)


def _bool(text: str) -> bool:
    t = str(text).strip().lower()
    if t in ("1", "true", "on", "yes"):
        return True
    if t in ("0", "false", "off", "no"):
        return False
    raise SpaceError(f"not a boolean: {text!r} (use true/false)")


def parse_dimension(name: str, spec) -> Dimension:
    """Parse `8`, `4096,8192`, `0:61`, `4:16:2` (or a TOML list) into a Dimension."""
    if name not in DIMENSIONS:
        raise SpaceError(f"unknown search parameter {name!r} (known: {', '.join(DIMENSIONS)})")
    if isinstance(spec, (list, tuple)):
        items = [str(x).lower() if isinstance(x, bool) else str(x) for x in spec]
        if not items:
            raise SpaceError(f"{name}: empty list")
        return _from_items(name, items)
    text = str(spec).strip().lower() if isinstance(spec, bool) else str(spec).strip()
    if not text:
        raise SpaceError(f"{name}: empty value")
    if ":" in text and name not in SPLITS:
        if name not in INTS:
            raise SpaceError(f"{name}: a range needs integers; list the values instead ({name}={text})")
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise SpaceError(f"{name}: bad range {text!r} (use START:END or START:END:STEP)")
        try:
            start, end = int(parts[0]), int(parts[1])
            step = int(parts[2]) if len(parts) == 3 else 1
        except ValueError:
            raise SpaceError(f"{name}: bad range {text!r} (integers expected)") from None
        if step == 0:
            raise SpaceError(f"{name}: range step is 0 in {text!r}")
        if step < 0:
            raise SpaceError(f"{name}: range step must be positive in {text!r}")
        if start > end:
            raise SpaceError(f"{name}: empty range {text!r} (start {start} > end {end})")
        values = list(range(start, end + 1, step))
        _check_values(name, values)
        return Dimension(name, values, step)
    return _from_items(name, [x.strip() for x in text.split(",")])


def _from_items(name: str, items: list[str]) -> Dimension:
    if any(not x for x in items):
        raise SpaceError(f"{name}: empty item in list {','.join(items)!r}")
    if name in BOOLS:
        values = list(dict.fromkeys(_bool(x) for x in items))
    elif name in SPLITS:
        values = []
        for x in items:  # one spelling in records and forms: shares joined by "/"
            try:
                values.append("/".join(f"{p:g}" for p in parse_tensor_split(x)))
            except ValueError as e:
                raise SpaceError(f"bad --tensor-split {x!r}: {e} (a list of splits: 1/1,3/1)") from None
        values = list(dict.fromkeys(values))
    elif name in CHOICES:
        bad = [x for x in items if x not in CHOICES[name]]
        if bad:
            raise SpaceError(f"{name}: unknown value(s) {', '.join(bad)} (choose from {', '.join(CHOICES[name])})")
        values = list(dict.fromkeys(items))
    else:
        try:
            values = list(dict.fromkeys(int(x) for x in items))
        except ValueError:
            raise SpaceError(f"{name}: integers expected, got {','.join(items)!r}") from None
        _check_values(name, values)
    return Dimension(name, values)


def _check_values(name: str, values: list[int]) -> None:
    low = {"n_gpu_layers": -1, "n_ctx": 0, "n_cpu_moe": 0, "main_gpu": 0}.get(name, 1)
    bad = [v for v in values if v < low]
    if bad:
        what = "-1 (all layers) or more" if name == "n_gpu_layers" else f"at least {low}"
        raise SpaceError(f"{'--parallel' if name == 'n_seq' else name}: must be {what}, got {bad[0]}")


@dataclass
class Space:
    models: list[str]
    dims: dict[str, Dimension] = field(default_factory=dict)
    base: TrialConfig | None = None  # the test shape and the values of parameters that are not dimensions
    notes: list[str] = field(default_factory=list)
    auto: dict[str, str] = field(default_factory=dict)  # dimension → why the default space chose it
    ladder: list[int] = field(default_factory=list)  # the contexts of a ladder (tuner.search.space.make_ladder)
    depth_fill: bool = False  # each rung filled (n_ctx - n_prompt - n_gen), else base.n_depth at every rung

    def varying(self) -> dict[str, Dimension]:
        return {k: d for k, d in self.dims.items() if len(d.values) > 1}

    def size(self) -> int:
        n = len(self.models)
        for d in self.dims.values():
            n *= len(d.values)
        return n

    def grid(self) -> dict[str, list]:
        """Optuna GridSampler's search space (model included when there are several)."""
        g = {k: list(d.values) for k, d in self.varying().items()}
        if len(self.models) > 1:
            g["model"] = list(self.models)
        return g

    def configs(self):
        """Every config of the space (for tests and exhaustive benchmarks)."""
        names = list(self.dims)
        for model in self.models:
            for combo in itertools.product(*(self.dims[n].values for n in names)):
                yield self.config(model, dict(zip(names, combo)))

    def config(self, model: str, params: dict) -> TrialConfig:
        fixed = {k: d.values[0] for k, d in self.dims.items() if len(d.values) == 1}
        cfg = dataclasses.replace(self.base, model=model, **{**fixed, **params})
        return canonical(cfg)

    def describe(self) -> dict:
        """What a resumed study must agree on: models, dimensions and the test shape."""
        shape = {k: getattr(self.base, k) for k in ("n_prompt", "n_gen", "n_depth", "repetitions")} if self.base else {}
        out = {"models": self.models, "dims": {k: d.spec() for k, d in self.dims.items()}, "shape": shape}
        if self.ladder:
            out["ladder"] = {"rungs": list(self.ladder), "depth": "fill" if self.depth_fill else self.base.n_depth}
        return out

    def rung_depth(self, n_ctx: int) -> int:
        """The depth a rung is measured at: filled (n_ctx - n_prompt - n_gen, llama-bench's -d for a context
        that is full when the test ends), or the --depth given."""
        if not self.depth_fill:
            return self.base.n_depth
        b = self.base
        return max(0, n_ctx - b.n_prompt - b.n_gen - (0 if b.n_gen else 1))

    def rung_config(self, cfg: TrialConfig, n_ctx: int) -> TrialConfig:
        """cfg at another rung of the ladder, at that rung's depth."""
        return dataclasses.replace(cfg, n_ctx=n_ctx, n_depth=self.rung_depth(n_ctx))

    def set_working(self, n_ctx: int) -> None:
        """Search at this rung: every trial allocates it, filled to its depth."""
        self.dims["n_ctx"] = Dimension("n_ctx", [n_ctx])
        self.base = dataclasses.replace(self.base, n_ctx=n_ctx, n_depth=self.rung_depth(n_ctx))


def canonical(cfg: TrialConfig) -> TrialConfig:
    """llama.cpp clamps n_ubatch to n_batch; record what really runs."""
    if cfg.n_ubatch > cfg.n_batch:
        cfg = dataclasses.replace(cfg, n_ubatch=cfg.n_batch)
    return cfg


def ranged(name: str, vals: list[int], step: int | None) -> Dimension:
    """Keep a range's step only while the values are still evenly spaced (after clamping they may not be)."""
    if step and vals == list(range(vals[0], vals[-1] + 1, step)):
        return Dimension(name, vals, step)
    return Dimension(name, vals)


def build_space(
    models: list[str],
    infos: dict[str, ModelInfo],
    specs: dict[str, object],
    base: TrialConfig,
    gpu_offload: bool,
    physical_cores: int,
    logical_cores: int,
    objective: str = "mixed",
    auto: bool = False,
    ram_total: int | None = None,
) -> Space:
    """Dimensions from the user's specs, bounded by the models' layer counts and the build's abilities.

    With `auto`, every dimension the user left unset that matters for this objective, build and model gets
    a default range (`auto_dimensions`); the user's specs and experiment files always win.
    """
    space = Space(models=models, base=base)
    for name, spec in specs.items():
        if spec is None or spec == "":
            continue
        space.dims[name] = parse_dimension(name, spec)
    if auto:
        for name, (dim, why) in auto_dimensions(
            infos, gpu_offload, physical_cores, logical_cores, objective, ram_total, base
        ).items():
            if name not in space.dims:
                space.dims[name] = dim
                space.auto[name] = why
    n_layer = max(i.n_layer for i in infos.values())
    all_layers = n_layer + 1  # blocks + output layer, as llama.cpp counts "offloaded N/N layers"
    if "n_gpu_layers" in space.dims:
        d = space.dims["n_gpu_layers"]
        if not gpu_offload:
            space.notes.append(
                "n_gpu_layers collapsed to 0: this llama-cpp-python build has no GPU offload "
                '(see README: CMAKE_ARGS="-DGGML_CUDA=on")'
            )
            space.dims["n_gpu_layers"] = Dimension("n_gpu_layers", [0])
        else:
            vals = sorted({all_layers if v < 0 or v > all_layers else v for v in d.values})
            if max(d.values) > all_layers or min(d.values) < 0:
                space.notes.append(
                    f"n_gpu_layers bounded to the model's real count: {all_layers} "
                    f"({n_layer} layers + output; -1/99/999 mean all)"
                )
            space.dims["n_gpu_layers"] = ranged("n_gpu_layers", vals, d.step)
    elif gpu_offload:
        space.dims["n_gpu_layers"] = Dimension("n_gpu_layers", list(range(0, all_layers + 1)), 1)
        space.auto["n_gpu_layers"] = f"a GPU build: 0 to all {all_layers} layers (the planner drops what cannot fit)"
    else:
        space.dims["n_gpu_layers"] = Dimension("n_gpu_layers", [0])
    if "n_cpu_moe" in space.dims:
        d = space.dims["n_cpu_moe"]
        if not any(i.is_moe for i in infos.values()):
            space.notes.append("n_cpu_moe collapsed to 0: no model in the search has experts")
            space.dims["n_cpu_moe"] = Dimension("n_cpu_moe", [0])
        else:
            vals = sorted({min(v, n_layer) for v in d.values})
            if max(d.values) > n_layer:
                space.notes.append(f"n_cpu_moe bounded to the layer count: {n_layer}")
            space.dims["n_cpu_moe"] = ranged("n_cpu_moe", vals, d.step)
            if not gpu_offload and len(vals) > 1:
                space.notes.append(
                    "n_cpu_moe kept as asked, but on this CPU-only build experts are in host "
                    "memory anyway: it changes buffer placement, not where compute runs"
                )
    elif gpu_offload and any(i.is_moe for i in infos.values()):
        space.dims["n_cpu_moe"] = Dimension("n_cpu_moe", list(range(0, n_layer + 1)), 1)
        space.auto["n_cpu_moe"] = "a MoE model on a GPU build: experts of the first N layers in host RAM"
    for name in ("n_threads", "n_threads_batch"):
        d = space.dims.get(name)
        if d and max(d.values) > logical_cores:
            space.notes.append(f"{name} above this machine's {logical_cores} logical cores oversubscribes them")
    working_context(space, infos)
    return space


DEFAULT_CTX = 4096  # what a chat server needs at least; capped by the model's trained context


def trained_ctx(infos: dict[str, ModelInfo]) -> int:
    """The smallest trained context among the models (0 when no model says)."""
    return min((i.n_ctx_train for i in infos.values() if i.n_ctx_train), default=0)


def working_context(space: Space, infos: dict[str, ModelInfo]) -> None:
    """Every trial allocates the context the user will serve, so its memory is true for what is recommended.

    No --ctx: 4096, capped by the trained context. A context above the trained one is refused: llama.cpp only
    warns, but the output degrades past it, so a recommendation there would be one to regret.
    """
    trained = trained_ctx(infos)
    d = space.dims.get("n_ctx")
    if d is None:
        w = min(DEFAULT_CTX, trained) if trained else DEFAULT_CTX
        space.dims["n_ctx"] = Dimension("n_ctx", [w])
        space.auto["n_ctx"] = (
            "the working context"
            + (f" ({DEFAULT_CTX} capped by the trained {trained})" if trained and trained < DEFAULT_CTX else "")
            + ": every trial allocates it; --ctx sets yours (a list or range also gives a context "
            "ladder)"
        )
        d = space.dims["n_ctx"]
    over = [v for v in d.values if trained and v > trained]
    if over:
        name = next(Path(m).name for m, i in infos.items() if i.n_ctx_train == trained)
        raise SpaceError(f"--ctx {over[0]} is above the trained context of {name} ({trained} tokens)")


def check_depth(space: Space, depth_given: bool) -> None:
    """A depth must leave each context room for the test: depth + max(n_prompt, n_gen) + 1 cells (the +1: the
    TTFT token after the prompt). A rung that cannot hold the test at all is refused too."""
    b, d = space.base, space.dims.get("n_ctx")
    if d is None or b is None:
        return
    for v in d.values:
        if not v:
            continue  # 0: sized for the test, as llama-bench
        depth = b.n_depth if depth_given else 0
        need = depth + max(b.n_prompt, b.n_gen) + 1
        if v < need:
            if depth_given and depth:
                raise SpaceError(
                    f"--depth {depth} is beyond the context {v} of --ctx {d.spec()}: a context must "
                    f"hold the depth plus the test (depth + max(n_prompt, n_gen) + 1 = {need})"
                )
            raise SpaceError(f"--ctx {v} cannot hold the test (max(n_prompt, n_gen) + 1 = {need} tokens)")


def check_parallel(space: Space) -> None:
    """--parallel N: every count must fit N sequences of the test in some context of the space (n_ctx / N cells
    each, as llama.cpp splits it, or all of it with --kv-unified); a context ladder fills one sequence per rung,
    so it does not take --parallel."""
    d, b = space.dims.get("n_seq"), space.base
    if d is None or b is None:
        return
    ctxs = space.dims["n_ctx"].values if "n_ctx" in space.dims else [b.n_ctx]
    if len(ctxs) > 1:
        raise SpaceError(f"--ctx {space.dims['n_ctx'].spec()} is a ladder: one context with --parallel")
    unified = space.dims["kv_unified"].values if "kv_unified" in space.dims else [b.kv_unified]
    for n in d.values:
        whys = [invalid_reason(dataclasses.replace(b, n_seq=n, n_ctx=c, kv_unified=u)) for c in ctxs for u in unified]
        if all(whys):
            raise SpaceError(whys[0])


def make_ladder(space: Space, depth_given: bool, asked: int = 0) -> None:
    """Several contexts are a ladder, not a dimension: the search runs once at the working context (the largest
    rung left after the planner), each rung filled to its depth; the confirmation then measures the winner, the
    defaults and their alternatives in CONTEXT_DIMS at every rung, interleaved (tuner.search.loop.Search.ladder).
    Without --depth every rung is filled (depth = n_ctx - n_prompt - n_gen); --depth N measures every rung at N."""
    d = space.dims.get("n_ctx")
    if d is not None and len(d.values) == 1 and asked > 1 and d.values[0]:
        # the planner left one rung of the ladder asked for: still measured where it bites, filled
        space.depth_fill = not depth_given
        space.ladder = list(d.values)
        space.set_working(d.values[0])
        return
    if d is None or len(d.values) < 2:
        return
    if 0 in d.values:
        raise SpaceError(f"--ctx {d.spec()}: a ladder's rungs are sizes; 0 (sized for the test) is no rung")
    space.ladder = sorted(d.values)
    space.depth_fill = not depth_given
    space.set_working(space.ladder[-1])
    depth = "filled" if space.depth_fill else f"at depth {space.base.n_depth}"
    space.auto["n_ctx"] = (
        f"a context ladder ({', '.join(map(str, space.ladder))}): searched at the working "
        f"context {space.ladder[-1]}, {depth}; then every rung measured with the winner and the "
        "defaults, interleaved"
    )


def auto_dimensions(
    infos: dict[str, ModelInfo],
    gpu_offload: bool,
    physical_cores: int,
    logical_cores: int,
    objective: str = "mixed",
    ram_total: int | None = None,
    base: TrialConfig | None = None,
) -> dict[str, tuple[Dimension, str]]:
    """The default space: what llama.cpp users tune by hand on this kind of machine, each with its reason.

    KV-cache types are never here: they change the output, so they are searched only when the user lists them.
    """
    out: dict[str, tuple[Dimension, str]] = {}
    threads = sorted({max(1, physical_cores // 2), physical_cores, logical_cores})
    cores = f"this machine's {physical_cores} physical / {logical_cores} logical cores"
    objective = objective.removesuffix("_stream")
    uses_gen = objective in ("tg", "mixed")
    uses_prompt = objective in ("pp", "ttft", "mixed")
    if uses_gen and len(threads) > 1:
        out["n_threads"] = (Dimension("n_threads", threads), f"generation threads around {cores}")
    if uses_prompt and len(threads) > 1:
        out["n_threads_batch"] = (Dimension("n_threads_batch", threads), f"prompt threads around {cores}")
    if uses_prompt:
        # llama.cpp's default is 512; GPUs gain from larger physical batches, CPUs often from smaller ones
        ub = [512, 1024, 2048] if gpu_offload else [128, 256, 512]
        if base is not None:
            ub = [u for u in ub if u <= base.n_batch] or [base.n_batch]
        out["n_ubatch"] = (Dimension("n_ubatch", ub), "physical batch size: prompt speed against compute-buffer memory")
    out["flash_attn"] = (
        Dimension("flash_attn", ["on", "off"]),
        "flash attention: speed and KV memory differ by backend and model",
    )
    big = max(i.file_size for i in infos.values())
    if ram_total and big > ram_total // 2:
        out["use_mmap"] = (
            Dimension("use_mmap", [True, False]),
            f"the model ({big / 2**30:.1f} GiB) is over half the RAM: mmap or a full load can differ",
        )
    return out


def require_ctx(space: Space, min_ctx: int) -> None:
    """--min-ctx: drop smaller contexts from the space (a recommendation could never use them)."""
    if not min_ctx:
        return
    d = space.dims.get("n_ctx")
    if d is None:
        space.dims["n_ctx"] = Dimension("n_ctx", [min_ctx])
        return
    keep = [v for v in d.values if (v or space.base.effective_ctx()) >= min_ctx]
    if not keep:
        raise SpaceError(f"--min-ctx {min_ctx}: no n_ctx in the space is that large ({d.spec()})")
    if len(keep) < len(d.values):
        space.notes.append(f"n_ctx below --min-ctx {min_ctx} dropped from the space")
        space.dims["n_ctx"] = ranged("n_ctx", keep, d.step)

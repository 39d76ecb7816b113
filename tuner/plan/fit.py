"""llama.cpp's `--fit` in Python: `common_fit_params` (common/fit.cpp) on a memory breakdown from tuner's planner.

llama-server fits by default (common/common.h: `fit_params = true`): it sizes its own buffers per device with a
no_alloc load (model weights, context = KV cache, compute), lowers n_ctx when it was not set, then moves weights to
host memory (MoE experts first, layer by layer, even part of a layer's FFN) until every device keeps `--fit-target`
MiB free (default 1024), and sets n_gpu_layers, tensor_split and tensor_buft_overrides. Only parameters still at
llama.cpp's defaults change; host memory counts as unlimited; speed is never measured.

`fit()` is a line-by-line port of that search (fit.cpp lines cited at each step, llama.cpp 0c1e570 as vendored by
llama-cpp-python 0.3.36). The only thing it asks of the world is a `Breakdown`: a callable that, for a config,
returns each device's (model, context, compute) bytes, as `common_get_device_memory_data_impl` (fit.cpp 30-154)
does with a real no_alloc load. `planner_breakdown()` builds one from the planner alone, so the placement llama.cpp
would choose is known for described GPUs without the devices or the weights; another source (llama.cpp's own
no_alloc figures) can be plugged in unchanged.

    from tuner.plan.fit import DeviceMemory, fit, server_config
    devs = [DeviceMemory(free=24 << 30, total=24 << 30, name="CUDA0"), DeviceMemory(24 << 30, 24 << 30, "CUDA1")]
    res = fit(info, devs, server_config(info.path))
    res.to_flags()        # '-c 4096 -ngl 62 -ts 31,31 -ot "blk\\.30\\.ffn_(up|down|gate_up|gate)_(ch|)exps=CPU,..."'
    res.trial_config(cfg) # the same placement as a TrialConfig (overrides as `-ot PATTERN=BUFFER` entries)

Reading a TrialConfig the way llama-server reads its flags: n_ctx 0 is "unset" (the model's trained context, not
llama-bench's n_prompt + n_gen), n_gpu_layers -1 is unset (llama_model_default_params), an empty tensor_split and no
overrides / n_cpu_moe / cpu_moe are unset. `server_config()` gives that starting point.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from tuner.errors import TunerError
from tuner.model.meta import ModelInfo
from tuner.plan import placement, planner
from tuner.record import TrialConfig, moe_part_pattern, parse_tensor_split

MiB = 1 << 20
DEFAULT_MARGIN = 1024 * MiB  # common/common.h: fit_params_target, per device (--fit-target MiB)
DEFAULT_N_CTX_MIN = 4096  # common/common.h: fit_params_min_ctx (--fit-ctx)
UINT32_MAX = (1 << 32) - 1
MAX_DEVICES = 16  # llama_max_devices() (src/llama.cpp)
MAX_OVERRIDES = 4096  # llama_max_tensor_buft_overrides() (src/llama.cpp)
UNSET_NGL = -1  # llama_model_default_params().n_gpu_layers (src/llama-model.cpp)
TENSOR_ALIGNMENT = 32  # ggml/src/ggml-impl.h: the CPU buffer type's alignment (an RPC server's CPU device too)

SUCCESS, FAILURE, ERROR = "success", "failure", "error"  # common/fit.h: common_params_fit_status


class FitError(TunerError):
    """A hard error of the fit (fit.cpp's std::runtime_error: COMMON_PARAMS_FIT_STATUS_ERROR)."""


class _Abort(Exception):  # noqa: N818 - fit.cpp's common_params_fit_exception: ends the fit with FAILURE
    pass


class LayerFraction(enum.IntEnum):
    """Which part of a layer stays on its device when the rest overflows (fit.cpp 18-24)."""

    NONE = 0
    ATTN = 1  # attention only: every FFN tensor overflows
    UP = 2  # attention + up
    GATE = 3  # attention + up + gate
    MOE = 4  # everything but the routed experts


# the fractions as tuner's --moe-part spells them (the same tensors: tuner.record.moe_part_pattern)
PART_OF_FRACTION = {LayerFraction.ATTN: "ffn", LayerFraction.UP: "gate_down", LayerFraction.GATE: "down"}


def overflow_pattern(il: int, lf: LayerFraction) -> str:
    """The regex of the tensors of layer `il` that overflow for fraction `lf` (fit.cpp 493-530)."""
    if il >= 1000:
        raise FitError("at most 1000 model layers are supported")
    if lf in PART_OF_FRACTION:
        return moe_part_pattern(il, PART_OF_FRACTION[lf])
    if lf == LayerFraction.MOE:
        return f"blk\\.{il}\\.ffn_(up|down|gate_up|gate)_(ch|)exps"
    raise FitError(f"no overflow pattern for {lf!r}")


# fit.cpp 618: every routed-expert tensor, for the "dense weights only" measurement
PATTERN_MOE_ALL = r"blk\.\d+\.ffn_(up|down|gate_up|gate)_(ch|)exps"


@dataclass(frozen=True)
class DeviceMemory:
    """One device as llama.cpp sees it: ggml_backend_dev_memory's free and total bytes, and the name of its buffer
    type as `-ot` and llama-fit-params spell it ("CUDA0", "RPC0[127.0.0.1:50052]")."""

    free: int
    total: int
    name: str = ""


@dataclass(frozen=True)
class Usage:
    """One device's (or the host's) share of a config: llama_memory_breakdown_data (src/llama-ext.h)."""

    model: int = 0
    context: int = 0
    compute: int = 0

    @property
    def total(self) -> int:
        return self.model + self.context + self.compute

    def __add__(self, o: Usage) -> Usage:
        return Usage(self.model + o.model, self.context + o.context, self.compute + o.compute)


# config -> one Usage per device, in the devices' order, then one for the host (n_devices + 1 entries)
Breakdown = Callable[[TrialConfig], list[Usage]]


@dataclass
class Layers:
    """Layers of one device (fit.cpp 532-546, ngl_t): n_layer in all, n_part of them partial (experts, or part of the
    FFN, in another buffer); only the first partial layer may overflow a fraction other than MOE."""

    n_layer: int = 0
    n_part: int = 0
    overflow_type: LayerFraction = LayerFraction.MOE

    @property
    def n_full(self) -> int:
        return self.n_layer - self.n_part


@dataclass
class FitResult:
    """What the fit chose, in llama.cpp's terms.

    `n_gpu_layers` is -1 and `tensor_split` / `overrides` are empty where the fit left them alone (the model fits
    as given). On FAILURE llama-server goes on with what the fit had set before it gave up (a lowered n_ctx);
    llama-fit-params prints nothing and exits 1.
    """

    status: str
    message: str = ""
    n_ctx: int = 0
    n_gpu_layers: int = UNSET_NGL
    tensor_split: list[float] = field(default_factory=list)  # one share per device (layers per device)
    overrides: list[tuple[str, str]] = field(default_factory=list)  # (regex, buffer name) in llama.cpp's order
    layers: list[Layers] = field(default_factory=list)  # per device, when layers were distributed
    projected: list[Usage] = field(default_factory=list)  # per device (then host) for the result, when measured
    trace: list[str] = field(default_factory=list, repr=False)  # fit.cpp's LOG_TRC lines (MiB)
    n_measured: int = 0  # breakdowns asked for (llama.cpp: no_alloc loads)

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS

    def to_flags(self) -> str:
        """The flags exactly as llama-fit-params prints them (tools/fit-params/fit-params.cpp 43-70):
        `-c N -ngl N[ -ts a,b,...][ -ot "re=BUF,re=BUF"]`; trailing zero shares of -ts are dropped and a single
        share is not printed."""
        out = f"-c {self.n_ctx} -ngl {self.n_gpu_layers}"
        ts = list(self.tensor_split)
        while len(ts) > 1 and ts[-1] == 0.0:
            ts.pop()
        if len(ts) > 1:
            out += " -ts " + ",".join(str(int(s)) for s in ts)
        if self.overrides:
            out += ' -ot "' + ",".join(f"{p}={b}" for p, b in self.overrides) + '"'
        return out

    def server_args(self) -> list[str]:
        """The same as an argument vector for llama-server (`-ot` unquoted: one argument)."""
        out = ["-c", str(self.n_ctx), "-ngl", str(self.n_gpu_layers)]
        ts = list(self.tensor_split)
        while len(ts) > 1 and ts[-1] == 0.0:
            ts.pop()
        if len(ts) > 1:
            out += ["-ts", ",".join(str(int(s)) for s in ts)]
        if self.overrides:
            out += ["-ot", ",".join(f"{p}={b}" for p, b in self.overrides)]
        return out

    def trial_config(self, cfg: TrialConfig) -> TrialConfig:
        """`cfg` with the fitted n_ctx, n_gpu_layers (-1: all, tuner spells it n_layer + 1 as well),
        tensor_split ("a,b", llama-server's spelling) and overrides (tuner's `-ot PATTERN=BUFFER` entries)."""
        return dataclasses.replace(
            cfg,
            n_ctx=self.n_ctx,
            n_gpu_layers=self.n_gpu_layers,
            tensor_split=_split_text(self.tensor_split),
            overrides=tuple(f"{p}={b}" for p, b in self.overrides),
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = [
            {"n_layer": x.n_layer, "n_part": x.n_part, "overflow_type": x.overflow_type.name} for x in self.layers
        ]
        d["flags"] = self.to_flags() if self.ok else None
        return d


def server_config(model: str, **kw) -> TrialConfig:
    """A TrialConfig as llama-server starts with only `-m`: nothing set that the fit may change (n_ctx 0,
    n_gpu_layers -1, no tensor split, no overrides); `kw` sets other fields (n_ubatch, type_k, ...)."""
    base = dict(model=model, n_ctx=0, n_gpu_layers=UNSET_NGL, tensor_split="", overrides=(), n_cpu_moe=0, cpu_moe=False)
    return TrialConfig(**{**base, **kw})


def _split_text(shares: list[float]) -> str:
    return ",".join(str(int(s)) if float(s).is_integer() else str(s) for s in shares) if any(shares) else ""


def _cdiv(a: int, b: int) -> int:
    """C's integer division (truncates toward zero)."""
    if b == 0:
        raise FitError("division by zero in the fit (no memory difference between two measurements)")
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _u32(x: int) -> int:
    return x & UINT32_MAX


def fit(
    info: ModelInfo,
    devices: list[DeviceMemory],
    cfg: TrialConfig,
    margins: list[int] | int | None = None,
    n_ctx_min: int = DEFAULT_N_CTX_MIN,
    breakdown: Breakdown | None = None,
    host: DeviceMemory | None = None,
    n_seq_max: int = 1,
    kv_unified: bool = False,
) -> FitResult:
    """llama.cpp's `common_fit_params` (common/fit.cpp 879-904 and common_params_fit_impl, 179-877) for `cfg`.

    `devices`: the GPUs as llama.cpp lists them (each device's free memory is what the fit aims at); `margins`:
    bytes to keep free per device (one value for all; default 1 GiB each, as `--fit-target 1024`); `n_ctx_min`:
    `--fit-ctx` (UINT32_MAX: never lower the context); `breakdown`: memory per device for a config (default:
    `planner_breakdown(info, devices)`); `host`: host memory, used only without devices; `n_seq_max` /
    `kv_unified`: the context's sequences (llama-fit-params: 1 and false).

    Returns a FitResult whose status is SUCCESS, FAILURE (llama.cpp's common_params_fit_exception: a parameter the
    user set, too many overrides, no devices and no room) or ERROR (a hard error, e.g. of the breakdown). Input the
    fit cannot read (more than 16 devices, fewer margins than devices) raises FitError.
    """
    bd = breakdown or planner_breakdown(info, devices)
    res = FitResult(status=SUCCESS, n_ctx=cfg.n_ctx, n_gpu_layers=cfg.n_gpu_layers)
    st = _State(info, devices, cfg, margins, n_ctx_min, bd, host, n_seq_max, kv_unified, res)
    try:
        st.run()
        res.trace.append("successfully fit params to free device memory")
    except _Abort as e:
        res.status, res.message = FAILURE, str(e)
        res.trace.append(f"failed to fit params to free device memory: {e}")
    except FitError as e:
        res.status, res.message = ERROR, str(e)
        res.trace.append(f"encountered an error while trying to fit params to free device memory: {e}")
    return res


class _State:
    """common_params_fit_impl's locals; `run` follows its steps in order."""

    def __init__(self, info, devices, cfg, margins, n_ctx_min, bd, host, n_seq_max, kv_unified, res):
        self.info, self.devices, self.cfg, self.bd, self.res = info, list(devices), cfg, bd, res
        self.host = host
        self.nd = len(self.devices)
        if self.nd > MAX_DEVICES:
            raise FitError(f"at most {MAX_DEVICES} devices (llama_max_devices)")
        if margins is None:
            margins = DEFAULT_MARGIN
        if isinstance(margins, int):
            margins = [margins] * max(self.nd, 1)
        if len(margins) < max(self.nd, 1):
            raise FitError(f"{len(margins)} margin(s) for {self.nd} devices")
        self.margins = [int(m) for m in margins[: max(self.nd, 1)]]  # fit.cpp 283-291
        self.n_ctx_min = n_ctx_min
        self.hp_ngl = info.n_layer  # llama_model_n_layer (load_mtp off)
        self.hp_nct = info.n_ctx_train
        self.hp_nex = info.n_expert
        # fit.cpp 195-197: with a non-unified KV cache each sequence has its own stream
        self.n_streams = 1 if kv_unified else max(1, n_seq_max)
        self.n_ctx_auto = cfg.n_ctx == 0
        self.n_ctx = cfg.n_ctx  # cparams->n_ctx as the fit changes it
        self.ngl = cfg.n_gpu_layers  # mparams->n_gpu_layers
        self.tensor_split: list[float] = []  # what the fit wrote to the caller's tensor_split buffer
        self.overrides: list[tuple[str, str]] = []  # mparams->tensor_buft_overrides, once the fit set them

    # -- helpers ---------------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        self.res.trace.append(msg)

    def measure(
        self,
        ngl: int | None = None,
        split: list[float] | None = None,
        overrides: list[tuple[str, str]] | None = None,
        count: bool = True,
    ) -> list[Usage]:
        """common_get_device_memory_data_impl (fit.cpp 30-154) for the current context and the given weights'
        placement (default: mparams as they are). n_ctx 0 is the trained context, as llama_context makes it."""
        c = dataclasses.replace(
            self.cfg, n_ctx=self.n_ctx or self.hp_nct, n_gpu_layers=self.ngl if ngl is None else ngl
        )
        if split is not None:
            c = dataclasses.replace(c, tensor_split=_split_text(split))
        if overrides is not None:
            c = dataclasses.replace(c, overrides=tuple(f"{p}={b}" for p, b in overrides), n_cpu_moe=0, cpu_moe=False)
        out = list(self.bd(c))
        if count:
            self.res.n_measured += 1
        if len(out) != self.nd + 1:
            raise FitError(f"the breakdown gave {len(out)} entries for {self.nd} devices + host")
        return out

    def set_ngl_tensor_split_tbo(self, ngl_per_device: list[Layers], overflow_bufts: list[str]):
        """fit.cpp 548-587: n_gpu_layers, tensor_split and overrides for layers per device. Returns (ngl, split,
        overrides); the overrides give each device's partial layers (after its full ones) to the host, the first
        one of each device (with its overflow fraction) to `overflow_bufts[id]`."""
        ngl = sum(x.n_layer for x in ngl_per_device)
        split = [float(x.n_layer) for x in ngl_per_device] if self.nd > 1 else []
        assert ngl <= self.hp_ngl + 1
        il0 = self.hp_ngl + 1 - ngl  # start index for tensor buft overrides
        tbo: list[tuple[str, str]] = []
        for id_, x in enumerate(ngl_per_device):
            il0 += x.n_full
            for il in range(il0, il0 + x.n_part):
                if len(tbo) + 1 >= MAX_OVERRIDES:
                    raise _Abort(f"llama_max_tensor_buft_overrides() == {MAX_OVERRIDES} is insufficient for model")
                first = il == il0
                tbo.append(
                    (
                        overflow_pattern(il, x.overflow_type if first else LayerFraction.MOE),
                        overflow_bufts[id_] if first else "CPU",
                    )
                )
            il0 += x.n_part
        return ngl, split, tbo

    def memory_for_layers(self, ngl_per_device: list[Layers], overflow_bufts: list[str]) -> list[int]:
        """fit.cpp 589-614: each device's projected total for layers per device."""
        ngl, split, tbo = self.set_ngl_tensor_split_tbo(ngl_per_device, overflow_bufts)
        dmd = self.measure(ngl, split, tbo)
        for id_, n in enumerate(ngl_per_device):
            self.log(
                f"id={id_}, n_layer={n.n_layer:2d}, n_part={n.n_part:2d}, overflow_type={int(n.overflow_type)},"
                f" mem={dmd[id_].total // MiB:6d} MiB"
            )
        return [dmd[id_].total for id_ in range(self.nd)]

    def apply(self, ngl_per_device: list[Layers], overflow_bufts: list[str]) -> None:
        self.ngl, self.tensor_split, self.overrides = self.set_ngl_tensor_split_tbo(ngl_per_device, overflow_bufts)
        self.res.layers = [dataclasses.replace(x) for x in ngl_per_device]
        self.placed = True

    def fits(self, m: list[int], targets: list[int], id_: int) -> bool:
        """fit.cpp 828/839/851: strictly below the target on this device and on the next one (its overflow)."""
        return m[id_] < targets[id_] and (id_ + 1 == self.nd or m[id_ + 1] < targets[id_ + 1])

    # -- the steps -------------------------------------------------------------------------------------------
    def run(self) -> None:
        self.placed = False
        try:
            self._run()
            if self.placed:
                self.res.projected = self.measure(self.ngl, self.tensor_split, self.overrides, count=False)
            else:
                self.res.projected = self.measure(count=False)
        finally:
            self.res.n_ctx = self.n_ctx
            self.res.n_gpu_layers = self.ngl
            self.res.tensor_split = list(self.tensor_split)
            self.res.overrides = list(self.overrides)

    def _run(self) -> None:
        nd, margins = self.nd, self.margins
        if self.cfg.split_mode == "tensor":  # fit.cpp 183-185 (LLAMA_SPLIT_MODE_TENSOR)
            raise _Abort("llama_params_fit is not implemented for SPLIT_MODE_TENSOR, abort")
        # step 1 (fit.cpp 261-371): the memory for the parameters as given; anything to change at all?
        self.log("getting device memory data for initial parameters:")
        dmds_full = self.measure()
        n_ctx_max = min(self.hp_nct * self.n_streams, UINT32_MAX)  # fit.cpp 265-268: saturating
        n_ctx_min_total = min(self.n_ctx_min * self.n_streams, UINT32_MAX)
        if self.n_ctx_auto:  # fit.cpp 270-279: llama_context would use n_ctx_train; resolve it first
            self.n_ctx = n_ctx_max
            if self.n_streams > 1:
                dmds_full = self.measure()

        sum_free = sum_projected_free = sum_projected_used = sum_projected_model = 0
        projected_free_per_device = []
        if nd == 0:  # fit.cpp 317-327
            if self.host is None:
                raise FitError("no devices and no host memory given")
            sum_projected_used = dmds_full[-1].total
            sum_free = self.host.total
            sum_projected_free = sum_free - sum_projected_used
            self.log(
                f"projected to use {sum_projected_used // MiB} MiB of host memory vs. {sum_free // MiB} MiB "
                "of total host memory"
            )
            if sum_projected_free >= margins[0]:
                self.log(
                    f"will leave {sum_projected_free // MiB} >= {margins[0] // MiB} MiB of system memory, "
                    "no changes needed"
                )
                return
        else:  # fit.cpp 328-371
            for id_ in range(nd):
                used = dmds_full[id_].total
                free = self.devices[id_].free - used
                projected_free_per_device.append(free)
                sum_free += self.devices[id_].free
                sum_projected_used += used
                sum_projected_free += free
                sum_projected_model += dmds_full[id_].model
                if nd > 1:
                    self.log(
                        f"  - {self.devices[id_].name}: {self.devices[id_].total // MiB:6d} total, "
                        f"{used // MiB:6d} used, {free // MiB:6d} free vs. target of {margins[id_] // MiB:6d}"
                    )
            self.log(
                f"projected to use {sum_projected_used // MiB} MiB of device memory vs. {sum_free // MiB} MiB "
                "of free device memory"
            )
            if all(projected_free_per_device[i] >= margins[i] for i in range(nd)):
                self.log("targets for free memory can be met on all devices, no changes needed")
                return

        # step 2 (fit.cpp 373-461): a smaller context, if the user left it unset
        global_surplus = sum_projected_free - sum(margins[: max(nd, 1)])
        if global_surplus < 0:
            self.log(f"cannot meet free memory targets, need to use {-global_surplus // MiB} MiB less in total")
            if self.n_ctx_auto:
                if n_ctx_max > n_ctx_min_total:
                    sum_used_target = sum_free - sum(margins[: max(nd, 1)])
                    if nd > 1:
                        # fit.cpp 403-410: be conservative with several devices (whole layers / tensors per device)
                        div = min(_u32(self.ngl), self.hp_ngl)
                        model_per_layer = _cdiv(sum_projected_model, div)
                        sum_used_target -= _cdiv((nd + 1) * model_per_layer, 2 if self.hp_nex == 0 else 6)
                    self.n_ctx = n_ctx_min_total
                    dmds_min_ctx = self.measure()
                    sum_used_min_ctx = (
                        dmds_min_ctx[-1].total if nd == 0 else sum(dmds_min_ctx[i].total for i in range(nd))
                    )
                    if sum_used_target > sum_used_min_ctx:
                        # fit.cpp 424-430: interpolate linearly, round down to 256 × streams
                        self.n_ctx = _u32(
                            self.n_ctx
                            + _cdiv(
                                (n_ctx_max - n_ctx_min_total) * (sum_used_target - sum_used_min_ctx),
                                sum_projected_used - sum_used_min_ctx,
                            )
                        )
                        align = 256 * self.n_streams
                        self.n_ctx = max(self.n_ctx - self.n_ctx % align, n_ctx_min_total)
                        bytes_per_ctx = _cdiv(sum_projected_used - sum_used_min_ctx, n_ctx_max - n_ctx_min_total)
                        self.log(
                            f"context size reduced from {n_ctx_max} to {self.n_ctx} -> need "
                            f"{(n_ctx_max - self.n_ctx) * bytes_per_ctx // MiB} MiB less memory in total"
                        )
                        if nd <= 1:
                            self.log("entire model can be fit by reducing context")
                            return
                        self.log("entire model should be fit across devices by reducing context")
                    else:
                        self.log(
                            f"context size reduced from {n_ctx_max} to {self.n_ctx} -> need "
                            f"{(sum_projected_used - sum_used_min_ctx) // MiB} MiB less memory in total"
                        )
                elif self.n_ctx_min == UINT32_MAX:
                    self.log(f"user has requested full context size of {n_ctx_max} -> no change")
                else:
                    self.log(
                        f"default model context size is {n_ctx_max} which is <= the min. context size of "
                        f"{n_ctx_min_total} -> no change"
                    )
            else:
                self.log(f"context size set by user to {self.n_ctx} -> no change")
        if nd == 0:
            raise _Abort("was unable to fit model into system memory by reducing context, abort")

        # fit.cpp 463-486: only parameters the user left alone may change
        if self.cfg.n_gpu_layers != UNSET_NGL:
            raise _Abort(f"n_gpu_layers already set by user to {self.cfg.n_gpu_layers}, abort")
        if nd > 1:
            if any(parse_tensor_split(self.cfg.tensor_split)[:nd]):
                raise _Abort("model_params::tensor_split already set by user, abort")
            if self.cfg.split_mode == "row":
                raise _Abort("changing weight allocation for LLAMA_SPLIT_MODE_ROW not implemented, abort")
        if self.cfg.overrides or self.cfg.n_cpu_moe or self.cfg.cpu_moe:
            raise _Abort("model_params::tensor_buft_overrides already set by user, abort")

        self._distribute(dmds_full)

    def _distribute(self, dmds_full: list[Usage]) -> None:
        nd, margins, hp_ngl, hp_nex = self.nd, self.margins, self.hp_ngl, self.hp_nex
        # fit.cpp 616-645: with every routed expert in host memory, is there room for all dense weights?
        global_surplus_cpu_moe = 0
        if hp_nex > 0:
            self.log("getting device memory data with all MoE tensors moved to system memory:")
            dmds_cpu_moe = self.measure(overrides=[(PATTERN_MOE_ALL, "CPU")])
            for id_ in range(nd):
                global_surplus_cpu_moe += self.devices[id_].free - (dmds_cpu_moe[id_].total + margins[id_])
            if global_surplus_cpu_moe > 0:
                self.log(
                    f"with only dense weights in device memory there is a total surplus of "
                    f"{global_surplus_cpu_moe // MiB} MiB"
                )
            else:
                self.log(
                    f"with only dense weights in device memory there is still a total deficit of "
                    f"{-global_surplus_cpu_moe // MiB} MiB"
                )

        # fit.cpp 647-661: targets, overflow buffers (all CPU to begin with), nothing assigned
        targets = [self.devices[id_].free - margins[id_] for id_ in range(nd)]
        for id_ in range(nd):
            self.log(f"id={id_}, target={targets[id_] // MiB} MiB")
        overflow_bufts = ["CPU"] * nd
        ngl_per_device = [Layers() for _ in range(nd)]
        mem = self.memory_for_layers(ngl_per_device, overflow_bufts)

        # step 3 (fit.cpp 488-729; the fill itself 663-729): fill devices back to front with whole ("dense-only"
        # for MoE) layers, by the method of false position between a known fit (low) and the device taking every
        # unassigned layer (high)
        self.log("filling dense layers back-to-front:" if hp_nex == 0 else "filling dense-only layers back-to-front:")
        for id_ in range(nd - 1, -1, -1):
            n_unassigned = hp_ngl + 1 - sum(ngl_per_device[jd].n_layer for jd in range(id_ + 1, nd))
            high = [dataclasses.replace(x) for x in ngl_per_device]
            high[id_].n_layer = n_unassigned
            if hp_nex > 0:
                high[id_].n_part = high[id_].n_layer if id_ < nd - 1 else high[id_].n_layer - 1
            if high[id_].n_layer > 0:
                mem_high = self.memory_for_layers(high, overflow_bufts)
                if mem_high[id_] > targets[id_]:
                    delta = high[id_].n_layer - ngl_per_device[id_].n_layer
                    self.log(f"start filling device {id_}, delta={delta}")
                    while delta > 1:
                        step = self._step(delta, targets[id_] - mem[id_], mem_high[id_] - mem[id_])
                        test = [dataclasses.replace(x) for x in ngl_per_device]
                        test[id_].n_layer += step
                        if hp_nex:
                            # fit.cpp 700-703: the last device's first layer must stay full (the output layer)
                            test[id_].n_part += step - 1 if id_ == nd - 1 and test[id_].n_part == 0 else step
                        mem_test = self.memory_for_layers(test, overflow_bufts)
                        if mem_test[id_] <= targets[id_]:
                            ngl_per_device, mem = test, mem_test
                            self.log(f"set ngl_per_device[{id_}].n_layer={ngl_per_device[id_].n_layer}")
                        else:
                            high, mem_high = test, mem_test
                            self.log(f"set ngl_per_device_high[{id_}].n_layer={high[id_].n_layer}")
                        delta = high[id_].n_layer - ngl_per_device[id_].n_layer
                else:
                    ngl_per_device, mem = high, mem_high
                    self.log(f"set ngl_per_device[{id_}].n_layer={ngl_per_device[id_].n_layer}")
            self.log(
                f"  - {self.devices[id_].name}: {ngl_per_device[id_].n_layer:2d} layers, "
                f"{mem[id_] // MiB:6d} MiB used, {(self.devices[id_].free - mem[id_]) // MiB:6d} MiB free"
            )
        if hp_nex == 0 or global_surplus_cpu_moe <= 0:  # fit.cpp 730-733
            self.apply(ngl_per_device, overflow_bufts)
            return

        # step 4 (fit.cpp 735-876): MoE with room for every dense weight: turn dense-only layers at the back into
        # full layers at the front, device by device, then try part of one more layer (its FFN split up)
        id_dense_start = nd
        for id_ in range(nd - 1, -1, -1):
            if ngl_per_device[id_].n_layer > 0:
                id_dense_start = id_
                continue
            break
        assert id_dense_start < nd
        self.log(
            "converting dense-only layers to full layers and filling them front-to-back with overflow to next "
            "device/system memory:"
        )
        id_ = 0
        while id_ <= id_dense_start and id_dense_start < nd:
            high = [dataclasses.replace(x) for x in ngl_per_device]
            for jd in range(id_dense_start, nd):
                n_layer_move = high[jd].n_layer if jd < nd - 1 else high[jd].n_layer - 1
                high[id_].n_layer += n_layer_move
                high[jd].n_layer -= n_layer_move
                high[jd].n_part = 0
            id_dense_start_high = nd - 1
            mem_high = self.memory_for_layers(high, overflow_bufts)

            if mem_high[id_] > targets[id_]:
                delta = high[id_].n_full - ngl_per_device[id_].n_full
                while delta > 1:
                    step = self._step(delta, targets[id_] - mem[id_], mem_high[id_] - mem[id_])
                    test = [dataclasses.replace(x) for x in ngl_per_device]
                    id_dense_start_test = id_dense_start
                    n_converted_test = 0
                    while id_dense_start_test < nd:  # fit.cpp 773-783
                        n_convert_jd = min(step - n_converted_test, test[id_dense_start_test].n_part)
                        test[id_dense_start_test].n_layer -= n_convert_jd
                        test[id_dense_start_test].n_part -= n_convert_jd
                        test[id_].n_layer += n_convert_jd
                        n_converted_test += n_convert_jd
                        if test[id_dense_start_test].n_part > 0:
                            break
                        id_dense_start_test += 1
                    mem_test = self.memory_for_layers(test, overflow_bufts)
                    if mem_test[id_] <= targets[id_]:
                        ngl_per_device, mem, id_dense_start = test, mem_test, id_dense_start_test
                        self.log(
                            f"set ngl_per_device[{id_}].(n_layer, n_part)=({ngl_per_device[id_].n_layer}, "
                            f"{ngl_per_device[id_].n_part}), id_dense_start={id_dense_start}"
                        )
                    else:
                        high, mem_high, id_dense_start_high = test, mem_test, id_dense_start_test
                        self.log(
                            f"set ngl_per_device_high[{id_}].(n_layer, n_part)=({high[id_].n_layer}, "
                            f"{high[id_].n_part}), id_dense_start_high={id_dense_start_high}"
                        )
                    delta = high[id_].n_full - ngl_per_device[id_].n_full
            else:
                ngl_per_device, mem, id_dense_start = high, mem_high, id_dense_start_high
                self.log(
                    f"set ngl_per_device[{id_}].(n_layer, n_part)=({ngl_per_device[id_].n_layer}, "
                    f"{ngl_per_device[id_].n_part}), id_dense_start={id_dense_start}"
                )

            # fit.cpp 810-860: try to fit at least part of one more layer
            if ngl_per_device[id_dense_start].n_layer > (0 if id_ < nd - 1 else 1):
                test = [dataclasses.replace(x) for x in ngl_per_device]
                id_dense_start_test = id_dense_start
                test[id_dense_start_test].n_layer -= 1
                test[id_dense_start_test].n_part -= 1
                test[id_].n_layer += 1
                test[id_].n_part += 1
                if test[id_dense_start_test].n_part == 0:
                    id_dense_start_test += 1
                overflow_bufts_test = list(overflow_bufts)
                if id_ < nd - 1:
                    overflow_bufts_test[id_] = self.devices[id_ + 1].name

                def attempt(test: list[Layers], fraction: LayerFraction) -> bool:
                    """fit.cpp 822-860: keep `fraction` of the extra layer on this device if it then fits."""
                    nonlocal ngl_per_device, overflow_bufts, mem, id_dense_start
                    test[id_].overflow_type = fraction
                    self.log(f"trying to fit one extra layer with overflow_type=LAYER_FRACTION_{fraction.name}")
                    mem_test = self.memory_for_layers(test, overflow_bufts_test)
                    if not self.fits(mem_test, targets, id_):
                        return False
                    ngl_per_device, overflow_bufts, mem = test, overflow_bufts_test, mem_test
                    id_dense_start = id_dense_start_test
                    self.log(
                        f"set ngl_per_device[{id_}].(n_layer, n_part, overflow_type)=("
                        f"{ngl_per_device[id_].n_layer}, {ngl_per_device[id_].n_part}, {fraction.name}), "
                        f"id_dense_start={id_dense_start}"
                    )
                    return True

                if attempt(test, LayerFraction.UP):
                    # fit.cpp 836: the same list, changed in place (llama.cpp copies it by value above)
                    attempt([dataclasses.replace(x) for x in test], LayerFraction.GATE)
                else:
                    attempt(test, LayerFraction.ATTN)
            self.log(
                f"  - {self.devices[id_].name}: {ngl_per_device[id_].n_layer:2d} layers "
                f"({ngl_per_device[id_].n_part:2d} overflowing), {mem[id_] // MiB:6d} MiB used, "
                f"{(self.devices[id_].free - mem[id_]) // MiB:6d} MiB free"
            )
            id_ += 1
        self.apply(ngl_per_device, overflow_bufts)

    @staticmethod
    def _step(delta: int, below: int, span: int) -> int:
        """fit.cpp 694-696 / 766-768: the false-position guess, as uint32_t, clamped to 1..delta-1."""
        step = _u32(_cdiv(delta * below, span))
        return min(max(step, 1), delta - 1)


# -- the breakdown from the planner --------------------------------------------------------------------------


def planner_breakdown(info: ModelInfo, devices: list[DeviceMemory], compute_of=None) -> Breakdown:
    """Each device's (model, context, compute) for a config, from the planner alone, as llama.cpp's no_alloc load
    reports them (fit.cpp 30-154, llama_context::memory_breakdown): weights by tensor placement (layers by
    cumulative split fractions, `-ot` buffers by device name), the KV cache of each device's layers, and the
    compute buffer each backend reserves (`compute_by_device`; `compute_of`: llama.cpp's own figures where it can
    give them, tuner.plan.llama_sizes). The last entry is the host."""
    names = tuple(d.name for d in devices)
    free = [d.free for d in devices] if devices else None

    def breakdown(cfg: TrialConfig) -> list[Usage]:
        return device_usage(cfg, info, free, names, no_alloc=True, compute_of=compute_of)

    return breakdown


def device_usage(
    cfg: TrialConfig,
    info: ModelInfo,
    free: list[int] | None,
    names: tuple[str, ...] = (),
    alignment: int = TENSOR_ALIGNMENT,
    no_alloc: bool = False,
    compute_of=None,
) -> list[Usage]:
    """The planner's llama_memory_breakdown: one Usage per device in `free`'s order, then the host's. Weights are
    summed as ggml_backend_alloc_ctx_tensors_from_buft_size sums them (each tensor padded to the buffer type's
    alignment: 32 for CPU and RPC buffers, ggml-impl.h TENSOR_ALIGNMENT). `no_alloc`: the compute buffers as a
    no_alloc load sizes them (what --fit plans with), else as a real load allocates them; `compute_of(cfg)`: the
    compute buffers as llama.cpp sizes them (devices, then the host), where it can (else None)."""
    n_dev = len(free) if free else 0
    gpu = n_dev > 0
    where, _ = placement.tensor_devices(cfg, info, gpu, free, names)
    layer_dev = placement.layer_devices(cfg, info, gpu, free) if gpu else [-1] * (info.n_layer + 1)
    model = [0] * (n_dev + 1)  # index -1: the host
    for t, d in zip(info.tensors, where):
        model[d] += planner.pad(t.n_bytes, alignment)
    if cfg.use_mmap:  # the host's weights are a view of the mapped file: llama.cpp's buffer is their span
        model[-1] = mapped_span([t for t, d in zip(info.tensors, where) if d < 0]) or model[-1]
    dev, extra = placement.tied_output_copy(info, where)
    if extra and dev < n_dev:
        model[dev] += planner.pad(extra, alignment)
    ctx = [0] * (n_dev + 1)
    if not planner.unmodelled_note(info):
        for il in range(info.n_layer):
            ctx[layer_dev[il]] += planner.kv_layer_bytes(cfg, info, il) + planner.rs_layer_bytes(
                info, il, cfg.streams()
            )
    asked = compute_of(cfg) if compute_of is not None and gpu else None
    if asked and not no_alloc:
        asked = planner.as_allocated(asked, cfg, info, layer_dev, n_dev)
    comp = asked or planner.compute_by_device(cfg, info, where, layer_dev, n_dev, no_alloc)
    return [Usage(model[i], ctx[i], comp[i]) for i in list(range(n_dev)) + [-1]]


def mapped_span(tensors) -> int | None:
    """The bytes llama.cpp maps for these host tensors with mmap (its CPU_Mapped model buffer): per file, from the
    first one's data to the last one's end (llama_model_loader::get_mapping_range), whatever lies between (tensors
    on the devices too). None where an offset is unknown."""
    spans: dict[int, tuple[int, int]] = {}
    for t in tensors:
        if t.offset < 0:
            return None
        lo, hi = spans.get(t.shard, (t.offset, t.offset + t.n_bytes))
        spans[t.shard] = (min(lo, t.offset), max(hi, t.offset + t.n_bytes))
    return sum(hi - lo for lo, hi in spans.values()) if spans else None


def rpc_devices(endpoints: list[str], host_ram: int) -> list[DeviceMemory]:
    """RPC servers on CPUs as llama.cpp sees them: each reports its host's RAM as free and total
    (ggml-cpu: sysconf(_SC_PHYS_PAGES) × page size) and names its buffer `RPC0[host:port]`."""
    return [DeviceMemory(free=host_ram, total=host_ram, name=f"RPC0[{e}]") for e in endpoints]


def parse_flags(text: str) -> dict:
    """llama-fit-params' printed line back into parts: {n_ctx, n_gpu_layers, tensor_split, overrides}."""
    out: dict = {"n_ctx": None, "n_gpu_layers": None, "tensor_split": [], "overrides": []}
    m = re.search(r"-c (\d+)", text)
    out["n_ctx"] = int(m[1]) if m else None
    m = re.search(r"-ngl (-?\d+)", text)
    out["n_gpu_layers"] = int(m[1]) if m else None
    m = re.search(r"-ts (\S+)", text)
    out["tensor_split"] = [float(x) for x in m[1].split(",")] if m else []
    m = re.search(r'-ot "([^"]*)"', text)
    if m:
        # a pattern may hold commas only inside (...) alternations: split at commas followed by "blk\."
        out["overrides"] = [tuple(item.rsplit("=", 1)) for item in re.split(r",(?=blk\\\.)", m[1])]
    return out

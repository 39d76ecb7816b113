"""Thin ctypes glue over llama-cpp-python's low-level API for what its bindings leave out.

llama-cpp-python binds `llama_model_params.tensor_buft_overrides` as an unused `c_void_p` and does not bind
ggml's threadpool API; llama-bench uses both. Everything here needs `llama_cpp` importable, so the worker and
the synthesizer import this module, the parent process does not.
"""

from __future__ import annotations

import ctypes
import os
import sys

import llama_cpp
import llama_cpp.llama_cpp as L

from tuner.record import moe_part_pattern

# llama.cpp's own regex for routed-expert tensors (common/common.h: LLM_FFN_EXPS_REGEX).
FFN_EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


# ggml's symbols through libllama's own handle: dlsym on it searches libllama's dependencies, the very ggml
# libraries llama.cpp uses. A CDLL of lib/libggml*.so would load second copies (the wheel ships libggml.so,
# .so.0 and .so.0.x as three files), with their own device registry and threadpool state: buffer types from
# there are unknown to llama.cpp, and a threadpool from there crashed the worker (SIGSEGV in
# llama_attach_threadpool on a build with -DGGML_RPC=on).
_ggml = _ggml_base = _ggml_cpu = L._lib

_ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
_ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
_ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
_ggml.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
_ggml.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
_ggml_base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
_ggml_base.ggml_backend_buft_name.restype = ctypes.c_char_p
for _fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
    getattr(_ggml, _fn).argtypes = [ctypes.c_void_p]
    getattr(_ggml, _fn).restype = ctypes.c_char_p
_ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
_ggml.ggml_backend_dev_type.restype = ctypes.c_int
_ggml.ggml_backend_dev_memory.argtypes = [
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_size_t),
    ctypes.POINTER(ctypes.c_size_t),
]
_ggml.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
_ggml.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
_ggml.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
_ggml.ggml_backend_reg_name.restype = ctypes.c_char_p
_ggml.ggml_backend_dev_get_props.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_ggml.ggml_backend_dev_get_props.restype = None

# enum ggml_backend_dev_type (ggml-backend.h)
DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
OFFLOAD_TYPES = ("gpu", "igpu")  # what n_gpu_layers places layers on (an RPC device reports itself as a gpu)


class DevProps(ctypes.Structure):
    """struct ggml_backend_dev_props (ggml-backend.h), up to the PCI bus id; `_spare` leaves room for the
    capabilities that follow it (five bools in this ggml, maybe more in a later one): ggml writes them all."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("description", ctypes.c_char_p),
        ("memory_free", ctypes.c_size_t),
        ("memory_total", ctypes.c_size_t),
        ("type", ctypes.c_int),
        ("device_id", ctypes.c_char_p),  # lower-case PCI bus id "0000:c1:00.0"; NULL where unknown
        ("_spare", ctypes.c_char * 64),
    ]


class TensorBuftOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }"""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def buffer_types() -> dict[str, int]:
    """Buffer types by name ("CPU", "CUDA0", ...), found as llama.cpp's `-ot` parser finds them."""
    out: dict[str, int] = {}
    for i in range(_ggml.ggml_backend_dev_count()):
        buft = _ggml.ggml_backend_dev_buffer_type(_ggml.ggml_backend_dev_get(i))
        if buft:
            out[_ggml_base.ggml_backend_buft_name(buft).decode()] = buft
    return out


def devices() -> list[dict]:
    """Every device the loaded llama.cpp enumerates (CUDA, ROCm, Vulkan, Metal, SYCL, RPC, the CPU...), as its
    backend registry reports it: name, description, type, backend, free and total memory in bytes, and the name
    of its buffer type (what llama.cpp's logs and `-ot` call it: "CUDA0", "RPC0[127.0.0.1:50052]" for every
    server's first device, whatever the device's own name), and its PCI bus id where the backend knows it."""
    out = []
    for i in range(_ggml.ggml_backend_dev_count()):
        dev = _ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        _ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        buft = _ggml.ggml_backend_dev_buffer_type(dev)
        props = DevProps()
        _ggml.ggml_backend_dev_get_props(dev, ctypes.byref(props))
        out.append(
            {
                "name": _ggml.ggml_backend_dev_name(dev).decode(errors="replace"),
                "description": _ggml.ggml_backend_dev_description(dev).decode(errors="replace"),
                "type": DEVICE_TYPES.get(_ggml.ggml_backend_dev_type(dev), "unknown"),
                "backend": _ggml.ggml_backend_reg_name(_ggml.ggml_backend_dev_backend_reg(dev)).decode(),
                "free": free.value,
                "total": total.value,
                "buffer": _ggml_base.ggml_backend_buft_name(buft).decode() if buft else "",
                # what matches it to NVML's GPU (tuner.measure.hardware.merge_devices): the PCI bus id
                "device_id": (props.device_id or b"").decode(errors="replace"),
            }
        )
    return out


def override_patterns(
    n_cpu_moe: int, cpu_moe: bool, overrides: tuple[str, ...], moe_part: str = "none"
) -> list[tuple[str, str]]:
    """(regex, buffer name) pairs in llama.cpp's order: raw -ot first, then --cpu-moe / --n-cpu-moe, then the
    partial layer after the --n-cpu-moe block (the `-ot` the forms print after --n-cpu-moe)."""
    pairs = []
    for item in overrides:
        pattern, _, buft = item.rpartition("=")
        pairs.append((pattern, buft))
    if cpu_moe:
        pairs.append((FFN_EXPS_REGEX, "CPU"))
    for i in range(n_cpu_moe):
        pairs.append((rf"blk\.{i}{FFN_EXPS_REGEX}", "CPU"))
    if moe_part != "none" and not cpu_moe:
        pairs.append((moe_part_pattern(n_cpu_moe, moe_part), "CPU"))
    return pairs


class Overrides:
    """A NULL-terminated override array that owns its pattern strings for the model's lifetime."""

    def __init__(self, pairs: list[tuple[str, str]]):
        known = buffer_types()
        self._patterns = [p.encode() for p, _ in pairs]  # kept alive: llama.cpp stores the pointers
        self.array = (TensorBuftOverride * (len(pairs) + 1))()
        for i, ((pattern, name), raw) in enumerate(zip(pairs, self._patterns)):
            if name not in known:
                raise ValueError(f"unknown buffer type {name!r} (this build has: {', '.join(sorted(known))})")
            self.array[i].pattern = raw
            self.array[i].buft = known[name]

    @property
    def pointer(self) -> int:
        return ctypes.cast(self.array, ctypes.c_void_p).value


# ggml threadpools, as llama-bench attaches one per context (ggml.h: struct ggml_threadpool_params).
class ThreadpoolParams(ctypes.Structure):
    _fields_ = [
        ("cpumask", ctypes.c_bool * 512),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


_ggml_base.ggml_threadpool_params_default.argtypes = [ctypes.c_int]
_ggml_base.ggml_threadpool_params_default.restype = ThreadpoolParams
_ggml_cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(ThreadpoolParams)]
_ggml_cpu.ggml_threadpool_new.restype = ctypes.c_void_p
_ggml_cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
_llama = L._lib
_llama.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
_llama.llama_detach_threadpool.argtypes = [ctypes.c_void_p]


class Threadpools:
    """One pool for generation and one for batches (when the counts differ), attached to a context."""

    def __init__(self, ctx, n_threads: int, n_threads_batch: int):
        self.ctx = ctx
        self.pools = [self._new(n_threads)]
        if n_threads_batch != n_threads:
            self.pools.append(self._new(n_threads_batch))
        _llama.llama_attach_threadpool(ctx, self.pools[0], self.pools[-1])

    @staticmethod
    def _new(n: int) -> int:
        params = _ggml_base.ggml_threadpool_params_default(n)
        pool = _ggml_cpu.ggml_threadpool_new(ctypes.byref(params))
        if not pool:
            raise RuntimeError(f"ggml_threadpool_new failed for {n} threads")
        return pool

    def free(self) -> None:
        _llama.llama_detach_threadpool(self.ctx)
        for p in self.pools:
            _ggml_cpu.ggml_threadpool_free(p)
        self.pools = []


def build_info() -> dict:
    """llama.cpp build facts recorded with every trial."""
    local = [d for d in devices() if d["type"] in OFFLOAD_TYPES]  # no RPC server is registered here
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": L.llama_print_system_info().decode(errors="replace").strip(),
        # a device to offload to, not only the ability: a build with the RPC backend "supports offload" with no
        # server registered, and a CUDA build on a machine without a GPU has no device either
        "gpu_offload": bool(L.llama_supports_gpu_offload()) and bool(local),
        # this machine's GPUs as the registry lists them, every backend (tuner.measure.hardware.model_devices picks
        # those a model loads onto, in llama.cpp's order)
        "devices": [
            {k: d[k] for k in ("name", "description", "backend", "type", "total", "buffer", "device_id")} for d in local
        ],
        "rpc": bool(L.llama_supports_rpc()),
        "buffer_types": sorted(buffer_types()),
    }


class LogCapture:
    """Route llama.cpp's log through Python: keep every line (debug included) and echo warnings and errors.

    The callback object is kept on the instance; ctypes would free it otherwise while llama.cpp still calls it.
    """

    LEVELS = {1: "debug", 2: "info", 3: "warn", 4: "error", 5: "cont"}

    def __init__(self, echo_level: int = 3, stream=None):
        self.lines: list[str] = []
        self.echo_level = echo_level
        self.stream = stream
        self._last = 2

        @L.llama_log_callback
        def _cb(level, text, _user):
            msg = text.decode(errors="replace") if text else ""
            level = self._last if level == 5 else level  # GGML_LOG_LEVEL_CONT continues the previous line
            self._last = level
            self.lines.append(msg)
            if len(self.lines) > 20000:
                del self.lines[:10000]
            if self.stream is not None and level >= self.echo_level:
                self.stream.write(msg)
                self.stream.flush()

        self._cb = _cb
        L.llama_log_set(self._cb, ctypes.c_void_p(0))

    def text(self) -> str:
        return "".join(self.lines)


def quantize(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    ftype: int,
    nthread: int = 0,
    allow_requantize: bool = False,
    pure: bool = False,
) -> None:
    """Write `dst` as llama.cpp's quantizer does; `allow_requantize` accepts an already quantized `src`
    (lower quants of a real model when only its Q4_K_M is at hand); `pure` gives every weight matrix the
    ftype's base type (llama-quantize --pure: the probe's one-type models)."""
    log = LogCapture(echo_level=3, stream=sys.stderr)  # keep the per-tensor progress out of the terminal
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    params.allow_requantize = allow_requantize
    params.pure = pure
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for {dst}: {log.text()[-300:]}")


# -- llama.cpp's RPC backend -----------------------------------------------------------------------------------
# llama-cpp-python 0.3.36 ignores `rpc_servers` (no such Llama parameter, no field in llama_model_params), so
# servers are added as llama-server's --rpc adds them: through the RPC registry's proc addresses, then
# ggml_backend_register. Registration is per process and permanent; an unreachable server aborts the process
# (GGML_ABORT "Failed to connect"), so only a worker, never the parent, registers.
_ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
_ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
_ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
_ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
_ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
_ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
_ggml.ggml_backend_buffer_get_size.argtypes = [ctypes.c_void_p]
_ggml.ggml_backend_buffer_get_size.restype = ctypes.c_size_t
_RPC_ADD = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_RPC_SERVE = ctypes.CFUNCTYPE(
    None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)
)


def _rpc_proc(name: str) -> int:
    reg = _ggml.ggml_backend_reg_by_name(b"RPC")
    addr = _ggml.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None
    if not addr:
        raise RuntimeError("this llama.cpp build has no RPC backend (build llama-cpp-python with -DGGML_RPC=on)")
    return addr


def rpc_add_servers(endpoints: list[str]) -> None:
    """Add every server's devices to llama.cpp's device list (after this, n_gpu_layers and tensor_split place
    layers on them, as on GPUs). Aborts the process when a server is unreachable: llama.cpp's own behaviour."""
    add = _RPC_ADD(_rpc_proc("ggml_backend_rpc_add_server"))
    for endpoint in endpoints:
        reg = add(endpoint.encode())
        if not reg:
            raise RuntimeError(f"RPC server {endpoint} reports no device")
        _ggml.ggml_backend_register(reg)


# struct offsets in ggml-backend-impl.h (GGML_BACKEND_API_VERSION 2): ggml_backend_device_i.get_memory is its 3rd
# function pointer, ggml_backend_buffer_type_i.alloc_buffer its 2nd, ggml_backend_buffer_i.free_buffer its 1st
_PTR = ctypes.sizeof(ctypes.c_void_p)
_GET_MEMORY = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t))
_ALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class DeviceCap:
    """The CPU device as a device of `size` bytes: what it reports (free = size - allocated, total = size) and
    what its buffers may take agree, as on a GPU of that size. A buffer that would pass the size is refused
    (NULL), which the RPC server answers as a failed allocation: the client fails the load (`unable to allocate
    RPC0[...] buffer`) or the context (`failed to allocate compute buffers`), as a too-small GPU does.

    `holds=False`: a device that only sizes (`tuner rpc-server --sizing-only`): it reports `size` and refuses every
    buffer, so llama.cpp's no_alloc load (which allocates nothing: the size of a buffer it would allocate is all it
    asks) sizes a GPU that is not there, and a real load fails at its first buffer instead of taking this host's RAM.

    Patches the function pointers of this process's CPU device and buffer type (static structs of ggml), so
    it belongs in a process that serves nothing else: `tuner rpc-server --mem`.
    """

    def __init__(self, size: int, log=None, holds: bool = True):
        self.size, self.used, self.log, self.holds = size, 0, log or (lambda line: None), holds
        dev = _ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
        self.device = dev
        buft = _ggml.ggml_backend_dev_buffer_type(dev)
        self._alloc_slot = ctypes.c_void_p.from_address(buft + 1 * _PTR)
        self._orig_alloc = _ALLOC(self._alloc_slot.value)
        self._orig_free: dict[int, object] = {}
        self._sizes: dict[int, int] = {}
        # the callbacks live as long as this object: ggml calls them until the process ends
        self._get_memory_cb = _GET_MEMORY(self._get_memory)
        self._alloc_cb = _ALLOC(self._alloc)
        self._free_cb = _FREE(self._free)
        ctypes.c_void_p.from_address(dev + 2 * _PTR).value = ctypes.cast(self._get_memory_cb, ctypes.c_void_p).value
        self._alloc_slot.value = ctypes.cast(self._alloc_cb, ctypes.c_void_p).value

    def _get_memory(self, dev, free, total) -> None:
        free[0], total[0] = max(self.size - self.used, 0), self.size

    def _alloc(self, buft, size) -> int | None:
        if not self.holds and size:
            self.log(f"refused a buffer of {size} bytes: this device only sizes (--sizing-only)")
            return None
        if self.used + size > self.size:
            self.log(f"refused a buffer of {size} bytes: {self.used} of {self.size} in use")
            return None
        buf = self._orig_alloc(buft, size)
        if buf:
            actual = _ggml.ggml_backend_buffer_get_size(buf)
            self.used += actual
            self._sizes[buf] = actual
            slot = ctypes.c_void_p.from_address(buf)  # its iface.free_buffer
            self._orig_free[buf] = _FREE(slot.value)
            slot.value = ctypes.cast(self._free_cb, ctypes.c_void_p).value
        return buf

    def _free(self, buf) -> None:
        self.used -= self._sizes.pop(buf, 0)
        self._orig_free.pop(buf)(buf)


def rpc_serve(endpoint: str, threads: int, cache_dir: str | None = None) -> None:
    """Serve this host's CPU device to RPC clients (blocks for ever; llama.cpp's ggml-rpc-server in-process)."""
    serve = _RPC_SERVE(_rpc_proc("ggml_backend_rpc_start_server"))
    devs = (ctypes.c_void_p * 1)(_ggml.ggml_backend_dev_by_type(0))  # GGML_BACKEND_DEVICE_TYPE_CPU
    serve(endpoint.encode(), cache_dir.encode() if cache_dir else None, threads, 1, devs)

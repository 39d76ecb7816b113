"""Hardware probe: CPU, memory, swap and GPUs. No GPU and no NVML is a normal case.

The GPUs are the devices the installed llama.cpp enumerates (every backend: CUDA, ROCm, Vulkan, Metal, SYCL), in
its order, the order n_gpu_layers, tensor_split and main_gpu count in; NVML adds what only it knows (a process's
VRAM, the driver) to the NVIDIA ones, matched by PCI bus id (`merge_devices`). Without a build that enumerates
them (a CPU build), NVML's GPUs as NVML lists them.

`Nvml` wraps the `pynvml` module (nvidia-ml-py). Tests on machines without a GPU hand it a fake module
(tests/fake_nvml.py, named as such); nothing else in tuner talks to NVML directly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import psutil


@dataclass
class GPU:
    index: int  # NVML's index; -1 for a device NVML does not know (not NVIDIA's)
    name: str
    uuid: str
    vram_total: int
    vram_free: int
    driver: str
    cuda: str
    pci: str = ""  # PCI bus id, "0000:01:00.0"
    llama: str = ""  # the name llama.cpp gives its buffers ("CUDA0", "ROCm1", "Vulkan0"); "" where it has none
    backend: str = ""  # llama.cpp's backend for it ("CUDA", "ROCm", "Vulkan"...)

    @property
    def device(self) -> str:
        """What llama.cpp's buffers on it are called; NVML's index as CUDA's where llama.cpp was not asked."""
        return self.llama or f"CUDA{self.index}"


@dataclass
class Hardware:
    cpu: str
    cores_physical: int
    cores_logical: int
    ram_total: int
    ram_available: int
    swap_total: int
    swap_free: int
    os: str
    gpus: list[GPU] = field(default_factory=list)
    nvml: str = ""  # why NVML is unavailable, empty when it works
    gpu_offload: bool | None = None  # whether the installed llama-cpp-python build can offload

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint_dict(self) -> dict:
        """What makes two machines comparable: not the free memory of the moment."""
        return {
            "cpu": self.cpu,
            "cores_physical": self.cores_physical,
            "cores_logical": self.cores_logical,
            "ram_total_gib": round(self.ram_total / 2**30),
            "os": platform.system(),
            # as a set: the same cards whichever order NVML or llama.cpp lists them in
            "gpus": sorted(
                (
                    {"name": g.name, "vram_total_gib": round(g.vram_total / 2**30), "driver": g.driver}
                    for g in self.gpus
                ),
                key=lambda g: json.dumps(g, sort_keys=True),
            ),
        }

    def fingerprint(self) -> str:
        return digest(self.fingerprint_dict())


def from_dict(d: dict) -> Hardware:
    """The machine a record was measured on (TrialRecord.hw), as a Hardware."""
    return Hardware(**{k: v for k, v in d.items() if k != "gpus"}, gpus=[GPU(**g) for g in d.get("gpus", [])])


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class Nvml:
    """NVML access for the probe and the runner's VRAM sampling; `module` is pynvml or a fake."""

    def __init__(self, module=None):
        self.error = ""
        self.nv = None
        try:
            if module is None:
                import pynvml as module  # noqa: PLC0415 - NVML is optional: without it (no NVIDIA driver) the probe reports no GPU
            module.nvmlInit()
            self.nv = module
            self.handles = [module.nvmlDeviceGetHandleByIndex(i) for i in range(module.nvmlDeviceGetCount())]
        except Exception as e:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ImportError...
            self.nv = None
            self.handles = []
            self.error = f"NVML unavailable: {e}"
        self.slots = list(self.handles)  # what sample() reads, in the probe's order (align)

    @property
    def available(self) -> bool:
        return self.nv is not None

    def gpus(self) -> list[GPU]:
        if not self.nv:
            return []
        nv = self.nv
        driver = _s(nv.nvmlSystemGetDriverVersion())
        try:
            v = nv.nvmlSystemGetCudaDriverVersion()
            cuda = f"{v // 1000}.{v % 1000 // 10}"
        except Exception:  # noqa: BLE001 - older drivers lack it
            cuda = ""
        out = []
        for i, h in enumerate(self.handles):
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            try:
                pci = pci_id(_s(nv.nvmlDeviceGetPciInfo(h).busId))
            except Exception:  # noqa: BLE001 - not every device or driver answers it: matched by order then
                pci = ""
            out.append(
                GPU(
                    i,
                    _s(nv.nvmlDeviceGetName(h)),
                    _s(nv.nvmlDeviceGetUUID(h)),
                    int(mem.total),
                    int(mem.free),
                    driver,
                    cuda,
                    pci=pci,
                )
            )
        return out

    def align(self, gpus: list[GPU]) -> None:
        """Sample in the order of `gpus` (the probe's: llama.cpp's), nothing for a GPU NVML does not know, so a
        record's per-GPU figures line up with the planner's devices."""
        self.slots = [self.handles[g.index] if 0 <= g.index < len(self.handles) else None for g in gpus]

    def process_vram(self, pids: set[int]) -> list[int]:
        """VRAM in use by these processes, per GPU (0 where they hold none)."""
        return self.sample(pids).process

    def sample(self, pids: set[int]) -> "VramSample":
        """Per GPU: VRAM of these processes (and whether NVML listed any of them at all), and the device's used
        memory. In a container NVML lists the host's PIDs, so the worker is never found there."""
        s = VramSample()
        if not self.nv:
            return s
        for h in self.slots:
            if h is None:  # a device NVML does not know: no figure
                s.process.append(0)
                s.device.append(-1)
                continue
            used = 0
            try:
                procs = self.nv.nvmlDeviceGetComputeRunningProcesses(h)
            except Exception:  # noqa: BLE001 - not supported on some devices: no per-process figure
                procs = []
            for p in procs:
                if p.pid in pids:
                    s.seen = True
                    used += int(p.usedGpuMemory or 0)
            s.process.append(used)
            try:
                s.device.append(int(self.nv.nvmlDeviceGetMemoryInfo(h).used))
            except Exception:  # noqa: BLE001 - a device that stopped answering: no device figure either
                s.device.append(-1)
        return s

    def device_used(self) -> list[int]:
        """Each GPU's used memory now (the baseline a worker's device-wide figure is taken over)."""
        return self.sample(set()).device


@dataclass
class VramSample:
    process: list[int] = field(default_factory=list)
    seen: bool = False
    device: list[int] = field(default_factory=list)  # -1 where unknown


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pci_id(bus: str) -> str:
    """A PCI bus id as ggml writes it ("0000:01:00.0", lower case) from NVML's ("00000000:01:00.0") or another
    spelling; "" when it is none."""
    try:
        # ggml-cuda's virtual devices on one card append "-v1", "-v2"...: the card's own id
        dom, bus_, rest = bus.strip().lower().split("-")[0].split(":")
        dev, fn = rest.split(".")
        return f"{int(dom, 16):04x}:{int(bus_, 16):02x}:{int(dev, 16):02x}.{int(fn, 16):x}"
    except ValueError:
        return ""


def model_devices(devs: list[dict]) -> list[dict]:
    """The local devices llama.cpp loads a model onto by default, in its order (src/llama.cpp,
    llama_model_load_from_file_impl, "default device selection"): the discrete GPUs in registry order, one per
    PCI bus id (a card that two backends list, CUDA and Vulkan, is used through the first); the integrated
    ones (of the first such backend) only where there is no discrete GPU. RPC servers' devices go in front of
    these when --rpc adds them."""
    gpus, igpus, ids = [], [], set()
    for d in devs:
        if d.get("backend") == "RPC":
            continue
        if d.get("type") == "gpu":
            if d.get("device_id") and d["device_id"] in ids:
                continue
            ids.add(d.get("device_id"))
            gpus.append(d)
        elif d.get("type") == "igpu" and (not igpus or d.get("backend") == igpus[-1].get("backend")):
            igpus.append(d)
    return gpus or igpus


def merge_devices(nvml_gpus: list[GPU], llama: list[dict]) -> list[GPU]:
    """The GPUs in llama.cpp's order (`llama`: build_info()["devices"], as model_devices selects them), each
    NVIDIA one with NVML's figures, matched by PCI bus id (CUDA's own order is fastest first unless
    CUDA_DEVICE_ORDER=PCI_BUS_ID, NVML's is the bus's). Where neither side gives ids, CUDA devices pair with NVML's
    in order, as when both have one. NVML's GPUs that llama.cpp does not see (hidden by CUDA_VISIBLE_DEVICES, or a
    CPU build) follow, without a llama name: nothing is placed on them."""
    left = list(nvml_gpus)
    out = []
    for d in model_devices(llama):
        pci = pci_id(d.get("device_id") or "")
        g = next((g for g in left if pci and g.pci == pci), None)
        if g is None and d.get("backend") == "CUDA" and not pci and not any(x.pci for x in left):
            g = left[0] if left else None
        if g is not None:
            left.remove(g)
            out.append(replace(g, pci=g.pci or pci, llama=buffer_name(d), backend=d.get("backend", "")))
        else:
            total = int(d.get("total") or 0)
            out.append(
                GPU(
                    -1,
                    d.get("description") or d["name"],
                    "",
                    total,
                    total,
                    "",
                    "",
                    pci=pci,
                    llama=buffer_name(d),
                    backend=d.get("backend", ""),
                )
            )
    return out + left


def offload_gpus(hw: Hardware) -> list[GPU]:
    """The GPUs llama.cpp places layers on, in its order (a prefix of hw.gpus): those it enumerates (none for a CPU
    build, whatever NVML lists), or, where llama.cpp was not asked (an NVML handed to `probe`, an old record),
    every GPU, NVML's taken as CUDA's."""
    if hw.gpu_offload is None:  # probe sets it when it asks llama.cpp
        return list(hw.gpus)
    return [g for g in hw.gpus if g.llama]


def probe(nvml: Nvml | None = None, with_llama: bool | None = None) -> Hardware:
    """This machine; `with_llama` (default: unless an `nvml` is handed in, which then says what the GPUs are: the
    tests' fake): its GPUs as the installed llama.cpp enumerates them, NVML's matched to them (merge_devices;
    build_info is cached on disk, so this costs a process start once per build and machine)."""
    with_llama = nvml is None if with_llama is None else with_llama
    nvml = nvml or Nvml()
    vm, sw = psutil.virtual_memory(), psutil.swap_memory()
    hw = Hardware(
        cpu=cpu_name(),
        cores_physical=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        cores_logical=psutil.cpu_count() or 1,
        ram_total=vm.total,
        ram_available=vm.available,
        swap_total=sw.total,
        swap_free=sw.free,
        os=f"{platform.system()} {platform.release()}",
        gpus=nvml.gpus(),
        nvml=nvml.error,
    )
    if with_llama:
        build = build_info()
        hw.gpu_offload = build["gpu_offload"]
        hw.gpus = merge_devices(hw.gpus, build.get("devices") or [])
        nvml.align(hw.gpus)
    return hw


VISIBLE = (
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "GGML_VK_VISIBLE_DEVICES",
    "ONEAPI_DEVICE_SELECTOR",
)


def _device_key() -> list:
    """What changes the devices a build lists, cheaply: the GPU nodes the kernel shows and the variables that
    hide or reorder them."""
    nodes = []
    for d in ("/proc/driver/nvidia/gpus", "/dev/dri"):
        try:
            nodes += sorted(os.listdir(d))
        except OSError:
            pass
    return [nodes, [os.environ.get(v) for v in VISIBLE]]


@lru_cache(maxsize=1)
def build_info() -> dict:
    """llama.cpp build facts, asked of a child interpreter: the parent never loads llama.cpp (or CUDA).

    Cached on disk per installed libllama (path, size, mtime), so a rebuild (e.g. with CUDA) is noticed and
    an unchanged build costs no extra process start.
    """
    spec = importlib.util.find_spec("llama_cpp")
    cache = None
    if spec and spec.submodule_search_locations:
        lib = Path(list(spec.submodule_search_locations)[0]) / "lib" / "libllama.so"
        if lib.exists():
            st = lib.stat()
            # the devices it lists are this machine's as the drivers and the *_VISIBLE_DEVICES variables show them
            key = digest([str(lib), st.st_size, st.st_mtime_ns, sys.executable, _device_key()])
            cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tuner" / f"build-{key}.json"
            if cache.exists():
                try:
                    return json.loads(cache.read_text())
                except ValueError:
                    pass
    code = "import json, tuner.llama as g; print(json.dumps(g.build_info()))"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        return {"error": f"cannot load llama_cpp: {e}", "gpu_offload": False}
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(info))
        except OSError:
            pass
    return info


def buffer_name(dev: dict) -> str:
    """A device of `llama_devices` by the name llama.cpp gives its buffers (and `-ot` reads), as ggml names its
    buffer type: an RPC server's is "RPC0[host:port]" for every server (its per-server index, then the endpoint),
    while the device itself is RPC0, RPC1, ..."""
    return dev.get("buffer") or dev["name"]


def llama_devices(rpc: tuple[str, ...] = ()) -> list[dict]:
    """The devices the installed llama.cpp enumerates (every backend: CUDA, ROCm, Vulkan, Metal, SYCL, the CPU),
    with the RPC servers' devices added as llama-server's --rpc adds them; free and total memory as each reports
    it. Asked of a child interpreter, as build_info is: an unreachable server aborts the process that adds it.
    Raises RuntimeError (one line) when the child fails."""
    code = (
        "import json, sys, tuner.llama as g; rpc = [e for e in sys.argv[1].split(',') if e]; "
        "rpc and g.rpc_add_servers(rpc); print(json.dumps(g.devices()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, ",".join(rpc)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, GGML_NO_BACKTRACE="1"),
    )
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        raise RuntimeError(f"llama.cpp could not list its devices: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rpc_devices(endpoints: tuple[str, ...]) -> list[dict]:
    """The devices the RPC servers at `endpoints` add (`llama_devices`, the RPC backend's only); none without one."""
    return [d for d in llama_devices(endpoints) if d["backend"] == "RPC"] if endpoints else []


FINGERPRINT_SALT = "TUNER_FINGERPRINT_SALT"


def build_fingerprint(build: dict) -> str:
    """What makes two builds comparable. TUNER_FINGERPRINT_SALT (when set) is mixed in: it keeps builds apart that
    tuner cannot tell apart itself (the same wheel against another driver or library setup), and lets the tests
    make a host of another build on one machine."""
    facts = {k: build.get(k) for k in ("llama_cpp_python", "system_info", "gpu_offload")}
    if os.environ.get(FINGERPRINT_SALT):
        facts["salt"] = os.environ[FINGERPRINT_SALT]
    return digest(facts)

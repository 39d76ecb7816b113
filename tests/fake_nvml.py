"""FakeNvml: a FAKE stand-in for the `pynvml` module (nvidia-ml-py), for tests on machines without a GPU.

It is the only fake in the test suite, and it fakes only NVML: llama.cpp, the worker and the runner are
always real. It implements the calls tuner.measure.hardware.Nvml makes, with pynvml's names and return shapes
(memory info objects with total/free/used, process entries with pid/usedGpuMemory, bytes or str names),
and it can hand out a per-GPU process list computed at call time, so a test can make a real worker pid
"use" VRAM and check that the runner records its peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

GiB = 1 << 30
MiB = 1 << 20


class FakeNVMLError(Exception):
    """Raised where pynvml would raise NVMLError (e.g. 'NVML Shared Library Not Found')."""


@dataclass
class FakeGpu:
    name: str = "FAKE NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-fake-0000"
    total: int = 80 * GiB
    used: int = 1 * GiB
    # nvmlDeviceGetPciInfo().busId, as NVML spells it; None: PCI domain fa0N (N the index), which no card of the
    # machine running the tests has, so a real llama.cpp device is never matched to a fake GPU
    bus_id: str | None = None


@dataclass
class FakeNvml:
    """Module-like object: pass it to tuner.measure.hardware.Nvml(module=...) or put it in sys.modules['pynvml']."""

    gpus: list[FakeGpu] = field(default_factory=lambda: [FakeGpu()])
    driver: str | bytes = "550.54.15"
    cuda: int | None = 12040  # nvmlSystemGetCudaDriverVersion: 12040 = CUDA 12.4; None = call unsupported
    init_error: str | None = None  # e.g. "NVML Shared Library Not Found": what a machine without a GPU gives
    # (gpu index, call number) -> [(pid, usedGpuMemory or None)]; default: no processes
    processes: Callable[[int, int], list[tuple[int, int | None]]] | None = None
    process_list_error: str | None = None  # nvmlDeviceGetComputeRunningProcesses unsupported on this device
    # (gpu index, call number) -> the device's used bytes, computed at call time; default: FakeGpu.used
    device_used: Callable[[int, int], int] | None = None
    calls: dict[str, int] = field(default_factory=dict)

    NVMLError = FakeNVMLError

    def _count(self, name: str) -> int:
        n = self.calls.get(name, 0)
        self.calls[name] = n + 1
        return n

    def nvmlInit(self) -> None:
        self._count("nvmlInit")
        if self.init_error:
            raise FakeNVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self._count("nvmlShutdown")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int):
        if not 0 <= i < len(self.gpus):
            raise FakeNVMLError("Invalid Argument")
        return SimpleNamespace(index=i)  # opaque to callers, as pynvml's handles are

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        if self.cuda is None:
            raise FakeNVMLError("Not Supported")
        return self.cuda

    def nvmlDeviceGetName(self, h) -> bytes:
        return self.gpus[h.index].name.encode()  # older pynvml returns bytes; tuner decodes both

    def nvmlDeviceGetUUID(self, h) -> str:
        return self.gpus[h.index].uuid

    def nvmlDeviceGetPciInfo(self, h):
        g = self.gpus[h.index]
        return SimpleNamespace(busId=(g.bus_id or f"0000fa0{h.index}:01:00.0").encode())  # bytes, as older pynvml

    def nvmlDeviceGetMemoryInfo(self, h):
        g = self.gpus[h.index]
        n = self._count(f"mem{h.index}")
        used = self.device_used(h.index, n) if self.device_used else g.used
        return SimpleNamespace(total=g.total, used=used, free=g.total - used)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        n = self._count(f"procs{h.index}")
        if self.process_list_error:
            raise FakeNVMLError(self.process_list_error)
        if self.processes is None:
            return []
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.processes(h.index, n)]


def no_gpu() -> FakeNvml:
    """What pynvml does on a machine without an NVIDIA driver."""
    return FakeNvml(gpus=[], init_error="NVML Shared Library Not Found")

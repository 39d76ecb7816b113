"""Hardware probe, the NVML wrapper and the runner's VRAM sampling, against FakeNvml (no GPU here).

Only NVML is faked (tests/fake_nvml.py); the runner and the worker in the VRAM test are real processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys

import psutil
import pytest
from click.testing import CliRunner
from fake_nvml import FakeGpu, FakeNvml, GiB, MiB, no_gpu

from tuner.cli import cli
from tuner.measure import hardware
from tuner.measure.runner import Runner, resolve
from tuner.record import TrialConfig


def test_nvml_lists_gpus_from_fake_module():
    fake = FakeNvml(gpus=[FakeGpu(), FakeGpu(name="FAKE RTX 4090", uuid="GPU-fake-1", total=24 * GiB, used=2 * GiB)])
    nv = hardware.Nvml(module=fake)
    assert nv.available and nv.error == ""
    gpus = nv.gpus()
    assert [g.index for g in gpus] == [0, 1]
    assert gpus[0].name == "FAKE NVIDIA H100 80GB HBM3"  # bytes from the module, decoded
    assert gpus[1].uuid == "GPU-fake-1"
    assert gpus[1].vram_total == 24 * GiB and gpus[1].vram_free == 22 * GiB
    assert {g.driver for g in gpus} == {"550.54.15"} and {g.cuda for g in gpus} == {"12.4"}


def test_nvml_old_driver_without_cuda_version_call():
    gpus = hardware.Nvml(module=FakeNvml(cuda=None, driver=b"470.1")).gpus()
    assert gpus[0].cuda == "" and gpus[0].driver == "470.1"


def test_nvml_unavailable_is_a_normal_state():
    nv = hardware.Nvml(module=no_gpu())
    assert not nv.available
    assert nv.error == "NVML unavailable: NVML Shared Library Not Found"
    assert nv.gpus() == [] and nv.process_vram({os.getpid()}) == []


def test_process_vram_counts_only_the_given_pids_per_gpu():
    procs = {0: [(10, 300 * MiB), (11, 5 * GiB), (12, None)], 1: [(10, 40 * MiB), (12, 7 * MiB)]}
    fake = FakeNvml(gpus=[FakeGpu(), FakeGpu(uuid="GPU-fake-1")], processes=lambda i, n: procs[i])
    nv = hardware.Nvml(module=fake)
    # pid 11 is someone else's; pid 12 has no per-process figure on GPU 0 (pynvml gives None)
    assert nv.process_vram({10, 12}) == [300 * MiB, 40 * MiB + 7 * MiB]
    assert nv.process_vram({99}) == [0, 0]


# llama.cpp's devices as build_info()["devices"] lists them, in the shape tuner.llama.devices() gives (ggml-cuda.cu
# and ggml-vulkan.cpp report the PCI bus id in lower case, "%04x:%02x:%02x.%x")
def cuda(i: int, desc: str, pci: str) -> dict:
    return {
        "name": f"CUDA{i}",
        "description": desc,
        "backend": "CUDA",
        "type": "gpu",
        "total": 24 * GiB,
        "buffer": f"CUDA{i}",
        "device_id": pci,
    }


def nvml_two() -> list[hardware.GPU]:
    fake = FakeNvml(
        gpus=[
            FakeGpu(name="FAKE RTX 3090", uuid="GPU-a", total=24 * GiB, bus_id="00000000:01:00.0"),
            FakeGpu(name="FAKE RTX 4090", uuid="GPU-b", total=24 * GiB, bus_id="00000000:0A:00.0"),
        ]
    )
    return hardware.Nvml(module=fake).gpus()


def test_gpus_in_llama_order_matched_to_nvml_by_pci_bus_id():
    # CUDA's default order is fastest first: the 4090 on bus 0a is CUDA0, NVML's second
    merged = hardware.merge_devices(
        nvml_two(),
        [cuda(0, "NVIDIA GeForce RTX 4090", "0000:0a:00.0"), cuda(1, "NVIDIA GeForce RTX 3090", "0000:01:00.0")],
    )
    assert [(g.llama, g.index, g.uuid, g.pci) for g in merged] == [
        ("CUDA0", 1, "GPU-b", "0000:0a:00.0"),
        ("CUDA1", 0, "GPU-a", "0000:01:00.0"),
    ]
    assert [
        g.device for g in hardware.offload_gpus(hardware.Hardware("c", 1, 1, 1, 1, 0, 0, "l", merged, gpu_offload=True))
    ] == [
        "CUDA0",
        "CUDA1",
    ]


def test_a_device_nvml_does_not_know_joins_and_a_hidden_gpu_is_not_placed_on():
    vk = {
        "name": "Vulkan0",
        "description": "AMD Radeon RX 7900 XTX",
        "backend": "Vulkan",
        "type": "gpu",
        "total": 24 * GiB,
        "buffer": "Vulkan0",
        "device_id": "0000:03:00.0",
    }
    # CUDA_VISIBLE_DEVICES=1: llama.cpp sees the 4090 only
    merged = hardware.merge_devices(nvml_two(), [vk, cuda(0, "NVIDIA GeForce RTX 4090", "0000:0a:00.0")])
    assert [(g.llama, g.index, g.name) for g in merged] == [
        ("Vulkan0", -1, "AMD Radeon RX 7900 XTX"),  # no NVML figures: its memory as llama.cpp reports it
        ("CUDA0", 1, "FAKE RTX 4090"),
        ("", 0, "FAKE RTX 3090"),  # NVML's, hidden from llama.cpp: listed last, nothing placed on it
    ]
    hw = hardware.Hardware("c", 1, 1, 1, 1, 0, 0, "l", merged, gpu_offload=True)  # as probe() asked llama.cpp
    assert [g.device for g in hardware.offload_gpus(hw)] == ["Vulkan0", "CUDA0"]
    assert merged[0].vram_total == merged[0].vram_free == 24 * GiB


def test_a_cpu_build_places_nothing_on_nvmls_gpus():
    nvml = nvml_two()
    # llama.cpp asked (a CPU build: it lists no GPU): NVML's cards are there, but nothing can be placed on them
    asked = hardware.Hardware("c", 1, 1, 1, 1, 0, 0, "l", hardware.merge_devices(nvml, []), gpu_offload=False)
    assert len(asked.gpus) == 2 and hardware.offload_gpus(asked) == []
    # not asked (an NVML handed to probe, an old record): NVML's GPUs, taken as CUDA's
    told = hardware.Hardware("c", 1, 1, 1, 1, 0, 0, "l", nvml)
    assert [g.device for g in hardware.offload_gpus(told)] == ["CUDA0", "CUDA1"]


def test_the_devices_a_model_loads_onto_are_llama_cpps_default_selection():
    vk_dup = {
        **cuda(0, "NVIDIA GeForce RTX 4090", "0000:0a:00.0"),
        "name": "Vulkan0",
        "buffer": "Vulkan0",
        "backend": "Vulkan",
    }
    igpu = {
        "name": "Vulkan1",
        "description": "AMD Radeon 780M",
        "backend": "Vulkan",
        "type": "igpu",
        "total": 16 * GiB,
        "buffer": "Vulkan1",
        "device_id": "0000:c4:00.0",
    }
    rpc = {
        "name": "RPC0",
        "description": "127.0.0.1:50052",
        "backend": "RPC",
        "type": "gpu",
        "total": GiB,
        "buffer": "RPC0[127.0.0.1:50052]",
        "device_id": "",
    }
    # one card seen by CUDA and by Vulkan is used once, through the first backend; an iGPU only without a dGPU
    picked = hardware.model_devices([cuda(0, "NVIDIA GeForce RTX 4090", "0000:0a:00.0"), vk_dup, igpu, rpc])
    assert [d["buffer"] for d in picked] == ["CUDA0"]
    assert [d["buffer"] for d in hardware.model_devices([igpu, rpc])] == ["Vulkan1"]
    merged = hardware.merge_devices([], [igpu])
    assert [(g.llama, g.index, g.vram_total) for g in merged] == [("Vulkan1", -1, 16 * GiB)]


def test_pci_ids_are_compared_as_numbers():
    assert hardware.pci_id("00000000:0A:00.0") == hardware.pci_id("0000:0a:00.0") == "0000:0a:00.0"
    assert hardware.pci_id("") == hardware.pci_id("not a bus id") == ""


def test_vram_samples_follow_the_probe_order():
    # NVML's GPU 1 is llama.cpp's first device; a Vulkan device in between has no NVML figure
    procs = {0: [(10, 100 * MiB)], 1: [(10, 700 * MiB)]}
    fake = FakeNvml(gpus=[FakeGpu(uuid="GPU-a"), FakeGpu(uuid="GPU-b")], processes=lambda i, n: procs[i])
    nv = hardware.Nvml(module=fake)
    gpus = nv.gpus()
    order = [
        dataclasses.replace(gpus[1], llama="CUDA0"),
        hardware.GPU(-1, "AMD", "", GiB, GiB, "", "", llama="Vulkan0"),
        dataclasses.replace(gpus[0], llama="CUDA1"),
    ]
    nv.align(order)
    s = nv.sample({10})
    assert s.process == [700 * MiB, 0, 100 * MiB]
    assert s.device[1] == -1 and s.device[0] >= 0 and s.device[2] >= 0


def test_llama_devices_carry_their_pci_bus_id():
    """The real llama.cpp here (a child interpreter): every device says its PCI bus id, empty where its backend
    has none (the CPU's)."""
    devs = hardware.llama_devices()
    assert devs and all(isinstance(d["device_id"], str) for d in devs)
    assert next(d for d in devs if d["backend"] == "CPU")["device_id"] == ""
    # on a GPU build (the GPU check runs this suite on CUDA): its GPUs, each CUDA one with the id NVML is matched by
    for d in hardware.build_info()["devices"]:
        assert d["type"] in ("gpu", "igpu") and (d["backend"] != "CUDA" or hardware.pci_id(d["device_id"]))


def test_process_vram_unsupported_device_reports_zero():
    nv = hardware.Nvml(module=FakeNvml(process_list_error="Not Supported"))
    assert nv.process_vram({os.getpid()}) == [0]


def test_probe_with_fake_gpus_changes_the_fingerprint():
    cpu_only = hardware.probe(hardware.Nvml(module=no_gpu()))
    with_gpu = hardware.probe(hardware.Nvml(module=FakeNvml()))
    assert cpu_only.gpus == [] and cpu_only.nvml.startswith("NVML unavailable")
    assert with_gpu.gpus[0].vram_total == 80 * GiB and with_gpu.nvml == ""
    assert with_gpu.fingerprint_dict()["gpus"] == [
        {"name": "FAKE NVIDIA H100 80GB HBM3", "vram_total_gib": 80, "driver": "550.54.15"}
    ]
    assert cpu_only.fingerprint() != with_gpu.fingerprint()
    assert cpu_only.cores_logical >= cpu_only.cores_physical >= 1
    assert cpu_only.ram_total == psutil.virtual_memory().total


def test_runner_records_peak_vram_of_the_worker_pid(models):
    """A real worker runs a real trial; the fake NVML says the worker's pid holds VRAM that rises and falls."""
    me = os.getpid()
    schedule = [100 * MiB, 300 * MiB, 200 * MiB]  # per NVML poll; the peak is the middle one

    def processes(gpu, n):
        workers = [c.pid for c in psutil.Process(me).children()]
        other = [(1, 60 * GiB)]  # another process on the GPU: never counted
        if gpu == 0:
            return other + [(pid, schedule[min(n, 2)]) for pid in workers]
        return [(pid, 50 * MiB) for pid in workers]

    fake = FakeNvml(gpus=[FakeGpu(), FakeGpu(uuid="GPU-fake-1")], processes=processes)
    nv = hardware.Nvml(module=fake)
    cfg = resolve(TrialConfig(model=str(models / "tiny-q8_0.gguf"), n_prompt=16, n_gen=4, repetitions=1, n_threads=1))
    with Runner(timeout=120, nvml=nv) as runner:
        rec = runner.run(cfg)
    assert rec.outcome == "ok", rec.cause
    assert fake.calls["procs0"] >= 2, "the runner must poll NVML while the trial runs"
    assert rec.peak_vram_by_gpu == [300 * MiB, 50 * MiB]
    assert rec.peak_vram_bytes == 350 * MiB
    assert [g["name"] for g in rec.hw["gpus"]] == ["FAKE NVIDIA H100 80GB HBM3"] * 2
    row = rec.to_row()
    assert row["peak_vram_bytes"] == 350 * MiB


def test_runner_without_nvml_records_no_vram(models):
    cfg = resolve(TrialConfig(model=str(models / "tiny-q8_0.gguf"), n_prompt=8, n_gen=2, repetitions=1, n_threads=1))
    with Runner(timeout=120, nvml=hardware.Nvml(module=no_gpu())) as runner:
        rec = runner.run(cfg)
    assert rec.outcome == "ok"
    assert rec.peak_vram_bytes is None and rec.peak_vram_by_gpu == []
    assert rec.hw["gpus"] == [] and rec.hw["nvml"].startswith("NVML unavailable")


# --- tuner hw -------------------------------------------------------------------------------------------------


def table_rows(output: str) -> dict[str, str]:
    """`tuner hw` prints 'key<padding>  value' lines; keys may hold single spaces ('GPU 0')."""
    return dict(re.split(r"\s{2,}", ln.strip(), maxsplit=1) for ln in output.splitlines() if ln.strip())


@pytest.fixture
def as_pynvml(monkeypatch):
    """Install a fake NVML as the `pynvml` module that tuner.measure.hardware imports."""

    def install(fake):
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake

    return install


def build_gpus() -> list[str]:
    """The GPUs this machine's llama.cpp build places on, by buffer name (none on a CPU build; the GPU check runs
    these tests on a CUDA build too): `tuner hw` lists them before any NVML GPU it cannot match."""
    return [hardware.buffer_name(d) for d in hardware.model_devices(hardware.build_info().get("devices") or [])]


def test_hw_without_gpu_is_not_an_error(as_pynvml):
    as_pynvml(no_gpu())
    res = CliRunner().invoke(cli, ["hw"])
    assert res.exit_code == 0, res.output
    lines = table_rows(res.output)
    if build_gpus():  # llama.cpp's devices without NVML: listed, said to be unknown to it
        assert all("not known to NVML" in lines[f"GPU {i}"] for i in range(len(build_gpus())))
    else:
        assert lines["GPUs"].startswith("none (NVML unavailable: NVML Shared Library Not Found)")
    assert lines["cores"].startswith(f"{psutil.cpu_count(logical=False) or os.cpu_count()} physical")
    assert "GiB total" in lines["RAM"]
    offload = hardware.build_info()["gpu_offload"]  # asked of llama.cpp in a child interpreter
    assert lines["GPU offload"] == ("yes" if offload else "no (no GPU or RPC device to offload to)")


def test_hw_json_without_gpu(as_pynvml):
    as_pynvml(no_gpu())
    res = CliRunner().invoke(cli, ["hw", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert [g["llama"] for g in d["gpus"]] == build_gpus() and all(g["index"] == -1 for g in d["gpus"])
    assert d["nvml"] == "NVML unavailable: NVML Shared Library Not Found"
    assert d["ram_total"] == psutil.virtual_memory().total
    assert d["gpu_offload"] is hardware.build_info()["gpu_offload"]
    assert d["cores_logical"] == psutil.cpu_count()


def test_hw_with_fake_gpus(as_pynvml):
    as_pynvml(
        FakeNvml(gpus=[FakeGpu(), FakeGpu(name="FAKE RTX 4090", uuid="GPU-fake-1", total=24 * GiB, used=4 * GiB)])
    )
    res = CliRunner().invoke(cli, ["hw"])
    assert res.exit_code == 0, res.output
    lines = table_rows(res.output)
    # llama.cpp's own GPUs first (none on a CPU build); the fake NVML GPUs match none of them: listed after them,
    # and said to be unused by this build
    k = len(build_gpus())
    assert lines[f"GPU {k}"] == (
        "FAKE NVIDIA H100 80GB HBM3, 80.0 GiB (79.0 free), not used by this llama.cpp build, NVML GPU 0, "
        "driver 550.54.15, CUDA 12.4, PCI fa00:01:00.0"
    )
    assert lines[f"GPU {k + 1}"].startswith("FAKE RTX 4090, 24.0 GiB (20.0 free)")
    assert "GPUs" not in lines
    d = json.loads(CliRunner().invoke(cli, ["hw", "--json"]).output)
    assert [(g["index"], g["vram_total"]) for g in d["gpus"][k:]] == [(0, 80 * GiB), (1, 24 * GiB)]
    assert d["nvml"] == ""


def test_hw_real_nvml_here():
    """The real pynvml on this machine (no NVIDIA driver on CI): a normal run, exit 0, valid JSON."""
    res = CliRunner().invoke(cli, ["hw", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert isinstance(d["gpus"], list)
    if not d["gpus"]:
        assert d["nvml"], "no GPU must come with the reason NVML gave"
    for g in d["gpus"]:  # on a CUDA machine with its driver: llama.cpp's CUDA devices are NVML's, matched by PCI id
        if g["backend"] == "CUDA" and not d["nvml"]:
            assert g["index"] >= 0 and g["pci"], g

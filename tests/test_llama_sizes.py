"""llama.cpp's own compute buffers (tuner.plan.llama_sizes), asked of real RPC servers as llama-server's --fit asks.

Every test runs real `tuner rpc-server` processes and real llama.cpp loads; the planner's model is the fallback.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import psutil
import pytest

from tuner.measure import buffers, rpc
from tuner.measure.runner import Runner, resolve
from tuner.model.meta import read_model
from tuner.plan import fit as F
from tuner.plan import oracle, planner
from tuner.plan.llama_sizes import LlamaSizes
from tuner.record import TrialConfig

MiB = 1 << 20
SHAPE = dict(n_ctx=512, n_ubatch=512, flash_attn="on", n_prompt=16, n_gen=4, repetitions=1, n_threads=1)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    tmp = tmp_path_factory.mktemp("sizes")
    pair = [rpc.LocalServer(None, tmp), rpc.LocalServer(None, tmp)]
    yield pair
    for s in pair:
        s.stop()


def _setup(servers, models, **kw):
    path = str(models / "moe-q8_0.gguf")
    info = read_model(path)
    ep = ",".join(s.endpoint for s in servers)
    cfg = resolve(TrialConfig(model=path, n_gpu_layers=99, rpc=ep, **SHAPE, **kw), info)
    return cfg, info, tuple(f"RPC0[{s.endpoint}]" for s in servers)


def test_the_figures_are_what_a_real_load_allocates(servers, models):
    # the first device's layers all have their experts in host memory: the planner's model sizes that device's
    # compute buffer 1 MiB too high (benchmarks/rpc_check.py); llama.cpp's own sizing is what the load allocates
    cfg, info, names = _setup(servers, models, n_cpu_moe=4)
    with LlamaSizes(names) as sizes:
        asked = sizes(cfg)
    assert asked is not None and len(asked) == len(names) + 1 and all(asked[:2])
    with Runner(timeout=120, reuse=False) as runner:  # the sizes' worker has left: a server serves one client
        rec = runner.run(cfg)
    assert rec.ok, rec.cause
    assert asked[:2] == [rec.buffers[n]["compute"] for n in names]
    model_only = F.device_usage(cfg, info, [16 << 30] * 2, names)
    assert model_only[0].compute != asked[0]  # the case the model gets wrong, so the check above means something
    used = F.device_usage(cfg, info, [16 << 30] * 2, names, compute_of=sizes)  # closed: answered from its cache
    assert [u.compute for u in used[:2]] == asked[:2]
    assert [u.model for u in used] == [u.model for u in model_only]  # weights and KV stay the planner's (exact)


def test_frozen_it_answers_only_what_was_asked(servers, models):
    cfg, _, names = _setup(servers, models, n_cpu_moe=5)
    sizes = LlamaSizes(names)
    first = sizes(cfg)
    (session,) = sizes.sessions.values()
    worker = session.proc
    assert first is not None and worker.poll() is None  # one worker answers every question
    sizes.freeze()
    assert worker.poll() is not None and not sizes.sessions  # the servers are free for trials
    assert sizes(cfg) == first
    assert sizes(dataclasses.replace(cfg, n_cpu_moe=6)) is None  # not asked before: the model stands in


def test_a_busy_server_is_no_answer_and_the_model_stands_in(servers, models):
    cfg, info, names = _setup(servers, models, n_cpu_moe=3)
    with oracle.Session() as holder:  # another client keeps the servers: a worker with its model's buffers on them
        assert holder.ask(oracle.Job.of(dataclasses.replace(cfg, n_cpu_moe=2), mode="real"))["outcome"] == "ok"
        sizes = LlamaSizes(names, timeout=5)
        assert sizes(cfg) is None
    assert sizes.frozen and "no answer within the timeout" in sizes.failures[0]
    free = [16 << 30] * 2
    alone = planner.predict(cfg, info, None, True, free=free, names=names, device_baselines=[0, 0])
    fallback = planner.predict(cfg, info, None, True, free=free, names=names, device_baselines=[0, 0], compute_of=sizes)
    assert fallback.vram_by_device == alone.vram_by_device


def test_the_planner_puts_the_asked_figures_on_each_device(models):
    path = str(models / "moe-q8_0.gguf")
    info = read_model(path)
    cfg = resolve(TrialConfig(model=path, n_gpu_layers=99, n_cpu_moe=2, **SHAPE), info)
    names, free = ("RPC0[a:1]", "RPC0[b:2]"), [16 << 30] * 2

    def at(a: int, b: int):
        return planner.predict(
            cfg, info, None, True, free=free, names=names, device_baselines=[0, 0], compute_of=lambda c: [a, b, 0]
        ).vram_by_device

    low, high = at(1 * MiB, 2 * MiB), at(5 * MiB, 9 * MiB)
    assert [h - lo for h, lo in zip(high, low)] == [4 * MiB, 7 * MiB]


def test_the_host_buffer_is_llama_cpps_where_the_model_covers_it(servers, dense_model):
    # every layer on the servers (pipeline parallel, and split mode none): the host holds the graph inputs; half of
    # them (the output layer on a server): the host runs its layers without the logits
    info = read_model(str(dense_model))
    ep = ",".join(s.endpoint for s in servers)
    names = tuple(f"RPC0[{s.endpoint}]" for s in servers)
    half = info.n_layer // 2
    cases = [dict(n_gpu_layers=99), dict(n_gpu_layers=99, split_mode="none"), dict(n_gpu_layers=half)]
    with LlamaSizes(names) as sizes:
        for kw in cases:
            cfg = resolve(TrialConfig(model=str(dense_model), rpc=ep, **SHAPE, **kw), info)
            llama = sizes(cfg)
            assert llama is not None and llama[-1] > 0
            host = F.device_usage(cfg, info, [16 << 30] * 2, names)[-1].compute
            assert abs(host - llama[-1]) <= 0.02 * llama[-1], (kw, host / MiB, llama[-1] / MiB)


def test_the_hosts_compute_buffer_on_a_gpu_build_is_its_pinned_host_buffer():
    # llama.cpp puts the CPU backend's compute buffer in the first device's host buffer type where it has one
    # (CUDA_Host, Vulkan_Host: src/llama-context.cpp); an RPC device has none, so the RPC tests see "CPU". The
    # lines as sched_reserve and load_tensors log them on a CUDA build:
    log = (
        "sched_reserve:      CUDA0 compute buffer size =   400.00 MiB\n"
        "sched_reserve:  CUDA_Host compute buffer size =    40.01 MiB\n"
        "load_tensors:   CPU_Mapped model buffer size =   100.00 MiB\n"
        "load_tensors:        CUDA0 model buffer size =  2000.00 MiB\n"
    )
    by_buft = buffers.per_device(buffers.parse_log(log))
    assert buffers.host_total(by_buft, "compute") == round(40.01 * MiB)
    assert buffers.host_total(by_buft, "model") == 100 * MiB
    assert not any(buffers.is_host(n) for n in ("CUDA0", "RPC0[127.0.0.1:50052]", "Vulkan0"))


def test_two_contexts_of_one_load_are_both_answered(servers, models):
    # the worker keeps a load for the next question of the same placement, whose log then has no model buffers:
    # that answer was a KeyError before (fit asks the same placement at several contexts)
    cfg, _, names = _setup(servers, models)
    with LlamaSizes(names) as sizes:
        small, big = sizes(cfg), sizes(dataclasses.replace(cfg, n_ctx=4 * cfg.n_ctx, n_batch=4 * cfg.n_ctx))
    assert small is not None and big is not None and len(big) == len(names) + 1
    assert sizes.summary()["unanswered"] == 0


def test_stand_ins_size_described_gpus_as_real_devices_of_theirs(servers, models):
    # two described GPUs larger than this host's RAM, sized by sizing-only servers: the same compute buffers as
    # the real servers give for the same placement (an explicit split: the default one follows free memory), an
    # `-ot` naming a described GPU goes to its stand-in, and nothing is left running after freeze()
    cfg, _, names = _setup(servers, models, tensor_split="1,1", n_cpu_moe=2)
    with LlamaSizes(names) as real:
        on_servers = real(cfg)
    big = 2 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    sizes = LlamaSizes.stand_in([big, big], ["CUDA0", "CUDA1"])
    procs = [s.proc for s in sizes.servers]
    described = dataclasses.replace(cfg, rpc="")  # a described rig's config names no server
    moved = dataclasses.replace(described, overrides=("blk\\.[0-5]\\.ffn_.*_exps=CUDA1",), n_cpu_moe=0)
    try:
        assert sizes.job(moved).overrides == (f"blk\\.[0-5]\\.ffn_.*_exps={sizes.names[1]}",)
        assert sizes(described) == on_servers
        first, second, _ = sizes(moved)
        assert first < on_servers[0] and second > on_servers[1]  # every expert matmul now runs on CUDA1
    finally:
        sizes.freeze()
    assert all(p.poll() is not None for p in procs) and not sizes.servers


def test_stand_ins_keep_the_gpu_bound_where_a_gpu_would_offload_host_matmuls(models):
    # an RPC device never runs the matmuls of host weights; a GPU does for big batches (offload_op): a stand-in's
    # figure is used where every matrix is on the devices, the whole graph's bound where one is in host memory
    path = str(models / "moe-q8_0.gguf")
    info = read_model(path)
    free = [16 << 30] * 2

    def stand_in(a: int, b: int):
        def asked(c):
            return [a, b, 0]

        asked.stands_in = True
        return asked

    for kw, used in ((dict(n_gpu_layers=99), True), (dict(n_gpu_layers=99, n_cpu_moe=2), False)):
        cfg = resolve(TrialConfig(model=path, **SHAPE, **kw), info)
        alone = planner.predict(cfg, info, None, True, free=free)
        low = planner.predict(cfg, info, None, True, free=free, compute_of=stand_in(100 * MiB, 200 * MiB))
        high = planner.predict(cfg, info, None, True, free=free, compute_of=stand_in(105 * MiB, 209 * MiB))
        assert (low.vram_by_device != alone.vram_by_device) == used, kw
        assert high.compute_gpu - low.compute_gpu == (14 * MiB if used else 0)


def test_stand_ins_die_with_a_killed_owner(tmp_path):
    # a dry run killed while it plans (SIGKILL: no finaliser runs) leaves no sizing-only server behind
    code = (
        "import sys; from tuner.plan.llama_sizes import LlamaSizes; "
        "s = LlamaSizes.stand_in([1 << 30, 1 << 30], ['CUDA0', 'CUDA1'], sys.argv[1]); "
        "print(*[x.proc.pid for x in s.servers], flush=True); sys.stdin.read()"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    pids = [int(p) for p in owner.stdout.readline().split()]
    servers = [psutil.Process(p) for p in pids]
    assert len(servers) == 2 and all(s.is_running() for s in servers)
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    gone, alive = psutil.wait_procs(servers, timeout=10)
    assert not alive


def test_a_real_load_is_planned_as_it_allocates(servers, models, dense_model):
    # (1) with mmap the host's weights are llama.cpp's view of the file: the span from its first host tensor to its
    # last, the device tensors between them included; (2) a pipeline's later device allocates 4E per token less than
    # its no_alloc figure says: the plan of a real load takes llama.cpp's figure with that difference off
    ep = ",".join(s.endpoint for s in servers)
    names = tuple(f"RPC0[{s.endpoint}]" for s in servers)
    moe = str(models / "moe-q8_0.gguf")
    cases = [(moe, dict(n_gpu_layers=99, n_cpu_moe=3)), (str(dense_model), dict(n_gpu_layers=99))]
    for path, kw in cases:
        info = read_model(path)
        cfg = resolve(TrialConfig(model=path, rpc=ep, **SHAPE, **kw), info)
        (real,) = oracle.measure([oracle.Job.of(cfg, mode="real")])
        assert real["outcome"] == "ok", real.get("cause")
        got = buffers.per_device(real)
        with LlamaSizes(names) as sizes:
            plan = F.device_usage(cfg, info, [16 << 30] * 2, names, compute_of=sizes)
            asked = sizes(cfg)
        if kw.get("n_cpu_moe"):
            host = [t.n_bytes for t, u in zip(info.tensors, planner.tensor_devices(cfg, info, True)[0]) if u < 0]
            assert abs(plan[-1].model - buffers.host_total(got, "model")) <= 0.01 * MiB
            assert sum(host) < buffers.host_total(got, "model") - MiB  # the span, not the sum, is what is mapped
        else:
            assert [u.compute for u in plan[:2]] == [got[n]["compute"] for n in names]
            assert asked[1] > got[names[1]]["compute"]  # the no_alloc figure alone would be over

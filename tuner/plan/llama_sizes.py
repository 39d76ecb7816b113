"""Each device's compute buffer as llama.cpp sizes it, where the model file and the devices are there.

The planner's per-device compute model (tuner.plan.compute) is fitted to llama.cpp's figures: ggml's allocator
packs each device's part of the graph best fit, so on shapes it was not fitted to it can be off by tens of per cent
(benchmarks/device_oracle.py, its held-out shapes). llama-server's --fit does not model them: it asks llama.cpp,
with a load that sizes every buffer without allocating it (no_alloc; common/fit.cpp,
common_get_device_memory_data). `LlamaSizes` does the same for the search, in a worker process of ours
(tuner.plan.oracle.Session: an unreachable RPC server aborts that process, not the search): one answer per
placement and context shape, cached. The planner takes it through `compute_of` (tuner.plan.planner.predict,
tuner.plan.fit.device_usage); a question llama.cpp cannot answer falls back to the model.

A rig only described (--gpus 80GiB,80GiB) is sized the same way: `LlamaSizes.stand_in` starts one
`tuner rpc-server --sizing-only` per described GPU on 127.0.0.1, a device of that size that holds nothing, and asks
llama.cpp about them (with this machine's own GPUs hidden from the asking worker). Their figures are an RPC
device's: the same graph and allocator as a GPU's, without CUDA's offload of host-weight matmuls for big batches
(tuner.plan.planner.predict keeps its bound where that applies), which is what llama-fit-params reports for RPC
devices of those sizes.

    sizes = LlamaSizes(["RPC0[127.0.0.1:50052]", "RPC0[127.0.0.1:50053]"])
    sizes(cfg)  # [device 0's bytes, device 1's, the host's], or None
    sizes.freeze()  # before trials: the servers serve one client at a time
    with LlamaSizes.stand_in([80 << 30, 80 << 30], ["CUDA0", "CUDA1"], log_dir) as sizes:
        sizes(cfg)  # the two described GPUs' compute buffers, then the host's
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import weakref
from pathlib import Path

from tuner.measure import rpc
from tuner.measure.buffers import host_total, is_host, per_device
from tuner.plan import oracle
from tuner.record import TrialConfig

# what hides this machine's GPUs from the worker that sizes stand-in devices (each backend's own variable: an
# invalid first index hides every CUDA / HIP device, an empty list every Vulkan one); a device none of them hides
# (Metal, SYCL) shows in the answer, which is then refused (`_ask`)
HIDE_GPUS = {"CUDA_VISIBLE_DEVICES": "-1", "HIP_VISIBLE_DEVICES": "-1", "GGML_VK_VISIBLE_DEVICES": ""}


class LlamaSizes:
    """`sizes(cfg)`: each device's compute buffer (in `names`' order, then the host's) as a no_alloc load of `cfg`
    reports it, or None where llama.cpp could not answer (the planner's model then stands in).

    An RPC server serves one client at a time (ggml-rpc.cpp, ggml_backend_rpc_start_server: accept, serve until
    the client leaves, accept again), so llama.cpp is asked while nothing else talks to the servers: while a search
    plans (its region, the prior's verdicts, fit's placement). `freeze()` before trials run closes the worker;
    from then on only what was asked is answered. Asking stops after `budget_s` seconds of questions (a big
    model's no_alloc load takes seconds per placement) or the first one left unanswered for `timeout` seconds (a
    server busy with another client)."""

    def __init__(
        self,
        names: list[str] | tuple[str, ...],
        timeout: float = 60.0,
        budget_s: float = 120.0,
        *,
        rpc: str | None = None,
        aliases: dict[str, str] | None = None,
        servers: list | None = None,
        env: dict[str, str] | None = None,
    ):
        self.names = tuple(names)
        # stand-in devices (`stand_in`): every question goes to these servers, `-ot` buffers renamed to theirs
        self.rpc, self.aliases, self.servers, self.env = rpc, dict(aliases or {}), list(servers or []), env
        self.timeout = timeout
        self.budget_s = budget_s
        self.spent = 0.0
        self.frozen = False
        self.cache: dict[oracle.Job, list[int] | None] = {}
        self.sessions: dict[str, oracle.Session] = {}  # per RPC list: a worker adds its servers for good
        self.failures: list[str] = []  # why a question went unanswered (one line each)
        weakref.finalize(self, LlamaSizes._close_all, self.sessions, self.servers)  # no worker outlives its owner

    @property
    def stands_in(self) -> bool:
        """Its devices stand in for described GPUs (`stand_in`): every question goes to its own servers."""
        return self.rpc is not None

    @classmethod
    def stand_in(cls, sizes: list[int], names: list[str], log_dir=None, **kw) -> LlamaSizes:
        """Sizes for GPUs that are not here (`names`, e.g. CUDA0, CUDA1, of `sizes` bytes each): one sizing-only
        RPC server per GPU on this host (tuner.measure.rpc.LocalServer, logging into `log_dir`, default a
        temporary folder), owned until `freeze`. Raises rpc.RpcError when a server cannot start."""
        tmp = tempfile.TemporaryDirectory(prefix="tuner-stand-in-") if log_dir is None else None
        log_dir = tmp.name if tmp else log_dir
        servers: list[rpc.LocalServer] = []
        try:
            for size in sizes:
                servers.append(rpc.LocalServer(size, log_dir, sizing_only=True))
        except rpc.RpcError:
            for s in servers:
                s.stop()
            raise
        theirs = [f"RPC0[{s.endpoint}]" for s in servers]
        env = dict(os.environ, **HIDE_GPUS)
        rpc_ = ",".join(s.endpoint for s in servers)
        sizes_ = cls(theirs, rpc=rpc_, aliases=dict(zip(names, theirs)), servers=servers, env=env, **kw)
        sizes_._tmp = tmp  # the servers' logs, removed with this object
        return sizes_

    def job(self, cfg: TrialConfig) -> oracle.Job:
        """The question for `cfg`: as llama.cpp would load it, or on the stand-in devices."""
        job = oracle.Job.of(cfg)
        if not self.stands_in:
            return job
        overrides = []
        for item in job.overrides:
            pattern, _, buft = item.rpartition("=")
            overrides.append(f"{pattern}={self.aliases.get(buft, buft)}")
        return dataclasses.replace(job, rpc=self.rpc, overrides=tuple(overrides))

    def __call__(self, cfg: TrialConfig) -> list[int] | None:
        job = self.job(cfg)
        if job not in self.cache:
            if self.frozen or self.spent > self.budget_s or not Path(cfg.model).is_file():
                return None
            t0 = time.monotonic()
            self.cache[job] = self._ask(job)
            self.spent += time.monotonic() - t0
        return self.cache[job]

    def _ask(self, job: oracle.Job) -> list[int] | None:
        session = self.sessions.get(job.rpc)
        if session is None:
            session = self.sessions[job.rpc] = oracle.Session(self.timeout, env=self.env)
        res = session.ask(job)
        if res.get("outcome") == "crash":  # no answer: the servers are not free for questions now
            self.failures.append(res.get("cause", "no answer"))
            self.freeze()
            return None
        if res.get("outcome") != "ok":  # llama.cpp refused the config itself: the model judges it
            self.failures.append(res.get("cause", "no answer"))
            return None
        by_buft = per_device(res)
        if job.n_gpu_layers and not any(n in by_buft for n in self.names):
            # layers offloaded, yet no device of this rig in the answer: its names are not llama.cpp's
            self.failures.append(f"llama.cpp named its buffers {sorted(by_buft)}, the rig {list(self.names)}")
            return None
        if self.stands_in and any(not is_host(b) and b not in self.names for b in by_buft):
            # a device of this machine joined the stand-ins (one no variable hides, e.g. Metal)
            self.failures.append(f"devices beside the stand-ins: {sorted(set(by_buft) - set(self.names))}")
            return None
        return [by_buft.get(n, {}).get("compute", 0) for n in self.names] + [host_total(by_buft, "compute")]

    def summary(self) -> dict:
        """What was asked: placements answered, seconds spent, questions unanswered (the first cause)."""
        answered = sum(1 for v in self.cache.values() if v is not None)
        return {
            "answered": answered,
            "unanswered": len(self.cache) - answered,
            "seconds": round(self.spent, 1),
            "first_failure": self.failures[0] if self.failures else None,
        }

    def freeze(self) -> None:
        """Ask nothing more (the servers are about to serve trials): close the worker, keep the answers."""
        self.frozen = True
        LlamaSizes._close_all(self.sessions, self.servers)

    @staticmethod
    def _close_all(sessions: dict, servers: list) -> None:
        for s in sessions.values():
            s.close()
        sessions.clear()
        for server in servers:  # stand-in devices: theirs to stop
            server.stop()
        servers.clear()

    def __enter__(self) -> LlamaSizes:
        return self

    def __exit__(self, *exc) -> None:
        self.freeze()

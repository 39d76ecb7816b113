"""Each device's compute buffer as llama.cpp sizes it, where the model file and the devices are there.

The planner's per-device compute model (tuner.plan.compute) is fitted to llama.cpp's figures: ggml's allocator
packs each device's part of the graph best fit, so on shapes it was not fitted to it can be off by tens of per cent
(benchmarks/device_oracle.py, its held-out shapes). llama-server's --fit does not model them: it asks llama.cpp,
with a load that sizes every buffer without allocating it (no_alloc; common/fit.cpp,
common_get_device_memory_data). `LlamaSizes` does the same for the search, in a worker process of ours
(tuner.plan.oracle.Session: an unreachable RPC server aborts that process, not the search): one answer per
placement and context shape, cached. The planner takes it through `compute_of` (tuner.plan.planner.predict,
tuner.plan.fit.device_usage); a rig only described (--gpus) or a question llama.cpp cannot answer falls back to
the model.

    sizes = LlamaSizes(["RPC0[127.0.0.1:50052]", "RPC0[127.0.0.1:50053]"])
    sizes(cfg)  # [device 0's bytes, device 1's, the host's], or None
    sizes.freeze()  # before trials: the servers serve one client at a time
"""

from __future__ import annotations

import time
import weakref
from pathlib import Path

from tuner.measure.buffers import host_total, per_device
from tuner.plan import oracle
from tuner.record import TrialConfig


class LlamaSizes:
    """`sizes(cfg)`: each device's compute buffer (in `names`' order, then the host's) as a no_alloc load of `cfg`
    reports it, or None where llama.cpp could not answer (the planner's model then stands in).

    An RPC server serves one client at a time (ggml-rpc.cpp, ggml_backend_rpc_start_server: accept, serve until
    the client leaves, accept again), so llama.cpp is asked while nothing else talks to the servers: while a search
    plans (its region, the prior's verdicts, fit's placement). `freeze()` before trials run closes the worker;
    from then on only what was asked is answered. Asking stops after `budget_s` seconds of questions (a big
    model's no_alloc load takes seconds per placement) or the first one left unanswered for `timeout` seconds (a
    server busy with another client)."""

    def __init__(self, names: list[str] | tuple[str, ...], timeout: float = 60.0, budget_s: float = 120.0):
        self.names = tuple(names)
        self.timeout = timeout
        self.budget_s = budget_s
        self.spent = 0.0
        self.frozen = False
        self.cache: dict[oracle.Job, list[int] | None] = {}
        self.sessions: dict[str, oracle.Session] = {}  # per RPC list: a worker adds its servers for good
        self.failures: list[str] = []  # why a question went unanswered (one line each)
        weakref.finalize(self, LlamaSizes._close_all, self.sessions)  # no worker outlives its owner

    def __call__(self, cfg: TrialConfig) -> list[int] | None:
        job = oracle.Job.of(cfg)
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
            session = self.sessions[job.rpc] = oracle.Session(self.timeout)
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
        LlamaSizes._close_all(self.sessions)

    @staticmethod
    def _close_all(sessions: dict) -> None:
        for s in sessions.values():
            s.close()
        sessions.clear()

    def __enter__(self) -> LlamaSizes:
        return self

    def __exit__(self, *exc) -> None:
        self.freeze()

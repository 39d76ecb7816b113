"""One trial's figures for the sampler, the rule that skips a config a known OOM dominates, and the drift test.

Failures teach the sampler: a trial that ran out of memory, crashed or timed out is told to Optuna as a COMPLETE
trial with a worst-case value (`WORST`) and a violated constraint (`constraints`); TPE and GP model infeasible
trials, while a FAIL state would be invisible to them.
"""

from __future__ import annotations

import math
import re
import statistics

from tuner import stats
from tuner.record import FAILED, KV_TYPE_BYTES, TrialConfig, TrialRecord
from tuner.search import confirm as confirmlib
from tuner.search.feasible import Rig, caps

WORST = {
    **dict.fromkeys(("tg", "pp", "mixed", "tg_stream", "pp_stream", "mixed_stream"), 0.0),
    "ttft": 1e9,
    "mem": 1e15,
}
# what a device's (not the host's) memory running out says: a GPU backend's words, or a buffer of an RPC device
# ("unable to allocate RPC0[127.0.0.1:50052] buffer", "failed to allocate compute pp buffers" on RPC0[...])
VRAM_OOM = re.compile(r"cuda|vram|device memory|hip|vulkan|metal|sycl|gpu|RPC\d+\[", re.IGNORECASE)


def peak_memory(rec: TrialRecord) -> float:
    return float((rec.peak_rss_bytes or 0) + (rec.peak_vram_bytes or 0))


def dominated_by(cfg: TrialConfig, failed: list[tuple[int, TrialConfig, str]]) -> tuple[int, str] | None:
    """A known OOM whose config needs no more memory than this one: this one would fail too.

    Same model, mmap, placement options; as large a context and batches; KV types at least as wide. Which way
    GPU layers and experts count depends on what ran out: after a GPU OOM, more layers on the GPU and fewer
    experts in host RAM need more; after a host OOM, fewer layers on the GPU and more experts in host RAM do.
    """
    for number, f, cause in failed:
        on_gpu = bool(VRAM_OOM.search(cause))
        more_gpu = cfg.n_gpu_layers >= f.n_gpu_layers and cfg.experts_in_host() <= f.experts_in_host()
        more_host = cfg.n_gpu_layers <= f.n_gpu_layers and cfg.experts_in_host() >= f.experts_in_host()
        if (
            cfg.model == f.model
            and cfg.use_mmap == f.use_mmap
            and cfg.overrides == f.overrides
            and cfg.cpu_moe == f.cpu_moe
            and cfg.split_mode == f.split_mode
            and cfg.main_gpu == f.main_gpu
            and cfg.tensor_split == f.tensor_split
            and (more_gpu if on_gpu else more_host)
            and cfg.effective_ctx() >= f.effective_ctx()
            and cfg.n_batch >= f.n_batch
            and cfg.n_ubatch >= f.n_ubatch
            and KV_TYPE_BYTES[cfg.type_k] >= KV_TYPE_BYTES[f.type_k]
            and KV_TYPE_BYTES[cfg.type_v] >= KV_TYPE_BYTES[f.type_v]
            and (cfg.flash_attn == f.flash_attn or f.flash_attn == "on")
        ):
            return number, cause
    return None


def constraints(rec: TrialRecord, hw, limits, rig: Rig) -> dict[str, float]:
    """Positive = violated (Optuna's convention). Failures and the user's memory limits; VRAM per GPU (the GPU
    furthest over its own budget), all GPUs together against --max-vram."""
    c = {"failed": 1.0 if rec.outcome in FAILED or rec.outcome == "skipped" else 0.0}
    ram_cap, vram_cap = caps(hw, limits)
    c["ram"] = (rec.peak_rss_bytes - ram_cap) / ram_cap if rec.ok and rec.peak_rss_bytes else c["failed"]
    if vram_cap and rec.ok and rec.peak_vram_bytes is not None:
        over = [(p - cap) / cap for p, cap in zip(rec.peak_vram_by_gpu or [], rig.vram_caps) if cap > 0]
        c["vram"] = max(over + [(rec.peak_vram_bytes - vram_cap) / vram_cap])
    else:
        c["vram"] = c["failed"]
    return c


def values(rec: TrialRecord, objective: str, pareto: bool) -> list[float]:
    """The values Optuna is told: the objective (a failure's worst), or tg and peak memory for --pareto."""
    if pareto:
        return [rec.objective("tg") or WORST["tg"], peak_memory(rec) if rec.ok else WORST["mem"]]
    # the trial's value as tuner.stats ranks it (the median of its repetitions), so that the sampler's best and the
    # confirmation's candidates are ranked by the same statistic
    v = stats.trial_value(confirmlib.objective_samples(rec, objective)) if rec.ok else None
    return [v if v is not None and math.isfinite(v) else WORST[objective]]


def drifted(a: list[float], b: list[float], alpha: float = 0.01) -> bool:
    """Does the anchor's new trial differ from its first beyond noise? tuner.stats' unpaired test; the unit here is
    the repetition, as an anchor is a single trial each time (the tolerance is the practical threshold)."""
    if stats.min_p(len(a), len(b), paired=False) >= alpha:
        return True  # too few repetitions for the test to ever say so: the tolerance alone decides
    if statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0:  # no noise: they differ exactly when they differ
        return statistics.fmean(a) != statistics.fmean(b)
    return stats.compare(a, b, paired=False, alpha=alpha, min_effect=0.0).significant

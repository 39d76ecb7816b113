"""Where benchmark scripts keep their figures: one timestamped JSON per run under benchmarks/results/.

Every file carries its provenance (when, the command line, the git commit of the tree that ran, the llama.cpp
build, the machine and its load), so a figure quoted in a README can be traced to what produced it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# the synthetic models benchmarks and tests make (tuner.model.synth), kept between runs
MODEL_CACHE = Path(os.environ.get("TUNER_TEST_MODELS", Path.home() / ".cache" / "tuner-test-models"))
sys.path.insert(0, str(ROOT))

from tuner import files  # noqa: E402


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance() -> dict:
    """What ran, where: the tree's commit (and whether it had local changes), the build, the machine."""
    from tuner.measure import hardware

    hw = hardware.probe()
    return {
        "when_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "build": hardware.build_info(),
        "hardware": {
            "cpu": hw.cpu,
            "cores_physical": hw.cores_physical,
            "ram_total": hw.ram_total,
            "gpus": [g.name for g in hw.gpus],
            "machine": platform.machine(),
            "fingerprint": hw.fingerprint(),
        },
        "loadavg": os.getloadavg(),
    }


def model_facts(path: str | os.PathLike) -> dict:
    """The model a benchmark ran on: path, size and the content hash trials record."""
    from tuner.model.meta import read_model

    info = read_model(path)
    return {
        "path": str(path),
        "size_bytes": info.file_size,
        "content_hash": info.content_hash,
        "arch": info.arch,
        "file_type": info.file_type,
        "n_params": info.n_params,
    }


# what makes two model files alike for timing: llama.cpp's quantizer writes other bytes from the same f16 on another
# CPU or build (the synthetic dense q8_0 and q4_0 differ between two of this project's VMs), and a trial's timings
# depend on the file's make, not on its random weights' values
MAKE = ("size_bytes", "arch", "file_type", "n_params")


def same_make(a: dict, b: dict) -> bool:
    """Whether two model_facts describe the same file or files made alike (size, architecture, type, parameters)."""
    return a.get("content_hash") == b.get("content_hash") or all(a.get(k) == b.get(k) for k in MAKE)


def rate_ci(k: int, n: int) -> dict:
    """k of n as a rate with exact (Clopper-Pearson) bounds: the two-sided 95 % interval (`ci95`) and the
    one-sided 95 % bounds (`lower95`, `upper95`) a claim like "at most 5 %" needs (0 of 20: upper95 0.139).
    Nones when n is 0."""
    if not n:
        return {"count": k, "n": n, "rate": None, "ci95": [None, None], "lower95": None, "upper95": None}
    from scipy.stats import binomtest

    two = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    upper = binomtest(k, n, alternative="less").proportion_ci(confidence_level=0.95, method="exact").high
    lower = binomtest(k, n, alternative="greater").proportion_ci(confidence_level=0.95, method="exact").low
    return {
        "count": k,
        "n": n,
        "rate": k / n,
        "ci95": [float(two.low), float(two.high)],
        "lower95": float(lower),
        "upper95": float(upper),
    }


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> list[float]:
    """The exact two-sided interval of k in n at this confidence ([0, 1] when n is 0)."""
    if not n:
        return [0.0, 1.0]
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return [float(ci.low), float(ci.high)]


def bounded_rates(hits_aa: int, n_aa: int, hits_ab: int, n_ab: int) -> dict:
    """A gate's false-alarm rate (regressions in A/A runs) with its one-sided 95 % upper bound, and its detection
    rate (regressions in A/B runs) with its one-sided 95 % lower bound (rate_ci)."""
    aa, ab = rate_ci(hits_aa, n_aa), rate_ci(hits_ab, n_ab)
    return {
        "false_alarm_rate": aa["rate"],
        "false_alarm_upper95": aa["upper95"],
        "detection_rate": ab["rate"],
        "detection_lower95": ab["lower95"],
    }


def save(name: str, result: dict, out: str | Path = RESULTS, echo: bool = True, path: str | Path | None = None) -> Path:
    """Write result (plus its provenance) as out/NAME-YYYYmmdd-HHMMSS.json, or to `path`; returns the path."""
    path = Path(path) if path else Path(out) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {**result, "provenance": result.get("provenance") or provenance()}
    files.write_atomic(path, json.dumps(result, indent=1, default=str) + "\n", chmod=files.default_mode())
    if echo:
        print(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}", file=sys.stderr)
    return path

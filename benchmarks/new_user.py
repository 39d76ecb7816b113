"""A new user's first search: `tuner search --model MODEL` and nothing else.

Checks what such a user gets: the default space varies at least 4 dimensions on this CPU build, and the
recommendation either beats the llama.cpp-defaults baseline by a confirmed margin (the confirmation's interval
of the ratio lies above 1) or says that they tie. Saves the space, the output and recommended.json to
benchmarks/results/new-user-*.json; exit 1 when either fails.

    .venv/bin/python benchmarks/new_user.py            # ~5 min on 2 cores (the dense synthetic model)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import save  # noqa: E402

from tuner.measure import hardware  # noqa: E402
from tuner.model.synth import synthesize  # noqa: E402

TUNER = str(Path(sys.executable).with_name("tuner"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the synthetic dense model (q4_k_m)")
    a = ap.parse_args()
    model = a.model or str(synthesize(Path.home() / ".cache" / "tuner-test-models", "dense", ("q4_k_m",))[0])
    work = Path(tempfile.mkdtemp(prefix="tuner-new-user-"))
    t0 = time.monotonic()
    res = subprocess.run([TUNER, "search", "--model", model], cwd=work, capture_output=True, text=True)
    wall = time.monotonic() - t0
    m = re.search(r"configs \((.*?)\); storage", res.stderr)
    varying = [d.split("=")[0] for d in m.group(1).split(", ")] if m and "nothing varies" not in m.group(1) else []
    rec_path = next(work.glob("results/*/recommended.json"), None)
    rec = json.loads(rec_path.read_text()) if rec_path else {}
    vs = (rec.get("confirmation") or {}).get("vs_baseline") or {}
    beats = vs.get("verdict") == "faster" and vs.get("ci95", [0])[0] > 1.0
    ties = vs.get("verdict") in ("tie", "same config")
    passed = res.returncode == 0 and len(varying) >= 4 and (beats or ties)
    result = {
        "benchmark": "new_user",
        "model": model,
        "command": f"tuner search --model {model}",
        "exit_code": res.returncode,
        "wall_s": wall,
        "varying": varying,
        "n_varying": len(varying),
        "vs_baseline": vs,
        "beats_baseline": beats,
        "ties_baseline": ties,
        "confirmation": {k: (rec.get("confirmation") or {}).get(k) for k in ("verdict", "reason", "rounds")},
        "stdout": res.stdout,
        "stderr": res.stderr[-20000:],
        "recommended": rec,
        "passed": passed,
        "build": hardware.build_info(),
        "hw": hardware.probe().to_dict(),
    }
    path = save("new-user", result)
    print(
        f"saved {path}: {len(varying)} dimensions varied, vs baseline {vs.get('verdict')} "
        f"{vs.get('ratio')} {vs.get('ci95')}",
        file=sys.stderr,
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

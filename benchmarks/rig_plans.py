"""Rig plans: what `tuner search --dry-run` searches for the flagship MoE models on the rigs they are run on.

For DeepSeek-V3, Qwen3-235B-A22B, gpt-oss-120b and GLM-4.5-Air (the sparse files of tuner.plan.oracle: real headers
of the published shapes, data regions that are holes) on one 24 / 48 / 80 GiB GPU and on 2 × 24 GiB, with 512 GiB
of host RAM: the region of the default space (n_gpu_layers, n_cpu_moe, tensor_split), how many configs fit, the
predicted VRAM per GPU of the leanest and hungriest, and how long the plan took. Beside it, what the old bound
(every n_gpu_layers judged with all experts on the GPU, tuner before the hybrid region) allowed.

    python benchmarks/rig_plans.py            # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time

from _results import save

GiB = 1 << 30
RIGS = {"1x24GiB": "24GiB", "1x48GiB": "48GiB", "1x80GiB": "80GiB", "2x24GiB": "24GiB,24GiB"}


def old_bound(info, vram: int) -> int:
    """The largest n_gpu_layers the pre-region space allowed: judged at n_cpu_moe 0 (all experts on the GPU), one
    summed pool, the smallest context of the space (4096)."""
    from tuner.plan import planner
    from tuner.record import TrialConfig

    cfg = TrialConfig(model=info.path, n_ctx=4096, n_ubatch=512)
    return planner.max_gpu_layers(dataclasses.replace(cfg, n_cpu_moe=0), info, vram, headroom=0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ram", default="512GiB")
    args = ap.parse_args(argv)
    from click.testing import CliRunner

    from tuner.cli import cli
    from tuner.model.meta import read_model
    from tuner.plan import oracle

    rows = []
    with tempfile.TemporaryDirectory(prefix="rig-plans-") as tmp:
        for arch in ("deepseek2", "qwen3moe", "gpt-oss", "glm4moe"):
            path = oracle.model_file(arch, tmp)
            info = read_model(path)
            for rig, gpus in RIGS.items():
                t0 = time.perf_counter()
                res = CliRunner().invoke(
                    cli, ["search", "-m", str(path), "--dry-run", "--json", "--gpus", gpus, "--ram", args.ram]
                )
                took = time.perf_counter() - t0
                if res.exit_code != 0:
                    rows.append({"model": info.name, "rig": rig, "error": res.output.strip()[-300:]})
                    continue
                plan = json.loads(res.stdout)
                dims = plan["dimensions"]
                total = sum(int(float(g[:-3]) * GiB) for g in gpus.split(","))
                rows.append(
                    {
                        "model": oracle.shape(arch).name,
                        "arch": arch,
                        "file_bytes": info.file_size,
                        "rig": rig,
                        "n_gpu_layers": dims["n_gpu_layers"],
                        "n_cpu_moe": [min(dims["n_cpu_moe"]), max(dims["n_cpu_moe"])],
                        "tensor_split": dims.get("tensor_split"),
                        "configs": plan["configs"],
                        "configs_in_space": plan["configs_in_space"],
                        "lowest_vram_by_gpu": plan["lowest_vram"]["vram_by_device"],
                        "highest_vram_by_gpu": plan["highest_vram"]["vram_by_device"],
                        "highest_vram_config": {
                            k: plan["highest_vram"]["config"][k]
                            for k in ("n_cpu_moe", "tensor_split", "n_ubatch", "flash_attn")
                        },
                        "old_bound_n_gpu_layers": old_bound(info, total),
                        "plan_s": round(took, 2),
                    }
                )
                r = rows[-1]
                print(
                    f"{r['model']:<28} {rig:<8} -ngl {r['n_gpu_layers']} --n-cpu-moe {r['n_cpu_moe'][0]}.."
                    f"{r['n_cpu_moe'][1]}  {r['configs']}/{r['configs_in_space']} fit  (old bound: -ngl "
                    f"{r['old_bound_n_gpu_layers']})  {took:.1f} s"
                )
    save("rig-plans", {"ram": args.ram, "rows": rows}, echo=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

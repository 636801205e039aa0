"""`make demo`: the main job end to end on a model built on the spot (no hub, no GPU).

Until the embedded default model lands, the demo builds a tiny random Qwen3-MoE, inspects it,
writes a plan (half the experts of every MoE layer, half the query heads), rewrites the
checkpoint, and checks that the pruned model computes exactly what the original computes with
the pruned parts masked out.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mfprune.plan import PrunePlan


def run(cmd: list[str]) -> None:
    print(f"\n$ mfprune {' '.join(cmd)}", flush=True)
    subprocess.run([sys.executable, "-m", "mfprune", *cmd], check=True)


def main(workdir: str = "demo-out") -> None:
    from mfprune import tinymodels

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    source, out, plan_file = work / "tiny-qwen3-moe", work / "pruned", work / "plan.json"
    print(f"building a tiny random Qwen3-MoE in {source} ...", flush=True)
    tinymodels.build_checkpoint("qwen3_moe", source)
    run(["inspect", str(source)])
    keep = {0: [0, 2, 4, 6], 1: [1, 3, 5, 7]}  # until `mfprune profile` ranks them
    PrunePlan(experts=keep, heads={0: [0, 2], 1: [1, 3]}, meta={"note": "demo plan"}).save(
        plan_file
    )
    print(f"\nplan: {plan_file.read_text()}")
    run(
        [
            "prune",
            str(source),
            "--plan",
            str(plan_file),
            "--out",
            str(out),
            "--overwrite",
            "--verify",
        ]
    )
    run(["inspect", str(out)])


if __name__ == "__main__":
    main(*sys.argv[1:2])

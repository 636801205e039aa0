"""Benchmark `mfprune bench`'s own repeatability: identical models side by side.

Runs ``run_bench`` ``--trials`` times on the embedded default model against itself (the same
weights loaded twice, timed in interleaved rounds), with the bench's default speed settings
unless told otherwise. A bench a user can trust must call every one of these "within noise";
the report lists each trial's medians, spreads and verdicts, and how often a verdict other
than "within noise" came out. For contrast, the same numbers for the default model against a
copy pruned to half its experts (a real difference of size, not necessarily of speed).

Run: ``nice .venv/bin/python benchmarks/bench_noise.py [--trials 3] [--repeats 5]
[--write-docs]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import cpu_model, replace_section  # benchmarks/_common.py (scripts run from here)

# this folder holds a `profile.py` that would shadow the standard library's (torch imports it):
# take the folder off the path, put the repository on it
HERE, REPO = Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from mfprune.bench import SpeedSpec, run_bench  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:noise:begin -->", "<!-- bench:noise:end -->"


def half_pruned(out: Path) -> Path:
    """The default model with the first half of its experts kept in every layer."""
    from mfprune import PrunePlan, rewrite_checkpoint
    from mfprune.arch import spec_for_config
    from mfprune.arch.layout import resolve_layout
    from mfprune.checkpoint import open_checkpoint

    ckpt = open_checkpoint("default")
    layout = resolve_layout(ckpt, spec_for_config(ckpt.config)).experts
    half = tuple(range(layout.num_experts // 2))
    rewrite_checkpoint("default", PrunePlan(experts=dict.fromkeys(layout.layers, half)), out)
    return out


def trial(model: str | Path, spec: SpeedSpec) -> dict[str, Any]:
    report = run_bench(model, baseline="default", speed=spec, device="cpu")
    rows = {r.name: r for r in report.rows() if r.timing is not None}
    out = {}
    for name, row in rows.items():
        mine, base = row.timing
        comparison = row.comparison
        out[name] = {
            "model": mine.median,
            "baseline": base.median,
            "model_spread": mine.spread,
            "baseline_spread": base.spread,
            "ratio": comparison.ratio,
            "verdict": comparison.verdict,
        }
    return out


def table(results: dict[str, list[dict[str, Any]]], spec: SpeedSpec) -> str:
    lines = [
        f"Machine: {cpu_model()}, {os.cpu_count()} cores (shared with other work), Python "
        f"{platform.python_version()}; `run_bench` with {spec.batch_size} × {spec.prompt_len} "
        f"prompt tokens, {spec.new_tokens} decode steps, a warm-up and {spec.repeats} "
        "interleaved rounds per trial; spread = (max - min) / median of the rounds.",
        "",
        "| pair | trial | stage | model tok/s | baseline tok/s | spreads | ratio | verdict |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for pair, trials in results.items():
        for i, rows in enumerate(trials, 1):
            for stage, r in rows.items():
                lines.append(
                    f"| {pair} | {i} | {stage.split()[0]} | {r['model']:,.0f} | "
                    f"{r['baseline']:,.0f} | {r['model_spread']:.0%} / {r['baseline_spread']:.0%}"
                    f" | ×{r['ratio']:.3f} | {r['verdict']} |"
                )
    same = [r for rows in results["identical"] for r in rows.values()]
    wrong = sum(r["verdict"] != "within noise" for r in same)
    lines += [
        "",
        f"Identical models: {len(same) - wrong} of {len(same)} verdicts 'within noise'"
        + (" (as they must be)." if not wrong else f"; {wrong} called a difference."),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=SpeedSpec.repeats)
    parser.add_argument("--prompt-len", type=int, default=SpeedSpec.prompt_len)
    parser.add_argument("--new-tokens", type=int, default=SpeedSpec.new_tokens)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    spec = SpeedSpec(prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats)
    with tempfile.TemporaryDirectory(prefix="mfprune-noise-") as tmp:
        pruned = half_pruned(Path(tmp) / "half")
        results: dict[str, list[dict[str, Any]]] = {"identical": [], "half the experts": []}
        for i in range(args.trials):
            results["identical"].append(trial("default", spec))
            results["half the experts"].append(trial(pruned, spec))
            print(f"trial {i + 1}: {results['identical'][-1]}", flush=True)
    text = table(results, spec)
    print(text)
    if args.write_docs:
        replace_section(DOCS, BEGIN, END, text)


if __name__ == "__main__":
    main()

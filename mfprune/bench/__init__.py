"""Bench: quality (lm-eval), speed and memory of a model side by side with its baseline, and the
quality gate.

``run_bench`` (run.py) loads each model with ``mfprune.load_pretrained``, evaluates it through
lm-eval (quality.py: task names, task folders, or a JSONL file turned into a task), times
prefill and decode (speed.py) and returns a ``BenchReport`` (report.py: table, ratios, JSON,
markdown, gate).
"""

from mfprune.bench.quality import Metric, QualitySpec
from mfprune.bench.report import (
    BenchReport,
    DropLimit,
    GateResult,
    GateRule,
    ModelBench,
    check_gate,
    parse_gate,
)
from mfprune.bench.run import KERNELS, run_bench
from mfprune.bench.speed import SpeedResult, SpeedSpec

__all__ = [
    "KERNELS",
    "BenchReport",
    "DropLimit",
    "GateResult",
    "GateRule",
    "Metric",
    "ModelBench",
    "QualitySpec",
    "SpeedResult",
    "SpeedSpec",
    "check_gate",
    "parse_gate",
    "run_bench",
]

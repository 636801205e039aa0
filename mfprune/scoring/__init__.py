"""Criteria: usage sums from a profile -> scores per layer and expert (higher = keep)."""

from mfprune.scoring import criteria as _builtin  # noqa: F401  (registers the built-ins)
from mfprune.scoring.registry import (
    CRITERIA,
    CriterionInfo,
    UnknownCriterion,
    UsageSums,
    criterion,
    get_criterion,
)

__all__ = [
    "CRITERIA",
    "CriterionInfo",
    "UnknownCriterion",
    "UsageSums",
    "criterion",
    "get_criterion",
]

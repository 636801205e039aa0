"""Criteria: usage sums from a profile -> scores per layer and expert (higher = keep)."""

from typing import Any

import torch

from mfprune.scoring import criteria as _builtin  # noqa: F401  (registers the built-ins)
from mfprune.scoring.registry import (
    CRITERIA,
    CriterionInfo,
    UnknownCriterion,
    UsageSums,
    criterion,
    get_criterion,
)


def score(sums: UsageSums, criterion: str = "reap", **options: Any) -> torch.Tensor:
    """Scores [L, E] (float64, higher = keep) of ``sums`` under the named criterion."""
    return get_criterion(criterion)(sums, **options)


__all__ = [
    "CRITERIA",
    "CriterionInfo",
    "UnknownCriterion",
    "UsageSums",
    "criterion",
    "get_criterion",
    "score",
]

"""The criteria registry: plain functions registered with a decorator that carries their
name and description; their options come from their keyword-only parameters."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mfprune.errors import MfpruneError, did_you_mean


class UsageSums(Protocol):
    """Per-layer sums over routed tokens, for one kind of expert (shapes [L, E])."""

    count: torch.Tensor  # |T_i|: tokens routed to expert i
    soft: torch.Tensor  # Σ_{t∈T_i} g_i(t)
    ean: torch.Tensor  # Σ_{t∈T_i} ‖E_i(x_t)‖₂
    reap_num: torch.Tensor  # Σ_{t∈T_i} g_i(t)·‖E_i(x_t)‖₂


Criterion = Callable[..., torch.Tensor]  # (sums, **options) -> scores [L, E]; higher = keep


@dataclass(frozen=True)
class CriterionInfo:
    name: str
    description: str
    fn: Criterion
    options: dict[str, Any]  # option name -> default

    def __call__(self, sums: UsageSums, **options: Any) -> torch.Tensor:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise MfpruneError(
                f"criterion '{self.name}' has no option '{unknown[0]}'"
                f"{did_you_mean(unknown[0], self.options)}",
                hint=f"its options: {', '.join(self.options) or 'none'}",
            )
        return self.fn(sums, **options).to(torch.float64)


CRITERIA: dict[str, CriterionInfo] = {}


class UnknownCriterion(MfpruneError):
    pass


def criterion(name: str, description: str) -> Callable[[Criterion], Criterion]:
    """Register ``fn(sums, *, option=default, ...) -> scores [L, E]`` under ``name``."""

    def register(fn: Criterion) -> Criterion:
        params = inspect.signature(fn).parameters.values()
        options = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
        CRITERIA[name] = CriterionInfo(name, description, fn, options)
        return fn

    return register


def get_criterion(name: str) -> CriterionInfo:
    if name not in CRITERIA:
        raise UnknownCriterion(
            f"unknown criterion '{name}'{did_you_mean(name, CRITERIA)}",
            hint=f"available: {', '.join(sorted(CRITERIA))}",
        )
    return CRITERIA[name]

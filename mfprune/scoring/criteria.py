"""Built-in criteria (BRIEF §2). Each maps usage sums [L, E] to scores [L, E]; higher = keep."""

from __future__ import annotations

import torch

from mfprune.scoring.registry import UsageSums, criterion


@criterion("frequency", "tokens routed to the expert, |T_i|")
def frequency(sums: UsageSums) -> torch.Tensor:
    return sums.count.double()


@criterion("soft", "soft frequency: the routing weight it received, summed over its tokens")
def soft(sums: UsageSums) -> torch.Tensor:
    return sums.soft.double()


@criterion("ean", "expert activation norm: Σ ‖E_i(x)‖ over its tokens")
def ean(sums: UsageSums) -> torch.Tensor:
    return sums.ean.double()


@criterion("reap", "REAP: mean over its tokens of gate × ‖E_i(x)‖ (never routed: 0)")
def reap(sums: UsageSums) -> torch.Tensor:
    count = sums.count.double()
    return torch.where(count > 0, sums.reap_num.double() / count.clamp(min=1), 0.0)


@criterion("random", "seeded random scores: the baseline every criterion is compared with")
def random(sums: UsageSums, *, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(sums.count.shape, generator=generator, dtype=torch.float64)

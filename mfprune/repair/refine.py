"""The second stage of ``--repair refit``: after the closed-form refit of the down projections
(refit.py), the kept experts' gate, up and down projections are refined together by gradient
descent on the same block reconstruction, early-stopped on calibration tokens it does not fit.

For MoE layer L, on a uniform sample of its calibration tokens (x_t [H] the block's input on the
pruned path, y_t [H] the original block's routed output, both recorded while refit.py streams
the layer), with θ = {G_k [I, H], U_k [I, H], D_k [H, I] : k kept}:

    min_θ  Σ_t ‖B_θ(x_t) − y_t‖² / Σ_t ‖y_t‖²

where B_θ is the layer's own MoE block (its router, dropped experts masked, as ``mfprune.oracle
.masking`` does) with the kept experts' weights θ. The router is not trained: refitting its
rows did not lower the error on the default model (docs/benchmarks.md). Adam, minibatches of
``BATCH`` tokens, θ initialised from the closed-form refit; every ``EVERY`` steps the error on
a held-out tenth of the sample is measured and the best θ so far is kept (step 0 included), so
the refinement never ends worse on those tokens than the closed form. The learning rate is
relative to each tensor's root-mean-square (the step is about ``lr × rms(θ⁰)``).

Memory: the sample, 2 · n · H floats (n ≤ ``MAX_SAMPLE``), the kept experts' weights three
times (θ, Adam's two moments), one minibatch's activations and gradients, and during each step
one copy of the layer's whole expert tensors [E, …] with the kept rows swapped in (what the
block's own forward runs on).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mfprune.oracle import masking

MAX_SAMPLE = 65536  # tokens of a layer kept for the refinement
BATCH = 4096  # tokens per step
EVERY = 25  # steps between validations
DEFAULT_STEPS = 300
DEFAULT_LR = 0.025  # × each tensor's rms


def output_tensor(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A MoE block's output (some blocks also return their router logits)."""
    return out[0] if isinstance(out, tuple) else out


def step_tokens(tokens: int) -> int:
    """Tokens per refinement step for a layer whose calibration has ``tokens`` real tokens."""
    n = min(MAX_SAMPLE, tokens)
    return min(BATCH, n - max(1, n // 10))


class Sample:
    """A uniform sample without replacement of at most ``size`` tokens from a stream of
    (x [n, H], y [n, H]) chunks: each token gets a random key (seeded), the smallest keys stay."""

    def __init__(self, size: int = MAX_SAMPLE, seed: int = 0) -> None:
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.keys = torch.empty(0)
        self.x: torch.Tensor | None = None  # [m, H]
        self.y: torch.Tensor | None = None  # [m, H]

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        keys = torch.rand(x.shape[0], generator=self.generator)
        x, y = x.detach(), y.detach().float()  # x in the block's dtype
        if self.x is None:
            self.x, self.y, self.keys = x, y, keys
        else:
            self.x, self.y = torch.cat([self.x, x]), torch.cat([self.y, y])
            self.keys = torch.cat([self.keys, keys])
        if self.keys.numel() > self.size:
            keep = self.keys.topk(self.size, largest=False).indices.sort().values
            self.keys = self.keys[keep]
            self.x, self.y = self.x[keep.to(self.x.device)], self.y[keep.to(self.y.device)]

    @property
    def tokens(self) -> int:
        return int(self.keys.numel())


@dataclass(frozen=True)
class Refinement:
    """One layer's refinement; errors are Σ‖B_θ(x) − y‖² / Σ‖y‖² on the held-out tokens."""

    steps: int  # steps run
    best_step: int  # the step whose weights were kept (0: the closed form's)
    tokens: int  # sampled tokens (a tenth of them held out)
    error_before: float
    error_after: float

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def refine_layer(
    model: nn.Module,
    block: nn.Module,
    *,
    layer: int,
    kept: Sequence[int],
    drop: Sequence[int],
    sample: Sample,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> Refinement:
    """Refine, in place, the kept experts of ``block`` (layer ``layer`` of ``model``; experts
    fused as gate_up_proj [E, 2I, H] and down_proj [E, H, I]) on ``sample`` (module
    docstring). ``on_step`` gets each step's tokens (progress)."""
    experts = block.experts
    assert sample.x is not None and sample.y is not None
    n = sample.tokens
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    device = experts.down_proj.device
    cut = max(1, n // 10)
    held, train = order[:cut].to(device), order[cut:].to(device)
    x, y = sample.x.to(device), sample.y.to(device)
    scale = float((y[train] ** 2).mean()) or 1.0
    index = torch.tensor(sorted(int(k) for k in kept), device=device)
    names = ("experts.gate_up_proj", "experts.down_proj")
    start = [experts.gate_up_proj.detach(), experts.down_proj.detach()]  # [E, 2I, H], [E, H, I]
    leaves = [t[index].float().clone().requires_grad_(True) for t in start]
    rates = [lr * float(t.detach().pow(2).mean().sqrt()) or lr for t in leaves]
    opt = torch.optim.Adam([{"params": [p], "lr": r} for p, r in zip(leaves, rates, strict=True)])

    def weights() -> dict[str, torch.Tensor]:
        return {
            name: t.index_put((index,), p.to(t.dtype))
            for name, t, p in zip(names, start, leaves, strict=True)
        }

    def error(rows: torch.Tensor) -> torch.Tensor:
        out = output_tensor(torch.func.functional_call(block, weights(), (x[rows][None],)))[0]
        return ((out.float() - y[rows]) ** 2).mean() / scale

    with masking(model, experts={layer: list(drop)}), torch.enable_grad():  # callers: no_grad
        with torch.no_grad():
            before = float(error(held))
        best = (before, [p.detach().clone() for p in leaves], 0)
        ran = 0
        for step in range(1, (steps if train.numel() else 0) + 1):  # one token: nothing to fit
            pick = torch.randint(train.numel(), (min(BATCH, train.numel()),), generator=generator)
            loss = error(train[pick.to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ran = step
            if on_step is not None:
                on_step(int(pick.numel()))
            if step % EVERY == 0 or step == steps:
                with torch.no_grad():
                    now = float(error(held))
                if now < best[0]:
                    best = (now, [p.detach().clone() for p in leaves], step)
    with torch.no_grad():
        for t, p in zip((experts.gate_up_proj, experts.down_proj), best[1], strict=True):
            t[index] = p.to(t.dtype)
    return Refinement(
        steps=ran, best_step=best[2], tokens=n, error_before=before, error_after=best[0]
    )

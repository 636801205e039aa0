"""``--repair refit``: refit the kept experts' down projections so that each pruned MoE block
reproduces the original block's output on the task's tokens.

Layer by layer, in order, with every earlier layer already pruned (its dropped experts masked
out of its router, ``mfprune.oracle.masking``) and refit. For MoE layer L, over the N real
(non-padding) calibration tokens, with x_t [H] the input of layer L's experts on the pruned
path:

* target  y_t = Σ_{e ∈ all experts} g_e(x_t) · D_e h_e(x_t)        the original block's routed
  experts, with the original routing (the shared expert, if any, is the same on both sides);
* model   ŷ_t = Σ_{k ∈ kept} g'_k(x_t) · W_k h_k(x_t)               the pruned block: routing
  g' renormalised over the kept experts by the model's own router, gate/up unchanged;

where h_e(x) = act(G_e x) ⊙ (U_e x) [I] and D_e [H, I] is expert e's down projection. Stacking
the features φ_t = [g'_k h_k(x_t)]_{k ∈ kept} [K·I] and the weights W = [W_kᵀ]_k [K·I, H], the
refit solves the ridge least squares, pulled towards the original weights W⁰ = [D_kᵀ]_k:

    min_W  Σ_t ‖φ_tᵀ W − y_t‖² + λ ‖W − W⁰‖²_F
    ⇔  (ΦᵀΦ + λ I) W = ΦᵀY + λ W⁰,      λ = ridge · mean(diag ΦᵀΦ)

Only the normal equations are kept: ΦᵀΦ [K·I, K·I] and ΦᵀY [K·I, H] in float64, accumulated
batch by batch (memory: one layer's normal equations plus one batch's activations, whatever the
number of tokens). When K·I exceeds ``max_features`` every kept expert is refit on its own
(block-diagonal normal equations [K, I, I]: expert k fits y − Σ_{j≠k} φ_jᵀ W⁰_j), so memory stays
bounded on wide models. Experts that no calibration token reaches keep their weights.

Each layer costs one forward pass of the calibration batches up to that layer (the pass stops
at the layer), so L layers cost about L/2 full passes.

With ``steps`` > 0 (the default of ``mfprune prune --repair refit``), the closed form is only
the start: refine.py then refines the kept experts' gate, up and down projections together by
gradient descent on the same reconstruction, on a sample of the layer's tokens recorded during
the same pass, before the next layer is refit on the refined layer's output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mfprune.errors import ModelError
from mfprune.modules import find_routers, parent_of, text_model
from mfprune.oracle import masking
from mfprune.repair.refine import DEFAULT_LR, Refinement, Sample, output_tensor, refine_layer

Routers = dict[int, tuple[str, nn.Module]]  # find_routers: layer -> (name, router module)
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]  # (input_ids [B, S], attention_mask [B, S])
MAX_FEATURES = 8192  # K·I above this: per-expert normal equations
_CHUNK = 4096  # tokens per feature matrix


@dataclass(frozen=True)
class LayerFit:
    """One layer's refit, measured on its calibration tokens (sums of squares over tokens)."""

    layer: int
    tokens: int
    kept: tuple[int, ...]
    target: float  # Σ_t ‖y_t‖²
    error_dropped: float  # Σ_t ‖ŷ_t(W⁰) − y_t‖²: only dropping
    error_refit: float | None  # Σ_t ‖ŷ_t(W) − y_t‖² after the refit (joint solve only)
    joint: bool  # one joint solve (True) or one per expert
    refined: Refinement | None = None  # the gradient refinement after the closed form

    def to_dict(self) -> dict[str, Any]:
        refined = self.refined.to_dict() if self.refined else None
        return dict(self.__dict__, kept=list(self.kept), refined=refined)


class _Stop(Exception):
    """Raised at the layer being refit: the rest of the forward pass is not needed."""


def refit_model(
    model: nn.Module,
    *,
    kept: Mapping[int, Sequence[int]],
    batches: Batches,
    ridge: float = 1e-3,
    max_features: int = MAX_FEATURES,
    steps: int = 0,
    lr: float = DEFAULT_LR,
    on_batch: Callable[[int], None] | None = None,
) -> list[LayerFit]:
    """Refit, in place, the down projections of the kept experts of ``model`` (module
    docstring), then, with ``steps`` > 0, refine their gate, up and down projections
    (refine.py). ``kept``: per MoE layer, the expert ids kept; layers that keep every expert
    are left alone. ``on_batch`` is called after each batch of each layer with its real
    tokens."""
    refittable_experts(model, kept)  # every layer refused up front, before any work
    drop = dropped_experts(model, kept)
    fits = []
    for layer in sorted(drop):
        block = moe_block_of(model, layer)
        inputs = (
            (_block_input(model, block, layer, ids, mask, drop), mask) for ids, mask in batches
        )
        fits.append(
            refit_layer(
                model,
                layer=layer,
                kept=kept[layer],
                drop=drop[layer],
                inputs=inputs,
                ridge=ridge,
                max_features=max_features,
                steps=steps,
                lr=lr,
                on_batch=on_batch,
            )
        )
    return fits


def dropped_experts(model: nn.Module, kept: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
    """Per MoE layer that loses experts, the ids it drops."""
    routers = find_routers(model, attention=False)
    drop: dict[int, list[int]] = {}
    for layer, ids in sorted(kept.items()):
        moe_block_of(model, layer, routers)  # raises where the layer has no router
        total = int(routers[layer][1].num_experts)
        gone = [e for e in range(total) if e not in set(ids)]
        if gone:
            drop[layer] = gone
    return drop


def moe_block_of(model: nn.Module, layer: int, routers: Routers | None = None) -> nn.Module:
    """The MoE block of decoder layer ``layer`` (the module around its router; ``routers``:
    ``find_routers(model, attention=False)`` when the caller has it)."""
    routers = find_routers(model, attention=False) if routers is None else routers
    if layer not in routers:
        raise ModelError(
            f"layer {layer}: --repair refit finds no router module in this model's layer",
            hint="this model routes in a way --repair does not model; use --repair none",
        )
    return parent_of(model, routers[layer][0])


def refittable_experts(model: nn.Module, layers: Iterable[int]) -> dict[int, nn.Module]:
    """Per layer, its experts module, if --repair refit can model every one (else ModelError,
    before any work)."""
    routers = find_routers(model, attention=False)
    return {layer: _check_experts(moe_block_of(model, layer, routers), layer) for layer in layers}


def refit_layer(
    model: nn.Module,
    *,
    layer: int,
    kept: Sequence[int],
    drop: Sequence[int],
    inputs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    ridge: float = 1e-3,
    max_features: int = MAX_FEATURES,
    steps: int = 0,
    lr: float = DEFAULT_LR,
    on_batch: Callable[[int], None] | None = None,
) -> LayerFit:
    """Refit layer ``layer``'s kept experts in place from ``inputs``: per batch, the MoE
    block's input on the pruned path x [B, S, H] and the attention mask [B, S]; then, with
    ``steps`` > 0, refine them (refine.py). Earlier layers must already be pruned and repaired
    (in memory: masked; layer by layer: run that way)."""
    block = moe_block_of(model, layer)
    experts = _check_experts(block, layer)
    ids = sorted(int(k) for k in kept)
    sample = Sample() if steps > 0 else None
    fit = _refit_layer(
        model,
        block=block,
        experts=experts,
        layer=layer,
        kept=ids,
        drop=list(drop),
        inputs=inputs,
        ridge=ridge,
        joint=len(ids) * experts.down_proj.shape[2] <= max_features,
        sample=sample,
        on_batch=on_batch,
    )
    if sample is None:
        return fit
    refined = refine_layer(
        model, block, layer=layer, kept=ids, drop=list(drop), sample=sample, steps=steps, lr=lr,
        on_step=on_batch,
    )  # fmt: skip
    return dataclasses.replace(fit, refined=refined)


def _check_experts(block: nn.Module, layer: int) -> nn.Module:
    """The block's fused experts, if they have the layout refit understands."""
    experts = getattr(block, "experts", None)
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    hint = (
        "--repair refit handles experts stored as gate_up_proj [E, 2I, H] + down_proj "
        "[E, H, I] without biases (Mixtral, Qwen-MoE, OLMoE, DeepSeek, Phi-MoE, Granite-MoE); "
        "use --repair none for this model"
    )
    ok = (
        isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and gate_up.dim() == 3
        and down.dim() == 3
        and gate_up.shape[0] == down.shape[0]
        and gate_up.shape[1] == 2 * down.shape[2]
        and gate_up.shape[2] == down.shape[1]
        and callable(getattr(experts, "act_fn", None))
        and getattr(experts, "gate_up_proj_bias", None) is None
        and getattr(experts, "down_proj_bias", None) is None
    )
    if not ok:
        raise ModelError(f"layer {layer}: cannot refit {type(experts).__name__} experts", hint=hint)
    return experts


def _refit_layer(
    model: nn.Module,
    *,
    block: nn.Module,
    experts: nn.Module,
    layer: int,
    kept: list[int],
    drop: list[int],
    inputs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    ridge: float,
    joint: bool,
    sample: Sample | None,
    on_batch: Callable[[int], None] | None,
) -> LayerFit:
    down = experts.down_proj  # [E, H, I]
    inter = down.shape[2]
    device = down.device
    acc = torch.float32 if device.type == "mps" else torch.float64
    w0 = down.detach()[kept].transpose(1, 2).to(acc)  # [K, I, H]
    w0_32 = w0.float()  # products per chunk in float32, sums over chunks in float64
    normal = _Normal(len(kept), inter, down.shape[1], joint=joint, dtype=acc, device=device)
    checked = False
    for x, mask in inputs:  # x [B, S, H]: the block's input on the pruned path
        real = mask.reshape(-1).to(device=device, dtype=torch.bool)  # [B*S]
        with torch.no_grad():
            with _capture(experts) as seen:
                reference = output_tensor(block(x))  # the original block: original routing
            target = seen[-1].output  # [B*S, H]
            if sample is not None:  # the block's input and whole output, for refine.py
                flat = x.reshape(-1, x.shape[-1])
                sample.add(flat[real], reference.reshape(-1, reference.shape[-1])[real])
            with _capture(experts) as seen, masking(model, experts={layer: drop}):
                block(x)  # the pruned block
            pruned = seen[-1]
            for rows in torch.arange(real.shape[0], device=device)[real].split(_CHUNK):
                phi = _features(experts, kept, pruned, rows)
                y = target[rows].float()  # [n, H]
                if not checked:  # the features must reproduce the module's own pruned output
                    _check_features(phi, w0_32, pruned.output[rows].float(), layer, experts)
                    checked = True
                normal.add(phi, y, w0_32)
        if on_batch is not None:
            on_batch(int(real.sum()))
    if normal.tokens == 0:
        raise ModelError(
            f"layer {layer}: no calibration token reached the layer", hint="give more --data"
        )
    w, error_refit = normal.solve(w0, ridge=ridge)  # [K, I, H]
    with torch.no_grad():
        for i, k in enumerate(kept):
            down[k] = w[i].T.to(down.dtype)
    return LayerFit(
        layer=layer,
        tokens=normal.tokens,
        kept=tuple(kept),
        target=normal.target,
        error_dropped=normal.error_dropped,
        error_refit=error_refit,
        joint=joint,
    )


@dataclass(frozen=True)
class _Routing:
    hidden: torch.Tensor  # [T, H]
    index: torch.Tensor  # [T, k]
    weights: torch.Tensor  # [T, k]
    output: torch.Tensor  # [T, H]


@contextmanager
def _capture(experts: nn.Module) -> Iterator[list[_Routing]]:
    """Record the experts module's inputs (routing as applied) and output while it runs."""
    seen: list[_Routing] = []
    inner = experts.forward

    def forward(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = inner(hidden, index, weights)
        seen.append(_Routing(hidden, index, weights, out))
        return out

    experts.forward = forward
    try:
        yield seen
    finally:
        del experts.forward
    if not seen:
        raise ModelError(
            f"{type(experts).__name__} was not called by its MoE block",
            hint="this model's MoE block runs another code path; use --repair none",
        )


def _block_input(
    model: nn.Module,
    block: nn.Module,
    layer: int,
    ids: torch.Tensor,
    mask: torch.Tensor,
    drop: Mapping[int, Sequence[int]],
) -> torch.Tensor:
    """The input of ``block`` for this batch, on the pruned (and already refit) path."""
    found: list[torch.Tensor] = []

    def stop(_module: nn.Module, args: tuple[Any, ...]) -> None:
        found.append(args[0].detach())
        raise _Stop

    handle = block.register_forward_pre_hook(stop)
    device = next(model.parameters()).device
    earlier = {k: v for k, v in drop.items() if k < layer}
    try:
        with torch.no_grad(), masking(model, experts=earlier):
            text_model(model).base_model(
                input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
            )
    except _Stop:
        pass
    finally:
        handle.remove()
    return found[0]


@dataclass(frozen=True)
class _Features:
    """φ of n tokens, stored sparsely: per kept expert, the tokens routed to it and
    φ_k = g'_k(x) · act(G_k x) ⊙ (U_k x) for those tokens."""

    n: int
    rows: list[torch.Tensor]  # per kept expert: [n_k] positions among the n tokens
    phi: list[torch.Tensor]  # per kept expert: [n_k, I]

    def times(self, w: torch.Tensor) -> torch.Tensor:
        """Σ_k φ_k W_k [n, H] for weights ``w`` [K, I, H]."""
        out = torch.zeros(self.n, w.shape[-1], dtype=w.dtype, device=w.device)
        for k, (rows, phi) in enumerate(zip(self.rows, self.phi, strict=True)):
            out.index_add_(0, rows, phi @ w[k])
        return out


def _features(
    experts: nn.Module, kept: list[int], routing: _Routing, rows: torch.Tensor
) -> _Features:
    x = routing.hidden[rows].float()  # [n, H]
    index, weights = routing.index[rows], routing.weights[rows].float()  # [n, k]
    hits, phis = [], []
    for k in kept:
        routed = index == k  # [n, k]
        hit = routed.any(dim=-1).nonzero().squeeze(-1)  # [n_k]
        gate = (weights[hit] * routed[hit]).sum(dim=-1, keepdim=True)  # [n_k, 1]
        g, u = (x[hit] @ experts.gate_up_proj[k].float().T).chunk(2, dim=-1)  # [n_k, I] each
        hits.append(hit)
        phis.append(gate * experts.act_fn(g) * u)
    return _Features(n=x.shape[0], rows=hits, phi=phis)


def _check_features(
    phi: _Features, w0: torch.Tensor, pruned: torch.Tensor, layer: int, experts: nn.Module
) -> None:
    scale = float(pruned.norm()) or 1.0
    tol = 1e-4 if experts.down_proj.dtype == torch.float32 else 3e-2
    if float((phi.times(w0) - pruned).norm()) > tol * scale:
        raise ModelError(
            f"layer {layer}: {type(experts).__name__} does not compute Σ g·down(act(gate)·up) "
            "the way --repair refit models it",
            hint="use --repair none for this model, and please report it",
        )


class _Normal:
    """Normal equations of one layer's refit: joint [K·I, K·I] or per expert [K, I, I]."""

    def __init__(
        self, experts: int, inter: int, hidden: int, *, joint: bool, dtype: Any, device: Any
    ) -> None:
        self.joint, self.k, self.i = joint, experts, inter
        side = (experts * inter,) * 2 if joint else (experts, inter, inter)
        self.gram = torch.zeros(side, dtype=dtype, device=device)
        cross = (experts * inter, hidden) if joint else (experts, inter, hidden)
        self.cross = torch.zeros(cross, dtype=dtype, device=device)
        self.tokens = 0
        self.target = 0.0
        self.error_dropped = 0.0

    def add(self, phi: _Features, y: torch.Tensor, w0: torch.Tensor) -> None:
        """``phi`` of n tokens, ``y`` [n, H], ``w0`` [K, I, H] (float32 products, summed
        into the float64 normal equations)."""
        acc = self.gram.dtype
        residual = y - phi.times(w0)  # [n, H]
        self.tokens += y.shape[0]
        self.target += float((y * y).sum())
        self.error_dropped += float((residual * residual).sum())
        i = self.i
        if not self.joint:  # expert k fits y − Σ_{j≠k} φ_j W⁰_j = residual + φ_k W⁰_k
            for k, (rows, f) in enumerate(zip(phi.rows, phi.phi, strict=True)):
                self.gram[k] += (f.T @ f).to(acc)
                self.cross[k] += (f.T @ (residual[rows] + f @ w0[k])).to(acc)
            return
        # ΦᵀΦ is block-sparse: block (a, b) sums over the tokens routed to both a and b
        where = torch.full((len(phi.rows), phi.n), -1, dtype=torch.long, device=y.device)
        for k, rows in enumerate(phi.rows):
            where[k, rows] = torch.arange(rows.numel(), device=y.device)
        for a, (rows_a, f_a) in enumerate(zip(phi.rows, phi.phi, strict=True)):
            self.cross[a * i : (a + 1) * i] += (f_a.T @ y[rows_a]).to(acc)
            self.gram[a * i : (a + 1) * i, a * i : (a + 1) * i] += (f_a.T @ f_a).to(acc)
            for b in range(a + 1, len(phi.rows)):
                both = where[b, rows_a]  # [n_a]: position among b's tokens, or -1
                shared = both >= 0
                if not bool(shared.any()):
                    continue
                block = (f_a[shared].T @ phi.phi[b][both[shared]]).to(acc)  # [I, I]
                self.gram[a * i : (a + 1) * i, b * i : (b + 1) * i] += block
                self.gram[b * i : (b + 1) * i, a * i : (a + 1) * i] += block.T

    def solve(self, w0: torch.Tensor, *, ridge: float) -> tuple[torch.Tensor, float | None]:
        """The refit weights [K, I, H] and, for a joint solve, the error they leave."""
        if self.joint:
            start = w0.reshape(-1, w0.shape[-1])  # [K·I, H]
            w = _ridge(self.gram, self.cross, start, ridge)
            # Σ‖ΦW − Y‖² = Σ‖Y‖² − 2⟨W, ΦᵀY⟩ + ⟨W, ΦᵀΦ W⟩
            error = self.target - 2 * float((w * self.cross).sum())
            error += float((w * (self.gram @ w)).sum())
            return w.reshape(w0.shape), max(error, 0.0)
        w = torch.stack(
            [_ridge(g, c, s, ridge) for g, c, s in zip(self.gram, self.cross, w0, strict=True)]
        )
        return w, None


def _ridge(gram: torch.Tensor, cross: torch.Tensor, start: torch.Tensor, ridge: float):
    """argmin_W ‖ΦW − Y‖² + λ‖W − W⁰‖², λ = ridge · mean(diag ΦᵀΦ); W⁰ where no data."""
    lam = ridge * float(gram.diagonal().mean())
    if lam <= 0:
        return start
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, cross + lam * start)

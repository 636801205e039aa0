"""make_plan: scores -> a PrunePlan under a budget, honouring every routing constraint.

Budgets (one count for every MoE layer, as stock configs need): ``keep`` experts, a
``keep_ratio`` of them, or the smallest ``coverage`` count at which every layer keeps at least
that share of its score mass. Constraints, always: at least top-k; group-limited routers keep
the same number per group (DeepSeek-V3); ``min_keep``. An infeasible budget fails here, before
any rewrite, with the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from mfprune.arch.layout import ExpertLayout, HeadLayout, ModelLayout
from mfprune.errors import PlanError
from mfprune.plan import Kept, PrunePlan


def make_plan(
    layout: ModelLayout,
    *,
    expert_scores: torch.Tensor | None = None,  # [L_moe, E], rows in layout.experts.layers order
    keep: int | None = None,
    keep_ratio: float | None = None,
    coverage: float | None = None,
    global_budget: float | None = None,
    keep_params: float | None = None,
    min_keep: int = 0,
    attention_scores: torch.Tensor | None = None,  # [L_moe, A] (JetMoE)
    attention_keep_ratio: float | None = None,
    head_scores: torch.Tensor | None = None,  # [L, H]
    heads_keep_ratio: float | None = None,
    meta: dict[str, Any] | None = None,
) -> PrunePlan:
    experts: Kept = {}
    if expert_scores is not None and keep_params is not None:
        if any(x is not None for x in (keep, keep_ratio, coverage, global_budget)):
            raise PlanError(
                "--keep-params replaces --keep / --keep-ratio / --coverage / --global-budget: "
                "give one budget"
            )
        experts = plan_experts_by_params(
            layout.experts, expert_scores, ratio=keep_params, min_keep=min_keep
        )
    elif expert_scores is not None and global_budget is not None:
        if any(x is not None for x in (keep, keep_ratio, coverage)):
            raise PlanError(
                "--global-budget replaces --keep / --keep-ratio / --coverage: give one budget"
            )
        experts = plan_experts_global(
            layout.experts, expert_scores, ratio=global_budget, min_keep=min_keep
        )
    elif expert_scores is not None:
        experts = plan_experts(
            layout.experts,
            expert_scores,
            keep=keep,
            keep_ratio=keep_ratio,
            coverage=coverage,
            min_keep=min_keep,
        )
    attention: Kept = {}
    if attention_scores is not None and attention_keep_ratio is not None:
        if layout.attention_experts is None:
            raise PlanError(f"{layout.family} has no attention experts to prune")
        attention = plan_experts(
            layout.attention_experts, attention_scores, keep_ratio=attention_keep_ratio
        )
    heads: Kept = {}
    if head_scores is not None and heads_keep_ratio is not None:
        if layout.heads is None or layout.spec.heads.unsupported:
            why = layout.spec.heads.unsupported or "the config names no heads"
            raise PlanError(f"{layout.family} heads cannot be pruned: {why}")
        heads = plan_heads(layout.heads, head_scores, keep_ratio=heads_keep_ratio)
    plan = PrunePlan(experts=experts, attention_experts=attention, heads=heads, meta=meta or {})
    plan.validate(layout, allow_uneven=global_budget is not None or keep_params is not None)
    return plan


# ----------------------------------------------------------------------------- experts


def plan_experts(
    layout: ExpertLayout,
    scores: torch.Tensor,
    *,
    keep: int | None = None,
    keep_ratio: float | None = None,
    coverage: float | None = None,
    min_keep: int = 0,
) -> Kept:
    """Kept experts per MoE layer: the same count everywhere, chosen by ``scores`` [L, E]."""
    L, E = len(layout.layers), layout.num_experts
    if tuple(scores.shape) != (L, E):
        raise PlanError(
            f"scores have shape {list(scores.shape)} but the model has {L} MoE layers x {E} "
            f"{layout.kind}",
            hint="was the profile made on another model?",
        )
    if sum(x is not None for x in (keep, keep_ratio, coverage)) != 1:
        raise PlanError(
            "give exactly one budget: --keep N, --keep-ratio R or --coverage C",
            hint="e.g. --keep-ratio 0.5",
        )
    floor = minimum_keep(layout, min_keep=min_keep)
    if coverage is not None:
        n = _coverage_count(layout, scores, coverage, floor)
    else:
        n = keep if keep is not None else _from_ratio(layout, keep_ratio)  # type: ignore[arg-type]
        _check_count(layout, n, floor, explicit=keep is not None)
    kept = {}
    for i, layer in enumerate(layout.layers):
        pinned = sorted(layout.pinned(layer))  # hash layers: the experts their table names
        if len(pinned) > n:
            raise PlanError(
                f"layer {layer} routes tokens by a fixed token -> expert table that names "
                f"{len(pinned)} experts; keeping {n} per layer would drop some of them",
                hint=f"keep at least {len(pinned)} (--keep {len(pinned)}), or plan by hand "
                "with --plan and --allow-uneven",
            )
        row = scores[i].double().clone()
        row[pinned] = float("inf")  # kept first; the rest by score
        kept[layer] = select(layout, row, n)
    return kept


def minimum_keep(layout: ExpertLayout, *, min_keep: int = 0) -> int:
    """The fewest experts a layer may keep: top-k, --min-keep, and per-group needs."""
    floor = max(layout.top_k, min_keep, 1)
    if layout.n_group > 1:
        per_group = max(
            layout.spec.group_score_topk,
            math.ceil(layout.top_k / layout.topk_group),
            math.ceil(floor / layout.n_group),
        )
        floor = per_group * layout.n_group
    return floor


def _from_ratio(layout: ExpertLayout, ratio: float) -> int:
    if not 0 < ratio <= 1:
        raise PlanError(f"--keep-ratio must be in (0, 1], got {ratio}")
    step = layout.n_group  # keep a multiple of the group count
    return max(step, round(ratio * layout.num_experts / step) * step)


def _check_count(layout: ExpertLayout, n: int, floor: int, *, explicit: bool) -> None:
    E = layout.num_experts
    if n > E:
        raise PlanError(f"cannot keep {n} {layout.kind}: layers have {E}")
    if n < floor:
        raise PlanError(
            f"keeping {n} of {E} {layout.kind} is below the minimum of {floor} "
            f"(top-k {layout.top_k}"
            + (
                f", {layout.n_group} routing groups needing {floor // layout.n_group} each)"
                if layout.n_group > 1
                else ")"
            ),
            hint=f"keep at least {floor} (--keep-ratio ≥ {floor / E:.3g})",
        )
    if n % layout.n_group:
        lo = n // layout.n_group * layout.n_group
        raise PlanError(
            f"keeping {n} {layout.kind}: group-limited routing needs a multiple of "
            f"n_group = {layout.n_group}",
            hint=f"use {lo} or {lo + layout.n_group}",
        )


def select(layout: ExpertLayout, scores: torch.Tensor, n: int) -> tuple[int, ...]:
    """The ``n`` best ids of one layer (ties: lower id); group-limited: n / n_group per group."""
    G = layout.n_group
    size = layout.num_experts // G
    per = n // G
    kept: list[int] = []
    for g in range(G):
        ids = range(g * size, (g + 1) * size)
        ranked = sorted(ids, key=lambda i: (-float(scores[i]), i))
        kept.extend(ranked[:per])
    return tuple(sorted(kept))


def _coverage_count(layout: ExpertLayout, scores: torch.Tensor, c: float, floor: int) -> int:
    if not 0 < c <= 1:
        raise PlanError(f"--coverage must be in (0, 1], got {c}")
    for n in range(floor, layout.num_experts + 1, layout.n_group):
        if all(_covered(layout, row, n) >= c for row in scores):
            return n
    return layout.num_experts


def _covered(layout: ExpertLayout, row: torch.Tensor, n: int) -> float:
    total = float(row.double().clamp(min=0).sum())
    if total == 0:
        return 1.0
    kept = select(layout, row, n)
    return float(row.double().clamp(min=0)[list(kept)].sum()) / total


def plan_experts_by_params(
    layout: ExpertLayout, scores: torch.Tensor, *, ratio: float, min_keep: int = 0
) -> Kept:
    """CartesianMoE under a budget in parameters actually freed: each layer keeps at most
    ``ratio`` of its sub-experts' parameters. scores [L_moe, E] (rows in layout.layers order).

    Greedy, per layer: while the sub-experts alive hold more than the budget, free the
    sub-expert with the least score lost per parameter freed — freeing it drops every kept
    expert that uses it (their scores are the loss), and any other sub-expert left unused goes
    too (its parameters count as freed). A layer never keeps fewer than top-k / ``min_keep``
    experts; layers may keep different counts (the family's config records each layer's table).
    """
    if not layout.sub_experts:
        raise PlanError(
            f"--keep-params budgets shared sub-experts (CartesianMoE); {layout.kind} of this "
            "family are independent, so their parameters go with their count",
            hint="use --keep-ratio R (or --global-budget R)",
        )
    if not 0 < ratio <= 1:
        raise PlanError(f"--keep-params must be in (0, 1], got {ratio}")
    floor = minimum_keep(layout, min_keep=min_keep)
    kept: Kept = {}
    for row, layer in enumerate(layout.layers):
        sub = layout.sub_experts[layer]
        total = sub.held_params(range(layout.num_experts))
        budget = ratio * total
        alive = set(range(layout.num_experts))
        values = scores[row].double().clamp(min=0)
        held = sub.held_params
        while held(alive) > budget:
            best: tuple[float, int, int] | None = None
            for s, ids in enumerate(sub.used(alive)):
                for i in ids:
                    rest = {e for e in alive if sub.table[e][s] != i}
                    if len(rest) < floor:
                        continue
                    lost = float(values[sorted(alive - rest)].sum())
                    freed = held(alive) - held(rest)
                    key = (lost / freed, s, i)
                    best = key if best is None or key < best else best
            if best is None:
                share = held(alive) / total
                raise PlanError(
                    f"layer {layer}: keeping {ratio:.0%} of its sub-expert parameters would "
                    f"leave fewer than {floor} experts (top-k / --min-keep); the least it can "
                    f"keep here is {share:.0%}",
                    hint=f"use --keep-params ≥ {share:.3g}",
                )
            _, s, i = best
            alive = {e for e in alive if sub.table[e][s] != i}
        kept[layer] = tuple(sorted(alive))
    return kept


def plan_experts_global(
    layout: ExpertLayout, scores: torch.Tensor, *, ratio: float, min_keep: int = 0
) -> Kept:
    """One pool for all layers: keep ``ratio`` of all experts, spent where the scores say.

    Scores are made comparable across layers first: each becomes its share of its own layer's
    total. Every layer starts with its floor (top-k, groups, ``min_keep``); the rest of the
    budget goes to the highest shares anywhere. Group-limited layers grow one expert per group
    at a time (the group's best remaining ones), so groups stay equal.
    """
    L, E, G = len(layout.layers), layout.num_experts, layout.n_group
    if tuple(scores.shape) != (L, E):
        raise PlanError(
            f"scores have shape {list(scores.shape)} but the model has {L} MoE layers x {E} "
            f"{layout.kind}",
            hint="was the profile made on another model?",
        )
    if not 0 < ratio <= 1:
        raise PlanError(f"--global-budget must be in (0, 1], got {ratio}")
    floor = minimum_keep(layout, min_keep=min_keep)
    budget = round(ratio * L * E)
    if budget < floor * L:
        raise PlanError(
            f"a global budget of {ratio:g} keeps {budget} of {L * E} {layout.kind}, below the "
            f"{floor} per layer x {L} layers that top-k and routing groups need",
            hint=f"use --global-budget ≥ {floor / E:.3g}",
        )
    share = scores.double().clamp(min=0)
    share = share / share.sum(dim=1, keepdim=True).clamp(min=1e-30)
    size = E // G
    order = [  # per layer and group: ids best first
        [
            sorted(range(g * size, (g + 1) * size), key=lambda i, r=row: (-float(r[i]), i))
            for g in range(G)
        ]
        for row in share
    ]
    per_group = [floor // G] * L
    spent = floor * L
    while spent + G <= budget:
        best, best_value = None, -1.0
        for i in range(L):
            if per_group[i] >= size:
                continue
            value = sum(float(share[i, order[i][g][per_group[i]]]) for g in range(G))
            if value > best_value:
                best, best_value = i, value
        if best is None:
            break
        per_group[best] += 1
        spent += G
    return {
        layer: tuple(sorted(i for g in range(G) for i in order[row][g][: per_group[row]]))
        for row, layer in enumerate(layout.layers)
    }


# ----------------------------------------------------------------------------- heads


def plan_heads(heads: HeadLayout, scores: torch.Tensor, *, keep_ratio: float) -> Kept:
    """Kept query heads per layer; KV groups stay equal.

    With several query heads per KV head, every KV group keeps its best ``round(R x group)``
    heads; with one (MLA, or MHA), the best ``round(R x H)`` heads stay and their KV heads with
    them.
    """
    H, G = heads.num_heads, heads.group_size
    if not 0 < keep_ratio <= 1:
        raise PlanError(f"--heads-keep-ratio must be in (0, 1], got {keep_ratio}")
    if scores.ndim != 2 or tuple(scores.shape) != (len(heads.layers), H):
        raise PlanError(
            f"head scores have shape {list(scores.shape)}; the model has {H} heads in "
            f"{len(heads.layers)} attention layers"
        )
    plan: Kept = {}
    for layer, row in zip(heads.layers, scores, strict=True):  # row: [H]
        if G == 1:
            n = max(1, round(keep_ratio * H))
            ranked = sorted(range(H), key=lambda h: (-float(row[h]), h))
            plan[layer] = tuple(sorted(ranked[:n]))
        else:
            m = max(1, round(keep_ratio * G))
            kept = []
            for kv in range(heads.num_kv_heads):
                ids = range(kv * G, (kv + 1) * G)
                kept.extend(sorted(ids, key=lambda h: (-float(row[h]), h))[:m])
            plan[layer] = tuple(sorted(kept))
    return plan


# ----------------------------------------------------------------------------- from a profile


@dataclass(frozen=True)
class LayerReport:
    layer: int
    kept: tuple[int, ...]
    dropped: tuple[int, ...]
    mass_kept: float  # share of the layer's routed mass (soft frequency) on kept experts


def plan_from_profile(
    layout: ModelLayout,
    stats: Any,  # mfprune.profiling.ProfileStats (checked against the model by the caller)
    *,
    criterion: str = "reap",
    criterion_options: dict[str, Any] | None = None,
    keep: int | None = None,
    keep_ratio: float | None = None,
    coverage: float | None = None,
    global_budget: float | None = None,
    keep_params: float | None = None,
    min_keep: int = 0,
    attention_keep_ratio: float | None = None,
    heads_keep_ratio: float | None = None,
) -> tuple[PrunePlan, list[LayerReport]]:
    """Rank with ``criterion`` and plan under the budget; the plan records how it was made."""
    from mfprune.scoring import score

    options = criterion_options or {}
    experts = stats.experts
    if tuple(experts.layers) != layout.experts.layers:
        raise PlanError(
            f"the profile covers MoE layers {list(experts.layers)} but the model has "
            f"{list(layout.experts.layers)}",
            hint="profile this model again with `mfprune profile`",
        )
    budgets = (keep, keep_ratio, coverage, global_budget, keep_params)
    any_budget = any(x is not None for x in budgets)
    att = stats.attention_experts
    heads = stats.heads
    if heads_keep_ratio and (
        heads is None or layout.heads is None or tuple(heads.layers) != layout.heads.layers
    ):
        raise PlanError(
            "the profile has no head usage for every attention layer of this model",
            hint="re-profile it with `mfprune profile`",
        )
    meta = {
        "criterion": criterion,
        "criterion_options": options,
        "budget": {
            k: v
            for k, v in {
                "keep": keep,
                "keep_ratio": keep_ratio,
                "coverage": coverage,
                "global_budget": global_budget,
                "keep_params": keep_params,
                "min_keep": min_keep or None,
                "attention_keep_ratio": attention_keep_ratio,
                "heads_keep_ratio": heads_keep_ratio,
            }.items()
            if v is not None
        },
        "stats": {
            "model_fingerprint": stats.meta.model_fingerprint,
            "data_fingerprint": stats.meta.data_fingerprint,
            "tokens": stats.meta.tokens,
        },
    }
    plan = make_plan(
        layout,
        expert_scores=score(experts, criterion, **options) if any_budget else None,
        keep=keep,
        keep_ratio=keep_ratio,
        coverage=coverage,
        global_budget=global_budget,
        keep_params=keep_params,
        min_keep=min_keep,
        attention_scores=score(att, criterion, **options) if att and attention_keep_ratio else None,
        attention_keep_ratio=attention_keep_ratio,
        head_scores=heads.usage if heads is not None and heads_keep_ratio else None,
        heads_keep_ratio=heads_keep_ratio,
        meta=meta,
    )
    report = []
    for row, layer in enumerate(layout.experts.layers):
        kept = plan.kept_experts(layout.experts, layer)
        soft = experts.soft[row].double()
        total = float(soft.sum())
        report.append(
            LayerReport(
                layer=layer,
                kept=kept,
                dropped=tuple(i for i in range(layout.experts.num_experts) if i not in kept),
                mass_kept=float(soft[list(kept)].sum()) / total if total else 1.0,
            )
        )
    return plan, report

"""Multi-token-prediction layers on request: removed whole, with the config saying so; and
the fail-closed check on expert- and attention-looking tensors outside the decoder layers.

By default an MTP layer is pruned like the decoder layers (``PrunePlan.with_mtp``), so a
server that loads it for speculative decoding finds the config's expert count. ``drop_mtp``
removes every tensor of every MTP layer (and of an MTP head under its own module,
``mfprune.arch.mtp_prefix``) and sets the config's MTP count to 0 instead.
"""

from __future__ import annotations

import copy
from typing import Any

from mfprune.arch.expert_tensors import group_by_layer, layer_prefix
from mfprune.arch.layout import ModelLayout, lm_config
from mfprune.arch.mtp_prefix import mtp_module, outside_attention, outside_experts
from mfprune.checkpoint import Checkpoint
from mfprune.errors import ModelError, PlanError
from mfprune.io.reader import TensorInfo
from mfprune.io.writer import OutTensor
from mfprune.plan import PrunePlan, head_index


def check_drop(plan: PrunePlan, layout: ModelLayout) -> None:
    """Refuse ``drop_mtp`` on a model without MTP layers, or with a plan that names them."""
    key = layout.spec.mtp_layers_key
    if not layout.mtp_layers:
        raise PlanError(
            f"--drop-mtp: this {layout.family} checkpoint has no multi-token-prediction layers"
            + (f" ({key} is 0 or absent)" if key else ""),
            hint="leave out --drop-mtp",
        )
    named = sorted(
        layer
        for section in (plan.experts, plan.attention_experts, plan.heads)
        for layer in section
        if layer in layout.mtp_layers
    )
    if named:
        raise PlanError(
            f"--drop-mtp removes MTP layer(s) {named}, but the plan prunes them",
            hint="remove those layers from the plan, or leave out --drop-mtp",
        )


def drop_actions(ckpt: Checkpoint, layout: ModelLayout, actions: dict[str, OutTensor | None]):
    """Mark every tensor of every MTP layer as dropped, and every tensor of the MTP head's
    own module (``mtp.fc``, ``mtp.norm``...) where its layers have their own prefix."""
    prefix = layer_prefix(layout.spec.experts)
    for layer, infos in group_by_layer(ckpt.tensors.values(), prefix).items():
        if layer in layout.mtp_layers:
            actions.update((info.name, None) for info in infos)
    module = mtp_module(layout.spec)
    if module:
        actions.update((name, None) for name in ckpt.tensors if name.startswith(module))


def check_outside_layers(
    ckpt: Checkpoint,
    layout: ModelLayout,
    plan: PrunePlan,
    actions: dict[str, OutTensor | None],
) -> None:
    """Refuse a plan that changes an expert count while a tensor of ``outside_experts`` is
    copied unchanged (its experts would no longer match the config's count), or that changes
    a head count while a tensor of ``outside_attention`` is (the config's head counts are one
    for every layer: its heads would no longer match them)."""
    kinds = [k for k in (layout.experts, layout.attention_experts) if k is not None]
    changed = [
        k for k in kinds if any(len(plan.kept_experts(k, L)) < k.num_experts for L in k.layers)
    ]
    if changed:
        _refuse(
            [info for info in outside_experts(ckpt, layout) if info.name not in actions],
            layout,
            what="experts or a router of an MoE",
            counts=", ".join(f"{k.count_key} = {k.num_experts}" for k in changed),
            keep="experts",
            own="experts",
        )
    heads = layout.heads
    if plan.heads and heads is not None:
        kept_q = next(iter(plan.heads.values()))  # one kept count for every layer
        counts = [(heads.spec.count_key, heads.num_heads, len(kept_q))]
        if heads.spec.kv_count_key:
            counts.append(
                (heads.spec.kv_count_key, heads.num_kv_heads, len(head_index(heads, kept_q)))
            )
        counts = [(key, old, new) for key, old, new in counts if old != new]
        if counts:
            _refuse(
                [info for info in outside_attention(ckpt, layout) if info.name not in actions],
                layout,
                what="the attention of a layer",
                counts=", ".join(f"{key} = {old} → {new}" for key, old, new in counts),
                keep="heads",
                own="attention",
            )


def _refuse(
    found: list[TensorInfo], layout: ModelLayout, *, what: str, counts: str, keep: str, own: str
) -> None:
    if not found:
        return
    names = ", ".join(f"{layout.real_name(i.name)} {list(i.shape)}" for i in found[:3])
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    raise ModelError(
        f"{len(found)} tensor(s) outside the decoder layers look like {what} this rewrite "
        f"does not prune: {names}{more}; they would keep their {keep} while the config's "
        f"{counts} changes; nothing was written",
        hint="an MTP head under its own prefix: the adapter's mtp_prefix and mtp_layers_key; "
        f"a part carried on purpose with {own} of its own: the adapter's untouched; see "
        "docs/checkpoint-formats.md",
    )


def dropped_config(config: dict[str, Any], layout: ModelLayout) -> dict[str, Any]:
    """``config`` with the MTP count set to 0 where it was read (a composite model's
    ``config_path``: Step 3.7 keeps it in text_config)."""
    key = layout.spec.mtp_layers_key
    if not key:
        return config
    root = copy.deepcopy(config)
    lm_config(root, layout.spec)[key] = 0
    return root

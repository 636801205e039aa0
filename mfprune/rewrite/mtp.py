"""Multi-token-prediction layers on request: removed whole, with the config saying so.

By default an MTP layer is pruned like the decoder layers (``PrunePlan.with_mtp``), so a
server that loads it for speculative decoding finds the config's expert count. ``drop_mtp``
removes every tensor of every MTP layer and sets the config's MTP count to 0 instead.
"""

from __future__ import annotations

import copy
from typing import Any

from mfprune.arch.expert_tensors import group_by_layer, layer_prefix
from mfprune.arch.layout import ModelLayout, lm_config
from mfprune.checkpoint import Checkpoint
from mfprune.errors import PlanError
from mfprune.io.writer import OutTensor
from mfprune.plan import PrunePlan


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
    """Mark every tensor of every MTP layer as dropped."""
    prefix = layer_prefix(layout.spec.experts)
    for layer, infos in group_by_layer(ckpt.tensors.values(), prefix).items():
        if layer in layout.mtp_layers:
            actions.update((info.name, None) for info in infos)


def dropped_config(config: dict[str, Any], layout: ModelLayout) -> dict[str, Any]:
    """``config`` with the MTP count set to 0 where it was read (a composite model's
    ``config_path``: Step 3.7 keeps it in text_config)."""
    key = layout.spec.mtp_layers_key
    if not key:
        return config
    root = copy.deepcopy(config)
    lm_config(root, layout.spec)[key] = 0
    return root

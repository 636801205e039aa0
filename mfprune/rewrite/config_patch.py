"""The config.json of the pruned model: the source config with only the count keys changed."""

from __future__ import annotations

import copy
from typing import Any

from mfprune.arch.layout import ModelLayout
from mfprune.plan import PrunePlan, head_index


def patch_config(config: dict[str, Any], layout: ModelLayout, plan: PrunePlan) -> dict[str, Any]:
    """Return ``config`` with expert/head counts set to what ``plan`` keeps (plan validated)."""
    out = copy.deepcopy(config)
    for experts in filter(None, (layout.experts, layout.attention_experts)):
        first = experts.layers[0]
        kept = len(plan.kept_experts(experts, first))
        for key in experts.spec.count_keys:
            if key in out:
                out[key] = kept
    heads = layout.heads
    if plan.heads and heads is not None:
        kept_q = next(iter(plan.heads.values()))
        spec = heads.spec
        out[spec.count_key] = len(kept_q)
        if spec.kv_count_key:
            out[spec.kv_count_key] = len(head_index(heads, kept_q))
        if (
            spec.pin_head_dim
            and spec.head_dim_key
            and not isinstance(out.get(spec.head_dim_key), int)
        ):
            out[spec.head_dim_key] = heads.head_dim  # was derived from hidden_size / heads
    return out


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[Any]]:
    """{key: [old, new]} for every top-level key that differs."""
    keys = sorted(set(before) | set(after))
    return {k: [before.get(k), after.get(k)] for k in keys if before.get(k) != after.get(k)}

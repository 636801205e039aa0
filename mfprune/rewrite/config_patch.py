"""The config.json of the pruned model: the source config with only the count keys changed."""

from __future__ import annotations

import copy
from typing import Any

from mfprune.arch.layout import ModelLayout, lm_config, set_config_value
from mfprune.plan import PrunePlan, head_index

UNEVEN_KEY = "mfprune_expert_counts"  # {layer: experts kept} when layers keep different counts


def patch_config(config: dict[str, Any], layout: ModelLayout, plan: PrunePlan) -> dict[str, Any]:
    """Return ``config`` with expert/head counts set to what ``plan`` keeps (plan validated).

    A composite model's counts are written where they were read: under its ``config_path``."""
    root = copy.deepcopy(config)
    out = lm_config(root, layout.spec)
    for experts in filter(None, (layout.experts, layout.attention_experts)):
        counts = plan.expert_counts(experts)
        for key in experts.spec.count_keys:  # dotted: in a sub-config (DBRX ffn_config)
            set_config_value(out, key, max(counts.values()))
        sub = experts.spec.sub_experts
        if sub and experts.sub_experts:  # CartesianMoE: each layer's table and set sizes
            out[sub.table_key] = {
                str(L): s.kept_table(plan.kept_experts(experts, L))
                for L, s in experts.sub_experts.items()
            }
            out[sub.layer_counts_key] = {
                str(L): [len(ids) for ids in s.used(plan.kept_experts(experts, L))]
                for L, s in experts.sub_experts.items()
            }
        if len(set(counts.values())) > 1:
            # stock transformers holds one count: mfprune.load_pretrained reads these
            out[UNEVEN_KEY] = {str(layer): n for layer, n in counts.items()}
    heads = layout.heads
    if plan.heads and heads is not None:
        kept_q = next(iter(plan.heads.values()))
        spec = heads.spec
        out[spec.count_key] = len(kept_q)
        per_layer = out.get(spec.per_layer_count_key) if spec.per_layer_count_key else None
        if isinstance(per_layer, list):  # every layer keeps the same shape (plan validated)
            out[spec.per_layer_count_key] = [len(kept_q)] * len(per_layer)
        if spec.kv_count_key:
            out[spec.kv_count_key] = len(head_index(heads, kept_q))
        if (
            spec.pin_head_dim
            and spec.head_dim_key
            and not isinstance(out.get(spec.head_dim_key), int)
        ):
            out[spec.head_dim_key] = heads.head_dim  # was derived from hidden_size / heads
    return root


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[Any]]:
    """{key: [old, new]} for every key that differs; keys of sub-configs that both sides hold
    as tables are dotted (``text_config.num_experts``)."""
    changes: dict[str, list[Any]] = {}
    for k in sorted(set(before) | set(after)):
        a, b = before.get(k), after.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.update({f"{k}.{sub}": v for sub, v in config_changes(a, b).items()})
        elif a != b:
            changes[k] = [a, b]
    return changes


def change_text(key: str, old: Any, new: Any) -> str:
    """``num_experts 16→8``; a key that was not set: ``head_dim set to 16``; one removed:
    ``x removed``. Long values are cut short."""
    if old is None:
        return f"{key} set to {_short(new)}"
    if new is None:
        return f"{key} removed"
    return f"{key} {_short(old)}→{_short(new)}"


def _short(value: Any) -> str:
    import json

    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "…"

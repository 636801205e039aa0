"""The pruned model's ``quantization_config``: kept, with the module names that name experts
renumbered.

Quantization configs list modules by name: compressed-tensors' ``ignore``, FP8's and AWQ's
``modules_to_not_convert``, GPTQ's ``modules_in_block_to_quantize`` and ``dynamic`` (a dict
keyed by module patterns). A literal name under a pruned layer's ``...experts.{e}`` is
renumbered with its expert, or removed when the expert goes. A pattern (``re:...``, a regex,
a glob) that singles out one expert of a pruned layer cannot be renumbered safely: refused.
"""

from __future__ import annotations

import re
from typing import Any

from mfprune.arch.expert_tensors import expert_prefix
from mfprune.arch.layout import ExpertLayout, ModelLayout
from mfprune.errors import ModelError
from mfprune.plan import PrunePlan

_REGEX_CHARS = re.compile(r"[\\*+?\[\](){}|^$]")
_PATTERN_EXPERT = re.compile(r"experts(?:\\?\.|_)(\d+)")
_PATTERN_LAYER = re.compile(r"layers(?:\\?\.)(\d+)")


class _Renumber:
    """Maps a literal module name to its new name (or None: dropped, or unchanged: itself)."""

    def __init__(self, layout: ModelLayout, plan: PrunePlan) -> None:
        self.rules: list[tuple[re.Pattern[str], str, dict[int, int]]] = []
        self.pruned_layers: set[int] = set()
        for experts in filter(None, (layout.experts, layout.attention_experts)):
            self._add(experts, plan, layout)

    def _add(self, experts: ExpertLayout, plan: PrunePlan, layout: ModelLayout) -> None:
        for layer in experts.all_layers:  # MTP layers too, under their stored names
            kept = plan.kept_experts(experts, layer)
            if len(kept) == experts.num_experts:
                continue
            self.pruned_layers.add(layer)
            new_id = {old: new for new, old in enumerate(kept)}
            for template in dict.fromkeys(expert_prefix(t) for t in experts.spec.per_expert):
                prefix = layout.real_name(template.replace("{layer}", str(layer)))
                head, tail = prefix.split("{expert}")
                pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
                self.rules.append((pattern, head, new_id))

    def name(self, name: str) -> str | None:
        dotted = name + "."  # module names lack the tensor's last component
        for pattern, head, new_id in self.rules:
            m = pattern.match(dotted)
            if m:
                old = int(m.group(1))
                if old not in new_id:
                    return None
                return (head + str(new_id[old]) + dotted[m.end(1) :])[:-1]
        return name

    def check_pattern(self, pattern: str, where: str) -> None:
        expert = _PATTERN_EXPERT.search(pattern)
        if not expert or not self.pruned_layers:
            return
        layer = _PATTERN_LAYER.search(pattern)
        if layer and int(layer.group(1)) not in self.pruned_layers:
            return
        place = f"quantization_config.{where}" if where else "quantization_config"
        raise ModelError(
            f"{place} holds the pattern {pattern!r}, which names expert {expert.group(1)}"
            f" of a layer this plan prunes: it cannot be renumbered",
            hint="list the expert modules by their full names instead, or keep every expert "
            "of that layer",
        )


def _is_pattern(s: str) -> bool:
    return s.startswith("re:") or bool(_REGEX_CHARS.search(s))


def _walk(value: Any, renumber: _Renumber, where: str) -> Any:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            new_key: str | None = key
            if isinstance(key, str):
                new_key = _string(key, renumber, where)
            if new_key is not None:
                out[new_key] = _walk(item, renumber, f"{where}.{key}" if where else key)
        return out
    if isinstance(value, list):
        items = [_walk(v, renumber, where) if not isinstance(v, str) else v for v in value]
        strings = [_string(v, renumber, where) if isinstance(v, str) else v for v in items]
        return [v for v in strings if v is not None]
    return value


def _string(s: str, renumber: _Renumber, where: str) -> str | None:
    if _is_pattern(s):
        renumber.check_pattern(s, where)
        return s
    return renumber.name(s)


def patch_quantization_config(
    config: dict[str, Any], layout: ModelLayout, plan: PrunePlan
) -> dict[str, Any]:
    """``config`` with its ``quantization_config`` module lists renumbered (config unchanged
    when it has none). Raises ModelError for a pattern that names one pruned expert."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        return config
    return {**config, "quantization_config": _walk(qc, _Renumber(layout, plan), "")}

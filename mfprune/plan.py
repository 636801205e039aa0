"""PrunePlan: which experts, attention experts and query heads each decoder layer keeps.

JSON form (``docs/plan-format.md``)::

    {"format": "mfprune.plan/1",
     "experts":           {"<layer>": [kept expert ids]},
     "attention_experts": {"<layer>": [kept attention-expert ids]},
     "heads":             {"<layer>": [kept query-head ids]},
     "meta":              {...}}            # optional, free-form: criterion, profile, ...

A layer that is absent keeps everything. Validation reports every problem at once.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mfprune.arch.layout import ExpertLayout, HeadLayout, ModelLayout
from mfprune.errors import PlanError, did_you_mean

PLAN_FORMAT = "mfprune.plan/1"
_SECTIONS = ("experts", "attention_experts", "heads")

Kept = dict[int, tuple[int, ...]]  # layer -> sorted kept ids
_ID_LIST = re.compile(r"\[\s*((?:-?\d+,\s*)*-?\d+)\s*\]")


@dataclass(frozen=True)
class PrunePlan:
    experts: Kept = field(default_factory=dict)
    attention_experts: Kept = field(default_factory=dict)
    heads: Kept = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ JSON round trip

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": PLAN_FORMAT}
        for section in _SECTIONS:
            kept: Kept = getattr(self, section)
            out[section] = {str(layer): list(ids) for layer, ids in sorted(kept.items())}
        if self.meta:
            out["meta"] = self.meta
        return out

    def to_json(self) -> str:
        """Indented JSON with each layer's id list on one line (diff-friendly)."""
        text = json.dumps(self.to_dict(), indent=2)
        return _ID_LIST.sub(
            lambda m: "[" + ", ".join(i.strip() for i in m.group(1).split(",")) + "]", text
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"plan file {p} does not exist", hint="check the --plan path")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise PlanError(
                f"plan file {p} is not valid JSON: {exc}", hint="see docs/plan-format.md"
            ) from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> PrunePlan:
        """Parse the JSON form; every structural problem is reported at once."""
        if not isinstance(data, dict):
            raise PlanError("a plan must be a JSON object")
        problems = []
        if data.get("format") != PLAN_FORMAT:
            problems.append(f"'format' must be \"{PLAN_FORMAT}\", got {data.get('format')!r}")
        for key in data:
            if key not in (*_SECTIONS, "format", "meta"):
                problems.append(f"unknown key '{key}'{did_you_mean(key, _SECTIONS)}")
        sections: dict[str, Kept] = {}
        for section in _SECTIONS:
            sections[section] = _parse_section(data.get(section, {}), section, problems)
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            problems.append("'meta' must be an object")
        if problems:
            raise PlanError(problems)
        return cls(**sections, meta=meta if isinstance(meta, dict) else {})

    # ------------------------------------------------------------------ validation

    def validate(self, layout: ModelLayout, *, allow_uneven: bool = False) -> None:
        """Raise PlanError listing every reason this plan cannot be applied to ``layout``.

        ``allow_uneven`` accepts different expert counts per layer: such a model needs
        ``mfprune.load_pretrained`` (stock configs hold one count).
        """
        problems: list[str] = []
        _check_experts(self.experts, layout.experts, layout, problems, allow_uneven)
        att = layout.attention_experts
        if att is None:
            if self.attention_experts:
                problems.append(f"attention_experts: {layout.family} has no attention experts")
        else:
            _check_experts(self.attention_experts, att, layout, problems, allow_uneven)
            if att.count_key == layout.experts.count_key:
                n_mlp = self.expert_counts(layout.experts)
                n_att = self.expert_counts(att)
                if n_mlp != n_att:
                    problems.append(
                        f"experts keep {_counts_text(n_mlp)} and attention_experts keep "
                        f"{_counts_text(n_att)}, but both counts live in one config key "
                        f"'{att.count_key}': keep the same number"
                    )
        _check_heads(self.heads, layout, problems)
        if problems:
            raise PlanError(problems)

    def with_dead_sub_experts(self, layout: ModelLayout) -> PrunePlan:
        """CartesianMoE: this plan with ``meta["dead_sub_experts"]`` saying, per MoE layer and
        per set, which sub-experts no kept expert uses any more (``{layer: [[ids of set 0],
        [ids of set 1], ...]}``): the rewrite frees exactly those. Other families: unchanged."""
        experts = layout.experts
        if not experts.sub_experts:
            return self
        dead = {
            str(layer): [list(ids) for ids in sub.dead(self.kept_experts(experts, layer))]
            for layer, sub in experts.sub_experts.items()
        }
        return replace(self, meta={**self.meta, "dead_sub_experts": dead})

    def with_mtp(self, layout: ModelLayout) -> PrunePlan:
        """This plan with every multi-token-prediction layer it does not name filled in.

        An MTP layer runs on the last decoder layer's output and servers build it with the
        config's one expert count, so it must keep as many experts as the decoder layers.
        transformers never runs it, so ``mfprune profile`` has no statistics for its router;
        the rule: an MTP layer keeps the same expert ids (and query heads) as the last MoE
        decoder layer. Name the MTP layer in the plan to choose otherwise.
        """
        if not layout.mtp_layers:
            return self
        sections: dict[str, Kept] = {}
        filled: list[int] = []
        for kind in filter(None, (layout.experts, layout.attention_experts)):
            kept = dict(self.experts if kind.kind == "experts" else self.attention_experts)
            last = kind.layers[-1]
            for layer in kind.mtp_layers:
                if layer not in kept and last in kept:
                    kept[layer] = kept[last]
                    filled.append(layer)
            sections[kind.kind] = kept
        heads = dict(self.heads)
        last_layer = layout.num_layers - 1
        for layer in layout.mtp_layers:
            if heads and layer not in heads and last_layer in heads:
                heads[layer] = heads[last_layer]
                filled.append(layer)
        meta = dict(self.meta)
        if filled:
            meta["mtp"] = (
                f"MTP layer(s) {sorted(set(filled))} keep the last decoder layer's experts "
                "and heads (no statistics for MTP routers)"
            )
        return PrunePlan(
            experts=sections.get("experts", self.experts),
            attention_experts=sections.get("attention_experts", self.attention_experts),
            heads=heads,
            meta=meta,
        )

    def kept_experts(self, layout: ExpertLayout, layer: int) -> tuple[int, ...]:
        kept = self.experts if layout.kind == "experts" else self.attention_experts
        return kept.get(layer, tuple(range(layout.num_experts)))

    def expert_counts(self, layout: ExpertLayout) -> dict[int, int]:
        """Experts each MoE layer keeps (all of them where the plan does not say)."""
        return {layer: len(self.kept_experts(layout, layer)) for layer in layout.layers}

    def is_uneven(self, layout: ModelLayout) -> bool:
        kinds = filter(None, (layout.experts, layout.attention_experts))
        return any(len(set(self.expert_counts(e).values())) > 1 for e in kinds)


def _parse_section(raw: Any, section: str, problems: list[str]) -> Kept:
    if not isinstance(raw, dict):
        problems.append(f"'{section}' must be an object of layer -> list of ids")
        return {}
    kept: Kept = {}
    for key, ids in raw.items():
        where = f"{section}[{key}]"
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            problems.append(f'{where}: layer keys are decoder-layer indices like "3"')
            continue
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids
        ):
            problems.append(f"{where}: expected a list of integer ids, got {ids!r}")
            continue
        dup = sorted(i for i, n in Counter(ids).items() if n > 1)
        if dup:
            problems.append(f"{where}: duplicate ids {dup}")
        kept[int(key)] = tuple(sorted(set(ids)))
    return kept


def _counts_text(counts: dict[int, int]) -> str:
    values = set(counts.values())
    return str(values.pop()) if len(values) == 1 else str(counts)


def _check_experts(
    kept: Kept,
    layout: ExpertLayout,
    model: ModelLayout,
    problems: list[str],
    allow_uneven: bool = False,
) -> None:
    kind, E, K = layout.kind, layout.num_experts, layout.top_k
    for layer, ids in sorted(kept.items()):
        where = f"{kind}[{layer}]"
        if layer not in layout.all_layers:
            what = "does not exist" if layer >= model.num_layers else "is not an MoE layer"
            problems.append(f"{where}: layer {layer} {what} (MoE layers: {_ranges(layout.layers)})")
            continue
        bad = [i for i in ids if not 0 <= i < E]
        if bad:
            problems.append(
                f"{where}: ids {_some(bad)} out of range: the layer has {E} experts (0..{E - 1})"
            )
            continue
        if len(ids) < K:
            problems.append(
                f"{where}: keeps {len(ids)} of {E} but the router picks top-{K}: keep at least {K}"
            )
        lost = sorted(layout.pinned(layer) - set(ids))
        if lost:
            problems.append(
                f"{where}: drops experts {_some(lost)} that the layer's token -> expert table "
                f"(hash routing) still sends tokens to: keep all {len(layout.pinned(layer))} "
                "experts it names"
            )
        if layout.capacity_unsupported and len(ids) < E:
            problems.append(
                f"{where}: the router's expert capacity would change with the expert count, so "
                f"the pruned model would drop other tokens: {layout.capacity_unsupported}"
            )
        if layout.n_group > 1 and layout.spec.groups_unsupported and len(ids) < E:
            problems.append(
                f"{where}: group-limited routing (n_group = {layout.n_group}) cannot lose "
                f"experts exactly in this family: {layout.spec.groups_unsupported}"
            )
        elif layout.n_group > 1:
            per_group = Counter(i // layout.group_size for i in ids)
            counts = [per_group.get(g, 0) for g in range(layout.n_group)]
            need = layout.spec.group_score_topk
            if len(set(counts)) > 1:
                problems.append(
                    f"{where}: group-limited routing (n_group = {layout.n_group}) needs the same "
                    f"number kept in every group of {layout.group_size}; kept per group: {counts}"
                )
            elif counts[0] < need:
                problems.append(
                    f"{where}: each group keeps {counts[0]} but the group score sums the top "
                    f"{need}: keep at least {need} per group ({need * layout.n_group} in all)"
                )
            elif layout.topk_group * counts[0] < K:
                problems.append(
                    f"{where}: top-{K} is picked inside {layout.topk_group} group(s) of "
                    f"{counts[0]} kept experts: keep at least "
                    f"{-(-K // layout.topk_group)} per group"
                )
    counts = {layer: len(kept.get(layer, range(E))) for layer in layout.layers}
    for layer in layout.mtp_layers:
        last = counts[layout.layers[-1]]
        if layer in kept and len(kept[layer]) != last and not allow_uneven:
            problems.append(
                f"{kind}[{layer}]: the multi-token-prediction layer keeps {len(kept[layer])} but "
                f"the decoder layers keep {last}: servers build it with the config's one "
                f"'{layout.count_key}'"
            )
    if len(set(counts.values())) > 1 and not allow_uneven:
        shown = ", ".join(f"layer {layer}: {n}" for layer, n in counts.items())
        problems.append(
            f"{kind}: kept counts differ across MoE layers ({shown}); stock transformers configs "
            f"hold one '{layout.count_key}', so every MoE layer must keep the same number "
            "(a layer absent from the plan keeps all); --allow-uneven writes per-layer counts "
            "that mfprune.load_pretrained loads"
        )
    elif len(set(counts.values())) > 1 and model.spec.stacks:
        problems.append(
            f"{kind}: kept counts differ across MoE layers, and per-layer counts are not "
            f"supported for encoder-decoder models ({model.family}): keep the same number in "
            "every MoE layer of both stacks"
        )
    elif len(set(counts.values())) > 1 and model.spec.config_path:
        problems.append(
            f"{kind}: kept counts differ across MoE layers, and per-layer counts are not "
            f"supported for composite models ({model.family}): keep the same number in every "
            "MoE layer"
        )


def _check_heads(kept: Kept, model: ModelLayout, problems: list[str]) -> None:
    if not kept:
        return
    heads = model.heads
    reason = model.spec.heads.unsupported
    if heads is None or reason or not model.spec.heads.tensors:
        why = reason or "its adapter lists no head tensors"
        problems.append(f"heads: {model.family} heads cannot be pruned: {why}")
        return
    H, G = heads.num_heads, heads.group_size
    shapes = set()
    for layer, ids in sorted(kept.items()):
        where = f"heads[{layer}]"
        if not 0 <= layer < model.num_layers + len(model.mtp_layers):
            problems.append(f"{where}: layer {layer} does not exist (0..{model.num_layers - 1})")
            continue
        if heads.no_heads_reason(layer):
            problems.append(f"{where}: {heads.no_heads_reason(layer)}")
            continue
        bad = [i for i in ids if not 0 <= i < H]
        if bad:
            problems.append(
                f"{where}: ids {_some(bad)} out of range: the layer has {H} heads (0..{H - 1})"
            )
            continue
        if not ids:
            problems.append(f"{where}: keeps no head: keep at least one")
            continue
        per_kv = Counter(i // G for i in ids)
        if len(set(per_kv.values())) > 1:
            shown = {kv: per_kv[kv] for kv in sorted(per_kv)}
            problems.append(
                f"{where}: KV groups would be unequal (query heads kept per KV head: {shown}); "
                f"with {H} heads over {heads.num_kv_heads} KV heads, keep the same number of "
                f"query heads in every KV group you keep"
            )
            continue
        shapes.add((len(ids), len(per_kv)))
    decoder = [layer for layer in heads.layers if layer < model.num_layers]  # not MTP layers
    full = {(H, heads.num_kv_heads)} if len(set(kept) & set(decoder)) < len(decoder) else set()
    if len(shapes | full) > 1 and not any(p.startswith("heads[") for p in problems):
        problems.append(
            "heads: layers would keep different head counts "
            f"{sorted(shapes | full)} (heads, KV heads); stock configs hold one "
            f"'{heads.spec.count_key}': prune every layer to the same shape"
        )


def _some(ids: list[int], shown: int = 6) -> str:
    """``[8, 9, 10, ...]`` with a count when there are many."""
    if len(ids) <= shown:
        return str(ids)
    return "[" + ", ".join(map(str, ids[:shown])) + f", … ({len(ids)} in all)]"


def _ranges(layers: tuple[int, ...]) -> str:
    if layers and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ", ".join(map(str, layers))


def head_index(heads: HeadLayout, kept_query: tuple[int, ...]) -> tuple[int, ...]:
    """The KV heads that stay when ``kept_query`` query heads stay (a KV head whose query
    heads all go, goes)."""
    return tuple(sorted({q // heads.group_size for q in kept_query}))

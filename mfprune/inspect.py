"""inspect_model: what a checkpoint holds, from its config and headers alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mfprune.arch import ArchSpec, spec_for_config
from mfprune.arch.expert_tensors import block_of
from mfprune.arch.formats import WeightFormat, detect_format
from mfprune.arch.layout import ExpertLayout, ModelLayout, resolve_layout
from mfprune.arch.mtp_prefix import mtp_view, outside_experts
from mfprune.checkpoint import Checkpoint, open_checkpoint


@dataclass(frozen=True)
class ExpertSummary:
    layers: list[int]
    experts_per_layer: int
    top_k: int
    n_group: int
    topk_group: int
    count_key: str
    routing: str  # the routing rule in words


@dataclass(frozen=True)
class ModelReport:
    path: str
    family: str
    model_type: str
    description: str  # the adapter's one line about the family
    num_layers: int
    experts: ExpertSummary
    attention_experts: ExpertSummary | None
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    head_layers: list[int]  # layers that hold attention heads (a hybrid's attention layers)
    head_pruning: str  # "supported" or why not
    params: dict[
        str, int
    ]  # routed_experts / attention_experts / shared_experts / attention / routers / other
    dtypes: dict[str, int]  # dtype -> parameter count
    bytes_on_disk: int
    shards: int
    weight_format: WeightFormat
    mtp_layers: list[int]  # multi-token-prediction layers (pruned with the decoder layers)
    expert_tensors: list[str]  # what one expert holds (first MoE layer), prefix removed
    uncovered_expert_tensors: list[str]  # look per-expert, no rule covers: a prune refuses

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_model(model: str | Path, *, spec: ArchSpec | None = None) -> ModelReport:
    ckpt = open_checkpoint(model)
    spec = spec or spec_for_config(ckpt.config)
    layout = resolve_layout(ckpt, spec)
    ckpt = mtp_view(ckpt, spec, layout.num_layers)  # the names the layout uses
    heads = layout.heads
    if spec.heads.unsupported or not spec.heads.tensors:
        head_pruning = spec.heads.unsupported or "no head tensors in the adapter"
    else:
        head_pruning = "supported"
    dtypes: dict[str, int] = {}
    for info in ckpt.tensors.values():
        dtypes[info.dtype] = dtypes.get(info.dtype, 0) + info.numel
    return ModelReport(
        path=str(ckpt.root),
        family=spec.family,
        model_type=str(ckpt.config.get("model_type")),
        description=spec.description,
        num_layers=layout.num_layers,
        experts=_summary(layout.experts),
        attention_experts=_summary(layout.attention_experts) if layout.attention_experts else None,
        heads=heads.num_heads if heads else None,
        kv_heads=heads.num_kv_heads if heads else None,
        head_dim=heads.head_dim if heads else None,
        head_layers=list(heads.layers) if heads else [],
        head_pruning=head_pruning,
        params=param_split(ckpt, layout),
        dtypes=dtypes,
        bytes_on_disk=ckpt.nbytes,
        shards=len(ckpt.shards),
        weight_format=detect_format(ckpt.config, ckpt.tensors),
        mtp_layers=list(layout.mtp_layers),
        expert_tensors=expert_tensor_names(layout.experts),
        uncovered_expert_tensors=[
            layout.real_name(info.name)
            for kind in filter(None, (layout.experts, layout.attention_experts))
            for layer in kind.all_layers
            for info in kind.tensors[layer].unknown
        ]
        + [info.name for info in outside_experts(ckpt, layout)],
    )


def expert_tensor_names(experts: ExpertLayout) -> list[str]:
    """The tensors of expert 0 in the first MoE layer (prefix removed), then the stacked ones
    (``name [axis]``): what the rewrite moves with each expert."""
    lt = experts.tensors[experts.layers[0]]
    if experts.sub_experts:  # each set's sub-expert 0, as "set s: name"
        sub = experts.sub_experts[experts.layers[0]]
        return [
            f"set {s}: " + t.info.name[len(t.prefix.format(expert=0)) :]
            for s, members in enumerate(sub.tensors)
            for t in sorted(members.get(0, ()), key=lambda t: t.info.name)
        ]
    names = sorted(t.info.name[len(t.prefix.format(expert=0)) :] for t in lt.per_expert.get(0, ()))
    block = block_of(experts.spec).replace("{layer}", str(lt.layer))
    stacked = [f"{info.name.removeprefix(block)} [axis {axis}]" for info, axis in lt.stacked]
    return names + stacked


def _summary(e: ExpertLayout) -> ExpertSummary:
    return ExpertSummary(
        layers=list(e.layers),
        experts_per_layer=e.num_experts,
        top_k=e.top_k,
        n_group=e.n_group,
        topk_group=e.topk_group,
        count_key=e.count_key,
        routing=routing_rule(e),
    )


def routing_rule(e: ExpertLayout) -> str:
    """How a token is routed over these experts, and what that means for pruning, in words."""
    spec = e.spec
    short = spec.router.rpartition(".")[0].replace("{layer}", "L")
    scored = "its layer's router" if e.stacks else short
    parts = [f"each token picks top-{e.top_k} of {e.num_experts} experts scored by {scored}"]
    if spec.selection == "biased_score" and spec.selection_bias:
        bias = spec.selection_bias.replace("{layer}", "L")
        parts.append(
            f"selection on the scores plus the bias {bias} (the weights use the unbiased "
            "scores); a pruned expert's bias entry goes with it"
        )
    if e.n_group > 1:
        top = (
            f"the sum of its top-{spec.group_score_topk} scores"
            if spec.group_score_topk > 1
            else "its best score"
        )
        parts.append(
            f"group-limited: {e.n_group} groups of {e.group_size}, a token uses its "
            f"top-{e.topk_group} groups ranked by {top}, so every group keeps the same count"
        )
        if spec.groups_unsupported:
            parts.append(f"with groups, experts cannot be pruned: {spec.groups_unsupported}")
    hashed = sorted(e.id_tables)
    if hashed:
        table = spec.id_tables[0].replace("{layer}", "L")
        parts.append(
            f"layers {hashed} pick each token's experts from a fixed token -> expert table "
            f"({table}), not by score: a plan keeps every expert it names, and its values are "
            "renumbered"
        )
    if e.extra_rows:
        parts.append(
            f"{e.extra_rows} more router rows (extra_rows = {spec.extra_rows!r}) after the "
            f"{e.num_experts} experts are no prunable experts (zero-compute or shared experts, "
            "a skip class): every plan keeps them, after the kept experts"
        )
    if e.sub_experts:
        sub = e.sub_experts[e.layers[0]]
        sizes = " x ".join(str(n) for n in sub.counts)
        parts.append(
            f"each expert is a product of one sub-expert from each of {len(sub.counts)} sets "
            f"({sizes} in layer {e.layers[0]}), so a sub-expert is freed only when no kept "
            "expert uses it"
        )
    if spec.shared:
        shared = ", ".join(p.replace("{layer}", "L") for p in spec.shared)
        parts.append(f"shared experts ({shared}) run on every token and are never pruned")
    if e.capacity_unsupported:
        parts.append(f"experts cannot be pruned: {e.capacity_unsupported}")
    elif spec.capacity_keys:
        keys = " / ".join(spec.capacity_keys)
        parts.append(
            f"an expert takes a fixed number of tokens at most ({keys}; kept as it is), so the "
            "kept experts drop the same tokens"
        )
    if e.passes.looped:
        parts.append(f"looped: {e.passes.describe()}; profiling sums every pass")
    if e.stacks:  # encoder-decoder: each stack's router and rule, and its layer numbers
        for stack in e.stacks:
            last = stack.first + stack.num_layers - 1
            router = stack.spec.router.rpartition(".")[0].replace("{layer}", "L")
            parts.append(
                f"{stack.name} layers {stack.first}..{last} ({router}, L = layer - "
                f"{stack.first}): MoE {stack.spec.layers.describe()}"
            )
        return "; ".join(parts)
    parts.append(f"MoE layers: {spec.layers.describe()}")
    return "; ".join(parts)


def param_split(ckpt: Checkpoint, layout: ModelLayout) -> dict[str, int]:
    """Parameter counts by role: routed experts, attention experts, shared experts, routers,
    attention, other."""
    role: dict[str, str] = {}
    for experts in filter(None, (layout.experts, layout.attention_experts)):
        kind = "routed_experts" if experts.kind == "experts" else "attention_experts"
        for layer in experts.layers:
            lt = experts.tensors[layer]
            role[lt.router.name] = "routers"
            router_module = lt.router.name.rsplit(".", 1)[0] + "."
            for info, _axis in lt.stacked:
                role[info.name] = "routers" if info.name.startswith(router_module) else kind
            for members in lt.per_expert.values():
                role.update((t.info.name, kind) for t in members)
            if experts.sub_experts:  # CartesianMoE: the sub-experts are the experts' weights
                for members in experts.sub_experts[layer].tensors:
                    role.update((t.info.name, kind) for ts in members.values() for t in ts)
    shared = [p.format(layer=L) for L in layout.experts.layers for p in layout.experts.spec.shared]
    split = dict.fromkeys(
        ("routed_experts", "attention_experts", "shared_experts", "routers", "attention", "other"),
        0,
    )
    for name, info in ckpt.tensors.items():
        if name in role:
            key = role[name]
        elif any(name.startswith(p) for p in shared):
            key = "shared_experts"
        elif ".self_attn." in name or ".self_attention." in name:
            key = "attention"
        else:
            key = "other"
        split[key] += info.numel
    return split

"""ModelLayout: an adapter resolved against one checkpoint — which layers are MoE, how many
experts, top-k, groups, heads — with the config checked against the tensors on disk."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mfprune.arch.expert_tensors import (
    LayerTensors,
    first_missing,
    group_by_layer,
    layer_prefix,
    rules_for,
    sort_layer,
)
from mfprune.arch.id_tables import IdTable, resolve_id_tables
from mfprune.arch.spec import ArchSpec, ExpertSpec, HeadSpec, HeadTensor, Stack
from mfprune.arch.sub_experts import SubExpertLayer, resolve_sub_experts
from mfprune.checkpoint import Checkpoint
from mfprune.errors import ArchError, ModelError


@dataclass(frozen=True)
class StackLayout:
    """One stack of an encoder-decoder model: its layers are ``first .. first + num_layers - 1``
    in mfprune's numbering, ``0 .. num_layers - 1`` in its tensor names."""

    name: str
    first: int
    num_layers: int
    spec: ExpertSpec  # the stack's templates

    def holds(self, layer: int) -> bool:
        return self.first <= layer < self.first + self.num_layers


def stack_layouts(spec: ArchSpec, cfg: dict[str, Any]) -> tuple[StackLayout, ...]:
    """The stacks of ``spec`` numbered one after another from the layer counts in ``cfg`` (the
    language model's config); () for a one-stack model."""
    stacks, first = [], 0
    for stack in spec.stacks:
        count = _layer_count(cfg, stack)
        stacks.append(StackLayout(stack.name, first, count, stack.experts))
        first += count
    return tuple(stacks)


def in_stacks(
    stacks: tuple[StackLayout, ...], layers: Any
) -> list[tuple[StackLayout, dict[int, int]]]:
    """Split mfprune layer numbers by stack: ``[(stack, {local index: layer})]``, stacks that
    hold none left out. Raises ModelError for a number in no stack."""
    wanted = sorted(set(layers))
    outside = [L for L in wanted if not any(s.holds(L) for s in stacks)]
    if outside:
        total = sum(s.num_layers for s in stacks)
        raise ModelError(
            f"layer {outside[0]} is in no stack: the model has {total} layers ("
            + ", ".join(f"{s.name} {s.first}..{s.first + s.num_layers - 1}" for s in stacks)
            + ")",
            hint="number an encoder-decoder model's layers encoder first, then decoder",
        )
    split = [(s, {L - s.first: L for L in wanted if s.holds(L)}) for s in stacks]
    return [(s, local) for s, local in split if local]


def _layer_count(cfg: dict[str, Any], stack: Stack) -> int:
    value = cfg.get(stack.num_layers_key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelError(
            f"config.json has no valid '{stack.num_layers_key}' (the {stack.name}'s layer "
            f"count; got {value!r})",
            hint="the config does not match the adapter; check config.json",
        )
    return value


@dataclass(frozen=True)
class LayerPasses:
    """How many times each decoder layer runs per token: once, except the looped layers
    ``first .. end - 1`` (the adapter's ``[loop]``), which run ``passes`` times, every pass
    through the same weights. ``keys``: the config keys that said so (start, end, passes)."""

    first: int = 0
    end: int = 0
    passes: int = 1
    keys: tuple[str, ...] = ()

    def of(self, layer: int) -> int:
        """How many times ``layer`` runs per token."""
        return self.passes if self.first <= layer < self.end else 1

    @property
    def looped(self) -> tuple[int, ...]:
        """The layers that run more than once per token."""
        return tuple(range(self.first, self.end)) if self.passes > 1 else ()

    def describe(self) -> str:
        """The looped layers in words ('' when every layer runs once)."""
        if not self.looped:
            return ""
        start, end, passes = self.keys
        return (
            f"layers {self.first}..{self.end - 1} ({start}..{end} - 1) run {self.passes} times "
            f"per token ({passes}), so their routers see every token {self.passes} times"
        )


@dataclass(frozen=True)
class ExpertLayout:
    """Routed experts of one kind (``kind`` is 'experts' or 'attention_experts')."""

    kind: str
    spec: ExpertSpec
    layers: tuple[int, ...]  # decoder layers that route over these experts
    num_experts: int  # E
    top_k: int  # K
    count_key: str  # the config key that holds E
    n_group: int = 1  # group-limited routing (DeepSeek-V3): E splits into n_group equal groups
    topk_group: int = 1
    # multi-token-prediction layers with these experts (indices >= num_layers; transformers
    # does not build them, servers do): pruned with the same count
    mtp_layers: tuple[int, ...] = ()
    # each MoE layer's expert tensors sorted by rule (mfprune.arch.expert_tensors)
    tensors: Mapping[int, LayerTensors] = field(default_factory=dict, compare=False, repr=False)
    # router rows (and rows of stacked tensors in ``extended``) after the E routed experts:
    # LongCat's zero-compute experts, kept by every plan
    extra_rows: int = 0
    extended: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    # DeepSeek-V4 hash layers: their token -> expert tables (mfprune.arch.id_tables)
    id_tables: Mapping[int, tuple[IdTable, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )
    # CartesianMoE: each MoE layer's product structure (mfprune.arch.sub_experts)
    sub_experts: Mapping[int, SubExpertLayer] | None = field(
        default=None, compare=False, repr=False
    )
    # encoder-decoder models: the stacks the layers belong to (``layers`` counts across them)
    stacks: tuple[StackLayout, ...] = ()
    # why this config's expert capacity follows the expert count ('' when it does not): a plan
    # that prunes experts is refused with it
    capacity_unsupported: str = ""
    # how many times each layer runs per token (looped layers: more than once)
    passes: LayerPasses = LayerPasses()

    @property
    def all_layers(self) -> tuple[int, ...]:
        """Decoder MoE layers, then MTP MoE layers."""
        return self.layers + self.mtp_layers

    @property
    def group_size(self) -> int:
        return self.num_experts // self.n_group

    def pinned(self, layer: int) -> frozenset[int]:
        """Experts ``layer`` must keep: those its id tables route tokens to (hash layers)."""
        return frozenset().union(*(t.named for t in self.id_tables.get(layer, ())))


@dataclass(frozen=True)
class HeadLayout:
    spec: HeadSpec
    num_heads: int  # H (query heads)
    num_kv_heads: int  # KV
    head_dim: int
    config: dict[str, Any]
    layers: tuple[int, ...] = ()  # decoder layers holding the head tensors (hybrids: not all)

    def no_heads_reason(self, layer: int) -> str:
        """Why ``layer`` has no prunable heads ('' when it has): linear-attention, Mamba..."""
        if layer in self.layers:
            return ""
        types = self.config.get("layer_types")
        kind = (
            f" (a '{types[layer]}' layer)" if isinstance(types, list) and layer < len(types) else ""
        )
        return (
            f"layer {layer} has no attention heads{kind}; heads live in layers {list(self.layers)}"
        )

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def width(self, t: HeadTensor) -> int:
        """Elements per head of ``t`` along its head axis."""
        if t.width == "head_dim":
            return self.head_dim
        if isinstance(t.width, int):
            return t.width
        keys = (t.width,) if isinstance(t.width, str) else t.width
        missing = [k for k in keys if not isinstance(self.config.get(k), int)]
        if missing:
            raise ArchError(
                f"head tensor {t.name} takes its width from config keys {missing} that are missing",
                hint="fix the adapter's heads.tensors width",
            )
        return sum(self.config[k] for k in keys)


@dataclass(frozen=True)
class ModelLayout:
    spec: ArchSpec
    num_layers: int  # L
    experts: ExpertLayout
    attention_experts: ExpertLayout | None
    heads: HeadLayout | None  # None when the config does not say how many heads
    mtp_layers: tuple[int, ...] = ()  # multi-token-prediction layers: num_layers, num_layers+1..
    passes: LayerPasses = LayerPasses()  # how many times each layer runs per token

    @property
    def family(self) -> str:
        return self.spec.family

    def real_name(self, name: str) -> str:
        """``name`` as stored: mfprune numbers MTP layers kept under their own prefix
        (``spec.mtp_prefix``) after the decoder layers (``mfprune.arch.mtp_prefix``)."""
        from mfprune.arch.mtp_prefix import real_name

        return real_name(self.spec, self.num_layers, name)

    def require_single_pass(self, what: str, *, hint: str) -> None:
        """Refuse ``what`` for a model whose looped layers run several times per token: a step
        that runs (or refits) each decoder layer once, in order (profiling layer by layer,
        repair)."""
        if self.passes.looped:
            raise ModelError(
                f"{what} is not supported for models with looped layers ({self.family}: "
                f"{self.passes.describe()}, each pass after the first fed by the one before); "
                "it runs each decoder layer once, in order",
                hint=hint,
            )

    def require_one_stack(self, what: str) -> None:
        """Refuse ``what`` for an encoder-decoder model: a step that knows one decoder stack of
        a causal LM (profiling layer by layer, repair, bench)."""
        if self.experts.stacks:
            stacks = " and ".join(s.name for s in self.experts.stacks)
            raise ModelError(
                f"{what} is not supported for encoder-decoder models ({self.family}: MoE layers "
                f"in the {stacks}); it runs one decoder stack of a causal LM",
                hint="profile it whole (without --sequential) and prune from the stats, or with "
                "a plan: mfprune prune MODEL --plan FILE --verify (layers numbered encoder first, "
                "then decoder: docs/plan-format.md)",
            )


def lm_config_path(config: dict[str, Any], spec: ArchSpec) -> str | None:
    """Where ``config.json`` keeps the language model's keys: ``spec.config_path``, or the
    first of its ``config_path_aliases`` that the config holds (a table) when it lacks it; the
    alias ``""`` is the config's top level (dots.note 3's released configs)."""
    for path in (spec.config_path, *spec.config_path_aliases) if spec.config_path else ():
        if not path:
            return path
        cfg: Any = config
        for part in path.split("."):
            cfg = cfg.get(part) if isinstance(cfg, dict) else None
        if isinstance(cfg, dict):
            return path
    return spec.config_path


def lm_config(config: dict[str, Any], spec: ArchSpec) -> dict[str, Any]:
    """The part of ``config.json`` that holds the language model's keys: the whole config, or
    for a composite model (vision + text) the sub-config at ``spec.config_path``
    (``text_config``; dotted for deeper ones; else an alias, ``lm_config_path``). The dict
    returned is ``config``'s own, so a caller that patches it patches ``config``."""
    cfg = config
    path = lm_config_path(config, spec)
    for part in path.split(".") if path else ():
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
        if not isinstance(cfg, dict):
            raise ModelError(
                f"config.json has no '{spec.config_path}' table"
                + "".join(f" (nor '{alias}')" for alias in spec.config_path_aliases)
                + f" ({spec.family} keeps its "
                "language model's settings there)",
                hint="the config does not match the adapter; check config.json",
            )
    return cfg


def resolve_layout(ckpt: Checkpoint, spec: ArchSpec) -> ModelLayout:
    """Check the adapter against the config and the tensors; raise ModelError on a mismatch."""
    cfg = lm_config(ckpt.config, spec)
    if spec.stacks:
        return _resolve_stacks(ckpt, cfg, spec)
    path = lm_config_path(ckpt.config, spec)
    where = f"{path}." if path else ""
    num_layers = cfg.get(spec.num_layers_key)
    types = spec.experts.layers.layer_types(cfg)
    if num_layers is None and isinstance(types, list):  # Nemotron-H: the list is the count
        num_layers = len(types)
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= 0:
        raise ModelError(
            f"config.json has no valid '{where}{spec.num_layers_key}' (got {num_layers!r})",
            hint="the adapter's num_layers_key must name the decoder-layer count",
        )
    if num_layers > len(ckpt.tensors):  # every layer has tensors: a huge count is a broken config
        raise ModelError(
            f"config.json says {spec.num_layers_key} = {num_layers:,} but the checkpoint holds "
            f"only {len(ckpt.tensors):,} tensors",
            hint="the config does not match the weights; fix config.json",
        )
    from mfprune.arch.consistency import check_config_against_weights, check_layer_count
    from mfprune.arch.mtp_prefix import mtp_view

    ckpt = mtp_view(ckpt, spec, num_layers)  # MTP layers under their own prefix: N, N + 1..
    check_layer_count(ckpt, spec, num_layers)
    n_mtp = max(0, _int_key(cfg, spec.mtp_layers_key, 0))
    # MTP layers as stored: save_pretrained writes the config key but never the layer
    present = group_by_layer(ckpt.tensors.values(), layer_prefix(spec.experts)) if n_mtp else {}
    mtp = tuple(L for L in range(num_layers, num_layers + n_mtp) if L in present)
    others = (spec.attention_experts,) if spec.attention_experts else ()
    passes = resolve_passes(cfg, spec, num_layers, where=where)
    experts = _resolve_experts(
        ckpt,
        cfg,
        spec.experts,
        "experts",
        num_layers,
        mtp=mtp,
        others=others,
        passes=passes,
    )
    attention = (
        _resolve_experts(
            ckpt,
            cfg,
            spec.attention_experts,
            "attention_experts",
            num_layers,
            mtp=mtp,
            others=(spec.experts,),
            passes=passes,
        )
        if spec.attention_experts
        else None
    )
    layout = ModelLayout(
        spec=spec,
        num_layers=num_layers,
        experts=experts,
        attention_experts=attention,
        heads=_resolve_heads(cfg, spec.heads, ckpt, (*range(num_layers), *mtp)),
        mtp_layers=mtp,
        passes=passes,
    )
    check_config_against_weights(ckpt, layout)
    return layout


def _resolve_stacks(ckpt: Checkpoint, cfg: dict[str, Any], spec: ArchSpec) -> ModelLayout:
    """An encoder-decoder model: each stack resolved as a one-stack model would be, then its
    MoE layers renumbered after the previous stacks' (``stack_layouts``)."""
    import dataclasses

    from mfprune.arch.consistency import check_layer_count

    stacks = stack_layouts(spec, cfg)
    parts = []
    for stack, layout in zip(spec.stacks, stacks, strict=True):
        one = dataclasses.replace(
            spec, experts=stack.experts, num_layers_key=stack.num_layers_key, stacks=()
        )
        check_layer_count(ckpt, one, layout.num_layers)
        parts.append(_resolve_experts(ckpt, cfg, stack.experts, "experts", layout.num_layers))
    counts = {(p.num_experts, p.top_k) for p in parts}
    if len(counts) > 1:  # one config key: cannot happen unless the adapter's stacks differ
        raise ArchError(
            f"the stacks of {spec.family} route over different expert counts / top-k {counts}",
            hint="every stack must read the same count_keys and top-k",
        )
    first = parts[0]
    experts = dataclasses.replace(
        first,
        layers=tuple(s.first + L for s, p in zip(stacks, parts, strict=True) for L in p.layers),
        tensors={
            s.first + L: dataclasses.replace(lt, layer=s.first + L)
            for s, p in zip(stacks, parts, strict=True)
            for L, lt in p.tensors.items()
        },
        stacks=stacks,
    )
    layout = ModelLayout(
        spec=spec,
        num_layers=sum(s.num_layers for s in stacks),
        experts=experts,
        attention_experts=None,
        heads=None,  # the adapter says why (heads.unsupported)
    )
    from mfprune.arch.consistency import check_config_against_weights

    check_config_against_weights(ckpt, layout)
    return layout


def capacity_reason(cfg: dict[str, Any], spec: ExpertSpec) -> str:
    """Why ``cfg``'s expert capacity follows the expert count ('' when one of the adapter's
    ``capacity_keys`` holds a positive number, which fixes it)."""
    if not spec.capacity_keys:
        return ""
    for key in spec.capacity_keys:
        value = config_value(cfg, key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return ""
    shown = ", ".join(f"{k} = {config_value(cfg, k)!r}" for k in spec.capacity_keys)
    reason = spec.capacity_unsupported or "the expert capacity depends on the expert count"
    return f"{reason} ({shown})"


def config_value(cfg: dict[str, Any], key: str | None) -> Any:
    """``cfg[key]``, or None when absent; a dotted key reads a sub-config (DBRX keeps its
    expert count at ``ffn_config.moe_num_experts``)."""
    value: Any = cfg
    for part in key.split(".") if key else [None]:
        value = value.get(part) if isinstance(value, dict) and part is not None else None
    return value


def set_config_value(cfg: dict[str, Any], key: str, value: Any) -> bool:
    """Set ``cfg[key]`` (dotted: in its sub-config) where it is present; False if absent."""
    *parents, last = key.split(".")
    table = config_value(cfg, ".".join(parents)) if parents else cfg
    if not isinstance(table, dict) or last not in table:
        return False
    table[last] = value
    return True


def _int_key(cfg: dict[str, Any], key: str | None, default: int) -> int:
    value = config_value(cfg, key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def resolve_passes(
    cfg: dict[str, Any], spec: ArchSpec, num_layers: int, *, where: str = ""
) -> LayerPasses:
    """The adapter's ``[loop]`` rule applied to ``cfg`` (the language model's config): every
    layer once without one; a config that lacks the keys, or whose loop lies outside the
    layers, is refused (transformers would fall back to its class defaults)."""
    loop = spec.loop
    if loop is None:
        return LayerPasses()
    found: list[tuple[str, int]] = []
    rules = (
        ("first looped layer", loop.start_keys),
        ("end of the looped layers", loop.end_keys),
        ("passes through them", loop.passes_keys),
    )
    for what, keys in rules:
        key = next((k for k in keys if config_value(cfg, k) is not None), None)
        value = config_value(cfg, key)
        if key is None or not isinstance(value, int) or isinstance(value, bool):
            shown = " or ".join(f"'{where}{k}'" for k in keys)
            got = f" (got {value!r})" if key is not None else ""
            raise ModelError(
                f"config.json has no valid {shown}{got}: the {what} of {spec.family}'s looped "
                "layers",
                hint="the config does not match the adapter's [loop] rule; write the key into "
                "config.json (transformers would use its class default)",
            )
        found.append((key, value))
    (start_key, first), (end_key, end), (passes_key, passes) = found
    if not 0 <= first <= end <= num_layers or passes < 1:
        raise ModelError(
            f"config.json loops layers {where}{start_key} = {first} to {where}{end_key} = "
            f"{end} (exclusive) {where}{passes_key} = {passes} times, but the model has "
            f"{num_layers} layers",
            hint="the loop must lie within the layers and run at least once; fix config.json",
        )
    return LayerPasses(first=first, end=end, passes=passes, keys=(start_key, end_key, passes_key))


def _moe_by_config(cfg: dict[str, Any], spec: ExpertSpec, layer: int, num_layers: int) -> bool:
    """The adapter's MoE-layer rule (``MoeLayers``) applied to ``config.json``."""
    rules = spec.layers
    types = rules.layer_types(cfg)
    if types is not None and len(types) == num_layers:
        return types[layer] in rules.moe_layer_types
    listed = cfg.get(rules.moe_layers_key) if rules.moe_layers_key else None
    if isinstance(listed, list):
        return layer in listed
    if layer < _int_key(cfg, rules.first_dense_key, 0):
        return False
    if rules.last_moe_key and layer > _int_key(cfg, rules.last_moe_key, layer):
        return False
    dense = cfg.get(rules.dense_layers_key) if rules.dense_layers_key else None
    if isinstance(dense, list) and layer in dense:
        return False
    step = max(1, _int_key(cfg, rules.sparse_step_key, 1))
    fixed = rules.sparse_offset % step if rules.sparse_offset is not None else step - 1
    return layer % step == _int_key(cfg, rules.sparse_offset_key, fixed)


def _resolve_experts(
    ckpt: Checkpoint,
    cfg: dict[str, Any],
    spec: ExpertSpec,
    kind: str,
    num_layers: int,
    *,
    mtp: tuple[int, ...] = (),
    others: tuple[ExpertSpec, ...] = (),
    passes: LayerPasses = LayerPasses(),
) -> ExpertLayout:
    tensors = ckpt.tensors
    count_key = next((k for k in spec.count_keys if _int_key(cfg, k, -1) >= 0), None)
    if count_key is None:
        raise ModelError(
            f"config.json has none of {list(spec.count_keys)} ({kind} count)",
            hint="is this a Mixture-of-Experts checkpoint? mfprune only prunes MoE models",
        )
    num_experts = _int_key(cfg, count_key, 0)
    top_k = spec.top_k or _int_key(cfg, spec.top_k_key, 0)
    with_router = [L for L in range(num_layers) if spec.router.format(layer=L) in tensors]
    if not with_router:
        raise ModelError(
            f"no MoE layer found: no tensor named like '{spec.router.format(layer=0)}'",
            hint="a dense model has no experts to prune; for another layout pass --arch FILE",
        )
    by_config = [L for L in range(num_layers) if _moe_by_config(cfg, spec, L, num_layers)]
    if by_config != with_router:
        raise ModelError(
            f"config.json makes layers {by_config} MoE but router tensors exist for {with_router}",
            hint=f"the config does not match the weights; the adapter's rule: MoE in "
            f"{spec.layers.describe()}",
        )
    if top_k <= 0 or top_k > num_experts:
        raise ModelError(
            f"config.json '{spec.top_k_key}' = {config_value(cfg, spec.top_k_key)!r} is not a "
            "valid top-k",
            hint=f"top-k must be between 1 and {count_key} = {num_experts}; fix config.json",
        )
    by_layer = group_by_layer(tensors.values(), layer_prefix(spec))
    beyond = sorted(
        L for L in by_layer if num_layers <= L and spec.router.format(layer=L) in tensors
    )
    if [L for L in beyond if L not in mtp]:
        what = f"{len(mtp)} multi-token-prediction layer(s)" if mtp else "no MTP layers"
        raise ModelError(
            f"layer {beyond[0]} has a router ({spec.router.format(layer=beyond[0])}) but "
            f"config.json says {num_layers} decoder layers and {what}",
            hint="an MTP / extra layer that the adapter does not describe would keep its "
            "experts while the config's count changes; fix config.json or the adapter's "
            "mtp_layers_key",
        )
    rule = spec.extra_rows
    extra = max(0, rule if isinstance(rule, int) else _int_key(cfg, rule, 0))
    extended: set[str] = set()  # tensors with E + extra entries along their expert axis
    for L in [*with_router, *beyond]:  # decoder MoE layers, then MTP layers
        rows = tensors[spec.router.format(layer=L)].shape[0]
        if rows != num_experts + extra:
            more = f" + {extra} more rows ({spec.extra_rows})" if spec.extra_rows else ""
            raise ModelError(
                f"config.json says {count_key} = {num_experts}{more} but layer {L}'s router "
                f"has {rows} rows",
                hint="the config does not match the weights; fix config.json",
            )
        extended.add(spec.router.format(layer=L))
        for st in spec.stacked:
            info = tensors.get(st.name.format(layer=L))
            if info is None and not st.optional:
                raise ModelError(
                    f"expert tensor {st.name.format(layer=L)} is missing",
                    hint="the config does not match the weights",
                )
            rows = st.rows if isinstance(st.rows, int) else _int_key(cfg, st.rows, 0)
            if rows <= 0:
                raise ModelError(
                    f"config.json has no valid '{st.rows}' (rows per expert of {st.name})",
                    hint="the config does not match the adapter",
                )
            if (
                info is not None
                and extra
                and len(info.shape) > st.axis
                and info.shape[st.axis] == (num_experts + extra) * rows
            ):
                extended.add(info.name)
                continue
            if info is not None and (
                len(info.shape) <= st.axis or info.shape[st.axis] != num_experts * rows
            ):
                per = f" x {rows} rows" if rows > 1 else ""
                raise ModelError(
                    f"{info.name} has shape {list(info.shape)}, not {num_experts} experts{per} "
                    f"along axis {st.axis}",
                    hint="the config does not match the weights",
                )
    n_group = max(1, _int_key(cfg, spec.groups_key, 1))
    if num_experts % n_group:
        raise ModelError(
            f"{num_experts} experts do not split into n_group = {n_group} groups",
            hint=f"n_group must divide {count_key}; fix config.json",
        )
    sorted_layers = {}
    for L in [*with_router, *beyond]:
        rules = rules_for(spec, L, others=others)
        sorted_layers[L] = sort_layer(by_layer[L], rules, layer=L, num_experts=num_experts)
        if L in beyond and _fused(sorted_layers[L], spec):
            continue  # an MTP layer saved with fused experts: sliced by the stacked rule
        _check_per_expert(
            sorted_layers[L], spec, num_experts=num_experts, count_key=count_key, extra=extra
        )
    sub_experts = (
        {
            L: resolve_sub_experts(
                cfg, spec.sub_experts, layer=L, num_experts=num_experts, tensors=by_layer[L]
            )
            for L in [*with_router, *beyond]
        }
        if spec.sub_experts
        else None
    )
    id_tables = {
        L: found
        for L in [*with_router, *beyond]
        if (found := resolve_id_tables(spec.id_tables, tensors, layer=L, num_experts=num_experts))
    }
    return ExpertLayout(
        kind=kind,
        spec=spec,
        layers=tuple(with_router),
        num_experts=num_experts,
        top_k=top_k,
        count_key=count_key,
        n_group=n_group,
        topk_group=max(1, _int_key(cfg, spec.topk_groups_key, n_group)),
        mtp_layers=tuple(beyond),
        tensors=sorted_layers,
        extra_rows=extra,
        extended=frozenset(extended) if extra else frozenset(),
        id_tables=id_tables,
        sub_experts=sub_experts,
        capacity_unsupported=capacity_reason(cfg, spec),
        passes=passes,
    )


def _fused(lt: LayerTensors, spec: ExpertSpec) -> bool:
    """Whether ``lt`` holds its experts fused (tensors of an expert module with a leading axis
    of E, ``mlp.experts.gate_up_proj``) and none one by one, where the adapter names them one
    by one: released MTP layers differ from their decoder layers (a Qwen4-Exp checkpoint
    saves ``mtp.layers.0.mlp.experts.gate_up_proj`` beside per-expert decoder layers)."""
    listed = {st.name.format(layer=lt.layer) for st in spec.stacked}
    return (
        bool(spec.per_expert)
        and not lt.per_expert
        and any(info.name not in listed for info, _axis in lt.stacked)
    )


def _check_per_expert(
    lt: LayerTensors, spec: ExpertSpec, *, num_experts: int, count_key: str, extra: int = 0
) -> None:
    """Every expert 0..E-1 has the adapter's tensors (plain, or a quantized form under the
    same module) and no expert numbered E or above exists. Experts may differ otherwise (a
    quantization config can leave some experts unquantized)."""
    if not spec.per_expert:
        return
    # ids E .. E + extra - 1 name the extra router rows (LongCat's zero experts: whatever
    # transformers saves for them is kept, renumbered after the kept experts)
    beyond = [e for e in lt.per_expert if e >= num_experts + extra]
    if beyond:
        first = lt.per_expert[beyond[0]][0].info.name
        raise ModelError(
            f"config.json says {count_key} = {num_experts} but {first} exists",
            hint="the config does not match the weights; fix config.json",
        )
    for e in range(num_experts):
        name = first_missing(lt.per_expert.get(e, ()), spec.per_expert, layer=lt.layer, expert=e)
        if name is not None:
            raise ModelError(
                f"expert tensor {name} is missing ({count_key} = {num_experts})",
                hint="the config does not match the weights",
            )


def _resolve_heads(
    cfg: dict[str, Any], spec: HeadSpec, ckpt: Checkpoint, layer_ids: tuple[int, ...]
) -> HeadLayout | None:
    heads = _int_key(cfg, spec.count_key, 0)
    if heads <= 0:
        return None
    kv = _int_key(cfg, spec.kv_count_key, heads)
    head_dim = _int_key(cfg, spec.head_dim_key, 0) or _int_key(cfg, "hidden_size", 0) // heads
    # hybrid models (Mamba, linear attention) have heads in some layers only: those holding
    # every required head tensor, plain or in a quantized form under the same module
    modules = {name.rsplit(".", 1)[0] for name in ckpt.tensors}
    required = [t.name.rsplit(".", 1)[0] for t in spec.tensors if not t.optional]
    layers = tuple(L for L in layer_ids if all(m.format(layer=L) in modules for m in required))
    return HeadLayout(
        spec=spec, num_heads=heads, num_kv_heads=kv, head_dim=head_dim, config=cfg, layers=layers
    )

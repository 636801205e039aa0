"""ArchSpec: where a model family keeps its experts, routers and attention heads.

An adapter is a TOML file (``mfprune/arch/families/*.toml``, or the user's own passed with
``--arch FILE``). Names are on-disk safetensors names with two placeholders: ``{layer}`` (the
decoder-layer index) and ``{expert}`` (the expert index, for per-expert tensors). Parsing is
closed: unknown keys are errors, and every problem is reported at once.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mfprune.errors import ArchError, did_you_mean

HeadAxisOwner = Literal["query", "kv"]


@dataclass(frozen=True)
class StackedTensor:
    """A tensor that holds one slice per expert (or head) along ``axis``: ``rows`` entries
    each (an integer, or the config key holding it: DBRX concatenates its experts as
    ``[E * ffn_hidden_size, D]``)."""

    name: str
    axis: int = 0
    optional: bool = False
    rows: int | str = 1


@dataclass(frozen=True)
class MoeLayers:
    """Which decoder layers are MoE, from config keys (each optional).

    When ``config[key]`` for the first of ``layer_types_keys`` the config has is a list (or a
    string, one character per layer: Nemotron-H's ``hybrid_override_pattern``) with one entry
    per layer (``mlp_layer_types: ["dense", "sparse", ...]``), layer L is MoE exactly when its
    entry is one of ``moe_layer_types``; without ``num_layers_key`` in the config, that list's
    length is the layer count (Nemotron-H's ``layers_block_type``); when
    ``config[moe_layers_key]`` is a list of layer indices (Llama 4's ``moe_layers: [1, 3, ...]``),
    exactly the layers it lists are MoE. Otherwise a layer L is MoE
    unless ``L < config[first_dense_key]``, or ``L > config[last_moe_key]``, or
    ``L in config[dense_layers_key]``, or ``L % config[sparse_step_key] !=
    config[sparse_offset_key]`` (offset default: ``sparse_offset`` modulo the step where the
    adapter fixes one — Switch Transformers' ``i % step == 1 or step == 1`` is ``sparse_offset =
    1`` —, else step - 1, Qwen-MoE's "every step-th layer") — the rules of DeepSeek, Qwen-MoE and
    Jamba.
    """

    first_dense_key: str | None = None
    last_moe_key: str | None = None  # layers above config[last_moe_key] are dense (ERNIE)
    sparse_step_key: str | None = None
    sparse_offset_key: str | None = None
    dense_layers_key: str | None = None
    layer_types_keys: tuple[str, ...] = ()  # the first present decides
    moe_layer_types: tuple[str, ...] = ("sparse",)
    moe_layers_key: str | None = None  # a list of the MoE layers' indices (Llama 4)
    sparse_offset: int | None = None  # a fixed offset (taken modulo the step): Switch's 1

    def layer_types(self, cfg: dict[str, Any]) -> list[str] | str | None:
        """The per-layer type list (or pattern string) of ``cfg``: the value of the first of
        ``layer_types_keys`` that it holds as a list or a string; None without one."""
        for key in self.layer_types_keys:
            value = cfg.get(key)
            if isinstance(value, list | str):
                return value
        return None

    def describe(self) -> str:
        """The rule in words, with the config keys it reads."""
        parts = []
        if self.moe_layers_key:
            parts.append(f"the layers listed in {self.moe_layers_key} (when the config has it)")
        if self.first_dense_key:
            parts.append(f"layers from {self.first_dense_key} on")
        if self.last_moe_key:
            parts.append(f"up to {self.last_moe_key}")
        if self.sparse_step_key:
            fixed = (
                f"{self.sparse_offset} modulo the step" if self.sparse_offset is not None else ""
            )
            offset = self.sparse_offset_key or fixed or f"{self.sparse_step_key} - 1"
            parts.append(f"every {self.sparse_step_key}-th layer (starting at {offset})")
        if self.dense_layers_key:
            parts.append(f"except those listed in {self.dense_layers_key}")
        rule = ", ".join(parts) if parts else "every layer"
        if not self.layer_types_keys:
            return rule
        kinds = " or ".join(f"'{t}'" for t in self.moe_layer_types)
        keys = " (or ".join(self.layer_types_keys) + ")" * (len(self.layer_types_keys) - 1)
        listed = f"layers whose {keys} entry is {kinds}"
        return f"{listed} (without that list: {rule})" if parts else listed


@dataclass(frozen=True)
class SubExpertSpec:
    """Routed experts built from shared sub-experts (CartesianMoE, seeds/002).

    There are S sets of sub-experts; routed expert e of layer L is the product of one
    sub-expert from each set, ``table[L][e] = [i_1, ..., i_S]``, so one sub-expert serves many
    routed experts and lives as long as one kept expert uses it. ``sets[s]`` lists set s's
    tensor templates, ``{expert}`` standing for the sub-expert index; the router has one row per
    routed expert, as usual.

    Config keys: ``counts_key`` holds ``[n_1, ..., n_S]`` (every layer alike, full grid:
    E = n_1 * ... * n_S and expert e is the row-major product index); once pruned, mfprune
    writes ``table_key`` (``{layer: [[i_1, ..., i_S] per expert]}``) and ``layer_counts_key``
    (``{layer: [n_1, ..., n_S]}``), which take precedence.
    """

    sets: tuple[tuple[str, ...], ...]
    counts_key: str
    table_key: str
    layer_counts_key: str


@dataclass(frozen=True)
class ExpertSpec:
    """Routed experts of one kind (the MLP experts, or JetMoE's attention experts)."""

    count_keys: tuple[
        str, ...
    ]  # config keys holding the expert count; every one present is patched
    top_k_key: str
    router: str  # router weight [E, D]: rows are experts; its presence marks an MoE layer
    stacked: tuple[StackedTensor, ...] = ()  # fused expert tensors, router biases, score biases
    per_expert: tuple[str, ...] = ()  # legacy per-expert names with {expert}
    shared: tuple[str, ...] = ()  # name prefixes of shared experts (never pruned)
    # tensors under the router module that every expert shares (Inkling's gate.global_scale
    # [1], a scale on all routing weights): copied unchanged; one with a leading axis of E
    # looks per-expert and is refused like any uncovered tensor
    carried: tuple[str, ...] = ()
    layers: MoeLayers = MoeLayers()
    groups_key: str | None = None  # DeepSeek-V3 n_group: group-limited routing
    topk_groups_key: str | None = None
    group_score_topk: int = 1  # experts per group summed into the group score (V3: 2)
    # why a model of this family that routes with groups (n_group > 1) cannot lose experts
    # exactly; a plan that prunes experts there is refused with it
    groups_unsupported: str | None = None
    selection: Literal["logits", "biased_score"] = "logits"  # where a mask must go to drop one
    selection_bias: str | None = None  # the bias added to scores before selection (V3)
    sub_experts: SubExpertSpec | None = None  # CartesianMoE: experts are products of these
    # router rows after the E routed experts that are not prunable experts (LongCat's
    # zero-compute identity experts, Zaya's skip class): a count or the config key holding
    # it; always kept, in order, after the kept experts
    extra_rows: int | str = 0
    # tensors whose VALUES are expert ids (DeepSeek-V4 hash layers' token -> expert table
    # tid2eid [V, K]): remapped to the kept experts' new numbers; a plan keeps every expert
    # they name. Layers without them are routed as usual.
    id_tables: tuple[str, ...] = ()
    top_k: int | None = None  # a fixed top-k where no config key holds it (Switch: 1, NLLB: 2)
    # routers with an expert capacity (tokens past it are dropped): the config keys any one of
    # which, holding a positive number, fixes the capacity whatever the expert count; with none
    # of them set the capacity follows E, so the pruned model drops other tokens than the
    # masked original and a plan that prunes experts is refused with ``capacity_unsupported``
    capacity_keys: tuple[str, ...] = ()
    capacity_unsupported: str | None = None


@dataclass(frozen=True)
class Stack:
    """One layer stack of an encoder-decoder model (``[[stacks]]``: the encoder, the decoder).

    Its layers are numbered after the previous stacks' (encoder 0..Le-1, decoder Le..), so a
    plan, stats and scores name each MoE layer by one integer; ``{layer}`` in its templates is
    the index inside the stack. ``experts`` is the adapter's ``[experts]`` table (the routing
    facts both stacks share: counts, top-k, capacity) with this stack's templates and MoE-layer
    rule laid over it."""

    name: str
    num_layers_key: str
    experts: ExpertSpec


@dataclass(frozen=True)
class HeadTensor:
    """An attention tensor with one slice per head along ``axis``.

    ``width`` is the slice size per head: ``"head_dim"`` (the model's head size), an integer,
    or config keys whose values add up (DeepSeek MLA: ``["qk_nope_head_dim", "v_head_dim"]``).
    """

    name: str
    axis: int
    owner: HeadAxisOwner
    width: str | int | tuple[str, ...] = "head_dim"
    optional: bool = False


@dataclass(frozen=True)
class HeadSpec:
    count_key: str = "num_attention_heads"
    kv_count_key: str | None = "num_key_value_heads"
    head_dim_key: str | None = "head_dim"
    pin_head_dim: bool = True  # write head_dim into config when it was derived from hidden/heads
    tensors: tuple[HeadTensor, ...] = ()
    unsupported: str | None = None  # why heads cannot be pruned exactly in this family
    # a per-layer list of query-head counts that the model reads too (Laguna's
    # num_attention_heads_per_layer): every entry becomes the kept count
    per_layer_count_key: str | None = None


@dataclass(frozen=True)
class LoopSpec:
    """Looped layers (Inkling 2 Loop): decoder layers ``config[start] .. config[end] - 1`` run
    ``config[passes]`` times per token, every pass through the same weights (and routers), so
    their routers see each token that many times. Each field lists config keys (dotted: in a
    sub-config), the first the config holds decides (Inkling 2 Loop's ``loop_config.core_start``
    overrides ``loop_layer_index_start``, as transformers reads them); a config that holds none
    of them is refused, not taken as unlooped."""

    start_keys: tuple[str, ...]
    end_keys: tuple[str, ...]
    passes_keys: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]
    experts: ExpertSpec
    heads: HeadSpec = field(default_factory=HeadSpec)
    attention_experts: ExpertSpec | None = None  # JetMoE / ModuleFormer mixture of attention
    num_layers_key: str = "num_hidden_layers"
    config_path: str | None = None  # composite models: the LM's keys sit under config[path]
    # older names of that table, read when config_path is absent (Nemotron-H-Omni's released
    # configs say llm_config where transformers writes text_config)
    config_path_aliases: tuple[str, ...] = ()
    # multi-token-prediction layers (DeepSeek-V3 num_nextn_predict_layers): whole decoder
    # layers stored after the last one, at indices num_layers.., that transformers ignores
    mtp_layers_key: str | None = None
    # MTP layers stored under their own prefix (Qwen3-Next, Qwen3.5: ``mtp.layers.{layer}.``,
    # Inkling: ``model.mtp.layers.{layer}.transformer_block.``; {layer} from 0) in place of the
    # decoder-layer prefix; the MTP head's other tensors sit under its module (the prefix up to
    # its list of layers: ``mtp.``). None: DeepSeek-style
    mtp_prefix: str | None = None
    # name prefixes of parts carried over byte for byte that have experts or attention of their
    # own (a vision tower's MoE or heads from vision_config, a talker): never pruned, and exempt
    # from the fail-closed check on expert- and attention-looking tensors outside the layers
    untouched: tuple[str, ...] = ()
    # encoder-decoder models: their layer stacks, in order (empty: one decoder stack, whose
    # templates are [experts]'s and whose count is num_layers_key); ``experts`` is the first's
    stacks: tuple[Stack, ...] = ()
    # looped layers: they run several times per token (profiling sums every pass)
    loop: LoopSpec | None = None
    description: str = ""
    source: str = ""  # the file it came from


# ---------------------------------------------------------------------------------- parsing


class _Reader:
    """Pulls typed fields out of a TOML table and collects every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems

    def table(self, data: Any, where: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(data, dict):
            self.problems.append(f"{where}: expected a table")
            return {}
        for key in data:
            if key not in allowed:
                hint = did_you_mean(key, allowed)
                self.problems.append(f"{where}: unknown key '{key}'{hint}")
        return data

    def get(self, data: dict, key: str, where: str, kind: type | tuple, default: Any = ...) -> Any:
        if key not in data:
            if default is ...:
                self.problems.append(f"{where}: missing required key '{key}'")
                return None
            return default
        value = data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            self.problems.append(f"{where}.{key}: expected {names}, got {value!r}")
            return None if default is ... else default
        return value

    def names(self, data: dict, key: str, where: str) -> tuple[str, ...]:
        value = self.get(data, key, where, list, [])
        if value is None:
            return ()
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            self.problems.append(f"{where}.{key}: expected strings, got {bad!r}")
        return tuple(v for v in value if isinstance(v, str))


_STACKED_KEYS = {"name", "axis", "optional", "rows"}
# the keys of [experts] that name tensors or decide which layers are MoE: a [[stacks]] entry
# may set these for its own layers
_LAYER_KEYS = {
    "router",
    "stacked",
    "per_expert",
    "shared",
    "carried",
    "first_dense_key",
    "sparse_step_key",
    "dense_layers_key",
    "last_moe_key",
    "sparse_offset_key",
    "sparse_offset",
    "layer_types_key",
    "moe_layer_types",
    "moe_layers_key",
}
_EXPERT_KEYS = _LAYER_KEYS | {
    "count_keys",
    "top_k_key",
    "groups_key",
    "topk_groups_key",
    "group_score_topk",
    "groups_unsupported",
    "selection",
    "selection_bias",
    "sub_experts",
    "extra_rows",
    "id_tables",
    "top_k",
    "capacity_keys",
    "capacity_unsupported",
}
# what a [[stacks]] entry may set: its name and layer count, and its layers' keys
_STACK_KEYS = {"name", "num_layers_key"} | _LAYER_KEYS
_SUB_EXPERT_KEYS = {"sets", "counts_key", "table_key", "layer_counts_key"}
_HEAD_KEYS = {
    "count_key",
    "kv_count_key",
    "head_dim_key",
    "pin_head_dim",
    "tensors",
    "unsupported",
    "per_layer_count_key",
}
_HEAD_TENSOR_KEYS = {"name", "axis", "owner", "width", "optional"}
_LOOP_KEYS = {"start_key", "end_key", "passes_key"}
_TOP_KEYS = {
    "family",
    "model_types",
    "description",
    "num_layers_key",
    "config_path",
    "config_path_aliases",
    "mtp_layers_key",
    "mtp_prefix",
    "untouched",
    "stacks",
    "loop",
    "experts",
    "attention_experts",
    "heads",
}


def _parse_experts(r: _Reader, data: Any, where: str) -> ExpertSpec | None:
    t = r.table(data, where, _EXPERT_KEYS)
    stacked = []
    for i, item in enumerate(r.get(t, "stacked", where, list, [])):
        s = r.table(item, f"{where}.stacked[{i}]", _STACKED_KEYS)
        name = r.get(s, "name", f"{where}.stacked[{i}]", str)
        axis = r.get(s, "axis", f"{where}.stacked[{i}]", int, 0)
        optional = r.get(s, "optional", f"{where}.stacked[{i}]", bool, False)
        rows = r.get(s, "rows", f"{where}.stacked[{i}]", (int, str), 1)
        if isinstance(rows, int) and rows < 1:
            r.problems.append(f"{where}.stacked[{i}].rows: expected at least 1, got {rows}")
        if name is not None:
            _check_template(r, name, f"{where}.stacked[{i}].name", need_expert=False)
            stacked.append(
                StackedTensor(name=name, axis=axis or 0, optional=bool(optional), rows=rows or 1)
            )
    per_expert = r.names(t, "per_expert", where)
    for name in per_expert:
        _check_template(r, name, f"{where}.per_expert", need_expert=True)
    router = r.get(t, "router", where, str)
    if router is not None:
        _check_template(r, router, f"{where}.router", need_expert=False)
    selection = r.get(t, "selection", where, str, "logits")
    if selection not in ("logits", "biased_score"):
        r.problems.append(f"{where}.selection: expected 'logits' or 'biased_score'")
    count_keys = r.names(t, "count_keys", where)
    if not count_keys:
        r.problems.append(f"{where}.count_keys: name at least one config key")
    sub_experts = (
        _parse_sub_experts(r, t["sub_experts"], f"{where}.sub_experts")
        if "sub_experts" in t
        else None
    )
    id_tables = r.names(t, "id_tables", where)
    for name in id_tables:
        _check_template(r, name, f"{where}.id_tables", need_expert=False)
    carried = r.names(t, "carried", where)
    for name in carried:
        _check_template(r, name, f"{where}.carried", need_expert=False)
    if sub_experts and per_expert:
        r.problems.append(
            f"{where}: per_expert and sub_experts exclude each other (a product expert's "
            "tensors are its sub-experts')"
        )
    if router is None:
        return None
    return ExpertSpec(
        count_keys=count_keys,
        top_k_key=r.get(t, "top_k_key", where, str, "num_experts_per_tok"),
        router=router,
        stacked=tuple(stacked),
        per_expert=per_expert,
        shared=r.names(t, "shared", where),
        carried=carried,
        layers=MoeLayers(
            first_dense_key=r.get(t, "first_dense_key", where, str, None),
            last_moe_key=r.get(t, "last_moe_key", where, str, None),
            sparse_step_key=r.get(t, "sparse_step_key", where, str, None),
            sparse_offset_key=r.get(t, "sparse_offset_key", where, str, None),
            dense_layers_key=r.get(t, "dense_layers_key", where, str, None),
            layer_types_keys=_one_or_more(r, t, "layer_types_key", where),
            moe_layer_types=r.names(t, "moe_layer_types", where) or ("sparse",),
            moe_layers_key=r.get(t, "moe_layers_key", where, str, None),
            sparse_offset=r.get(t, "sparse_offset", where, int, None),
        ),
        groups_key=r.get(t, "groups_key", where, str, None),
        topk_groups_key=r.get(t, "topk_groups_key", where, str, None),
        group_score_topk=r.get(t, "group_score_topk", where, int, 1),
        groups_unsupported=r.get(t, "groups_unsupported", where, str, None),
        selection=selection if selection in ("logits", "biased_score") else "logits",
        selection_bias=r.get(t, "selection_bias", where, str, None),
        sub_experts=sub_experts,
        extra_rows=r.get(t, "extra_rows", where, (int, str), 0),
        id_tables=id_tables,
        top_k=_positive(r, t, "top_k", where),
        capacity_keys=r.names(t, "capacity_keys", where),
        capacity_unsupported=r.get(t, "capacity_unsupported", where, str, None),
    )


def _positive(r: _Reader, t: dict, key: str, where: str) -> int | None:
    value = r.get(t, key, where, int, None)
    if value is not None and value < 1:
        r.problems.append(f"{where}.{key}: expected at least 1, got {value}")
        return None
    return value


def _parse_stacks(r: _Reader, data: Any, experts: Any) -> tuple[Stack, ...]:
    """``[[stacks]]``: each entry's templates and layer rule laid over ``[experts]``."""
    if not isinstance(data, list) or not data:
        r.problems.append("stacks: expected a non-empty list of tables ([[stacks]])")
        return ()
    shared = experts if isinstance(experts, dict) else {}
    if "router" in shared:
        r.problems.append(
            "experts.router: with [[stacks]], each stack names its own router (and expert "
            "tensors); [experts] holds what they share"
        )
    stacks, names = [], set()
    for i, item in enumerate(data):
        where = f"stacks[{i}]"
        s = r.table(item, where, _STACK_KEYS)
        name = r.get(s, "name", where, str)
        count_key = r.get(s, "num_layers_key", where, str)
        if name in names:
            r.problems.append(f"{where}.name: '{name}' names two stacks")
        names.add(name)
        layer_keys = _STACK_KEYS - {"name", "num_layers_key"}
        merged = {k: v for k, v in shared.items() if k not in layer_keys}
        merged |= {k: v for k, v in s.items() if k in layer_keys}
        spec = _parse_experts(r, merged, where)
        if spec is None:
            r.problems.append(f"{where}: missing required key 'router'")
        if name is not None and count_key is not None and spec is not None:
            stacks.append(Stack(name=name, num_layers_key=count_key, experts=spec))
    return tuple(stacks)


def _parse_sub_experts(r: _Reader, data: Any, where: str) -> SubExpertSpec | None:
    t = r.table(data, where, _SUB_EXPERT_KEYS)
    sets = []
    for i, item in enumerate(r.get(t, "sets", where, list, [])):
        if not isinstance(item, list) or not item or not all(isinstance(n, str) for n in item):
            r.problems.append(f"{where}.sets[{i}]: expected a non-empty list of names")
            continue
        for name in item:
            _check_template(r, name, f"{where}.sets[{i}]", need_expert=True)
        heads = {n[: n.find("{expert}")] for n in item}
        if len(heads) > 1:
            r.problems.append(
                f"{where}.sets[{i}]: a set's tensors share one prefix up to {{expert}}, "
                f"got {sorted(heads)}"
            )
        sets.append(tuple(item))
    firsts = [names[0][: names[0].find("{expert}")] for names in sets]
    if len(set(firsts)) < len(firsts):
        r.problems.append(f"{where}.sets: two sets share the prefix {firsts}")
    if len(sets) < 2:
        r.problems.append(f"{where}.sets: name at least two sets of sub-experts")
    keys = [r.get(t, k, where, str) for k in ("counts_key", "table_key", "layer_counts_key")]
    if None in keys or len(sets) < 2:
        return None
    return SubExpertSpec(
        sets=tuple(sets), counts_key=keys[0], table_key=keys[1], layer_counts_key=keys[2]
    )


def _one_or_more(r: _Reader, t: dict, key: str, where: str) -> tuple[str, ...]:
    """A key naming one config key (a string) or several, first present first (a list)."""
    value = r.get(t, key, where, (str, list), None)
    if isinstance(value, str):
        return (value,)
    return r.names(t, key, where) if value is not None else ()


def _parse_loop(r: _Reader, data: Any, where: str) -> LoopSpec | None:
    t = r.table(data, where, _LOOP_KEYS)
    keys: dict[str, tuple[str, ...]] = {}
    for key in sorted(_LOOP_KEYS):
        if key not in t:
            r.problems.append(f"{where}: missing required key '{key}'")
            continue
        keys[key] = _one_or_more(r, t, key, where)
        if t[key] == []:
            r.problems.append(f"{where}.{key}: name at least one config key")
    if len(keys) < len(_LOOP_KEYS) or not all(keys.values()):
        return None
    return LoopSpec(
        start_keys=keys["start_key"], end_keys=keys["end_key"], passes_keys=keys["passes_key"]
    )


def _parse_heads(r: _Reader, data: Any, where: str) -> HeadSpec:
    t = r.table(data, where, _HEAD_KEYS)
    tensors = []
    for i, item in enumerate(r.get(t, "tensors", where, list, [])):
        w = f"{where}.tensors[{i}]"
        s = r.table(item, w, _HEAD_TENSOR_KEYS)
        name, axis = r.get(s, "name", w, str), r.get(s, "axis", w, int)
        owner = r.get(s, "owner", w, str, "query")
        if owner not in ("query", "kv"):
            r.problems.append(f"{w}.owner: expected 'query' or 'kv', got {owner!r}")
        width = r.get(s, "width", w, (str, int, list), "head_dim")
        if isinstance(width, list):
            width = tuple(width)
        if name is not None and axis is not None:
            _check_template(r, name, f"{w}.name", need_expert=False)
            tensors.append(
                HeadTensor(
                    name=name,
                    axis=axis,
                    owner=owner if owner in ("query", "kv") else "query",
                    width=width,
                    optional=bool(r.get(s, "optional", w, bool, False)),
                )
            )
    return HeadSpec(
        count_key=r.get(t, "count_key", where, str, "num_attention_heads"),
        kv_count_key=r.get(t, "kv_count_key", where, str, "num_key_value_heads"),
        head_dim_key=r.get(t, "head_dim_key", where, str, "head_dim"),
        pin_head_dim=bool(r.get(t, "pin_head_dim", where, bool, True)),
        tensors=tuple(tensors),
        unsupported=r.get(t, "unsupported", where, str, None),
        per_layer_count_key=r.get(t, "per_layer_count_key", where, str, None),
    )


def _check_template(r: _Reader, name: str, where: str, *, need_expert: bool) -> None:
    try:
        name.format(layer=0, expert=0)
    except (KeyError, IndexError, ValueError) as exc:
        r.problems.append(
            f"{where}: '{name}' is not a valid name template ({type(exc).__name__}: {exc}); "
            "use only {layer} and {expert}, and double literal braces"
        )
        return
    if "{layer}" not in name:
        r.problems.append(f"{where}: '{name}' has no {{layer}} placeholder")
    if need_expert and "{expert}" not in name:
        r.problems.append(f"{where}: '{name}' has no {{expert}} placeholder")
    if not need_expert and "{expert}" in name:
        r.problems.append(f"{where}: '{name}' must not use {{expert}} (it is stacked)")


def parse_spec(data: dict[str, Any], *, source: str) -> ArchSpec:
    """Build an ArchSpec from a parsed TOML table; raise ArchError listing every problem."""
    problems: list[str] = []
    r = _Reader(problems)
    t = r.table(data, "adapter", _TOP_KEYS)
    family = r.get(t, "family", "adapter", str)
    model_types = r.names(t, "model_types", "adapter")
    stacks = _parse_stacks(r, t["stacks"], t.get("experts")) if "stacks" in t else ()
    if stacks:  # every stack shares [experts]'s routing facts; the first stands for them
        experts = stacks[0].experts
    else:
        experts = _parse_experts(r, t.get("experts"), "experts") if "experts" in t else None
    if "experts" not in t:
        problems.append("adapter: missing required table [experts]")
    attention = (
        _parse_experts(r, t["attention_experts"], "attention_experts")
        if "attention_experts" in t
        else None
    )
    heads = _parse_heads(r, t.get("heads", {}), "heads")
    loop = _parse_loop(r, t["loop"], "loop") if "loop" in t else None
    if "stacks" in t:
        for key in ("attention_experts", "mtp_layers_key", "mtp_prefix", "num_layers_key", "loop"):
            if key in t:
                problems.append(f"adapter: {key} and [[stacks]] exclude each other")
        if heads.unsupported is None:
            problems.append(
                "heads.unsupported: an adapter with [[stacks]] must say why its heads are not "
                "pruned (head pruning knows one decoder stack)"
            )
    mtp_prefix = r.get(t, "mtp_prefix", "adapter", str, None)
    if mtp_prefix is not None and experts is not None:
        _check_mtp_prefix(problems, mtp_prefix, experts, "mtp_layers_key" in t)
    if problems:
        raise ArchError(
            f"adapter {source} is invalid: " + "; ".join(problems),
            hint="compare with a built-in adapter in mfprune/arch/families/ and "
            "docs/adding-an-architecture.md",
        )
    assert family is not None and experts is not None  # guaranteed by the problem checks
    return ArchSpec(
        family=family,
        model_types=model_types or (family,),
        experts=experts,
        heads=heads,
        attention_experts=attention,
        num_layers_key=r.get(t, "num_layers_key", "adapter", str, "num_hidden_layers"),
        config_path=r.get(t, "config_path", "adapter", str, None),
        config_path_aliases=r.names(t, "config_path_aliases", "adapter"),
        mtp_layers_key=r.get(t, "mtp_layers_key", "adapter", str, None),
        mtp_prefix=mtp_prefix,
        untouched=r.names(t, "untouched", "adapter"),
        stacks=stacks,
        loop=loop,
        description=r.get(t, "description", "adapter", str, ""),
        source=source,
    )


def _check_mtp_prefix(problems: list[str], prefix: str, experts: ExpertSpec, counted: bool) -> None:
    """``mtp_prefix`` is ``<module>.<list>.{layer}.[<block>.]``, with a count key, outside the
    decoder layers."""
    layer = experts.router[: experts.router.index("{layer}")]
    head, _, tail = prefix.partition("{layer}")
    module = head.rsplit(".", 2)[0] + "."
    if not counted:
        problems.append("adapter: mtp_prefix needs mtp_layers_key (the config key of their count)")
    if (
        "{" in head + tail
        or head.count(".") < 2
        or not head.endswith(".")
        or not (tail.startswith(".") and tail.endswith("."))
    ):
        problems.append(
            f"adapter.mtp_prefix: expected '<module>.<list>.{{layer}}.' (Qwen3-Next: "
            f"'mtp.layers.{{layer}}.'), got {prefix!r}"
        )
    elif layer.startswith(module):
        problems.append(
            f"adapter.mtp_prefix: its module '{module}' holds the decoder layers "
            f"({layer}{{layer}}.); --drop-mtp would remove them"
        )


def load_spec_file(path: str | Path) -> ArchSpec:
    """Read a user's adapter file (same schema as the built-in ones)."""
    p = Path(path)
    if not p.is_file():
        raise ArchError(f"adapter file {p} does not exist", hint="pass a TOML adapter file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ArchError(
            f"adapter file {p} is not valid TOML: {exc}",
            hint="see docs/adding-an-architecture.md",
        ) from None
    return parse_spec(data, source=str(p))

"""Which tensors of an MoE layer belong to which expert: the prefix rule and the stacked rule.

An adapter names a family's expert tensors in their plain (unquantized) form. Released
checkpoints carry more beside them: FP8 block scales (``weight_scale_inv``), MXFP4 blocks and
scales, compressed-tensors' ``weight_packed`` / ``weight_scale`` / ``weight_zero_point`` /
``weight_shape``, GPTQ/AWQ's ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``. None of them is
listed one by one; instead, in every MoE layer:

* **prefix rule** — every tensor under ``...experts.{expert}.`` (the part of a ``per_expert``
  template up to the expert number) belongs to that expert: it follows the expert, renumbered
  and byte-identical, or goes with it;
* **stacked rule** — every tensor of an *expert module* (the module holding fused expert
  tensors, e.g. ``mlp.experts.``, or the module before ``{expert}``) whose leading axis has one
  entry per expert is sliced along that axis, like the adapter's listed ``stacked`` tensors;
* **carried** — a tensor the adapter lists in ``carried`` (Inkling's ``gate.global_scale``
  [1], shared by every expert) is copied unchanged, unless its leading axis has one entry per
  expert;
* **fail closed** — a tensor that looks per-expert (under the router module, under an expert
  module, a leading axis of E under the MoE block, or an ``experts.<n>.`` name elsewhere in the
  layer) and that no rule covers is *unknown*: a rewrite that prunes the layer refuses to start.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mfprune.arch.spec import ExpertSpec
from mfprune.io.reader import TensorInfo

_EXPERT_NAME = re.compile(r"(?:^|\.)experts\.\d+\.")


@dataclass(frozen=True)
class ExpertTensor:
    """One tensor under an expert's prefix: ``info.name == prefix + rest``."""

    info: TensorInfo
    prefix: str  # the template it matched, with {layer} filled and {expert} left

    def renamed(self, *, old: int, new: int) -> str:
        """The tensor's name once expert ``old`` is renumbered ``new``."""
        head = self.prefix.format(expert=old)
        return self.prefix.format(expert=new) + self.info.name[len(head) :]


@dataclass(frozen=True)
class LayerTensors:
    """The expert-related tensors of one MoE layer, sorted into rules."""

    layer: int
    router: TensorInfo
    per_expert: Mapping[int, tuple[ExpertTensor, ...]]  # expert id -> its tensors
    stacked: tuple[tuple[TensorInfo, int], ...]  # (tensor, expert axis): sliced on that axis
    unknown: tuple[TensorInfo, ...] = ()  # look per-expert, no rule covers them


@dataclass(frozen=True)
class ExpertRules:
    """An ExpertSpec's tensor templates for one layer (``{layer}`` filled in)."""

    block: str  # the MoE block: the common module of the router and every expert tensor
    router: str
    router_module: str
    prefixes: tuple[str, ...]  # "...experts.{expert}." ({expert} left as a placeholder)
    modules: tuple[str, ...]  # expert modules: "...experts." (stacked tensors live here)
    stacked: Mapping[str, int]  # listed stacked tensor -> axis
    shared: tuple[str, ...]
    others: tuple[str, ...] = field(default=())  # blocks of the layer's other expert kinds
    # CartesianMoE sub-expert prefixes ("...sub_experts.0.{expert}."): mfprune.arch.sub_experts
    # sorts the tensors under them; anything else under their modules is unknown
    sub_prefixes: tuple[str, ...] = field(default=())
    id_tables: frozenset[str] = field(default=frozenset())  # values are expert ids (V4 hash)
    carried: frozenset[str] = field(default=frozenset())  # shared by every expert: copied


def expert_prefix(template: str) -> str:
    """``a.experts.{expert}.w1.weight`` -> ``a.experts.{expert}.``."""
    return template[: template.index("{expert}")] + "{expert}."


def block_of(spec: ExpertSpec) -> str:
    """The MoE block template: the longest common module prefix of the router and every
    expert tensor template (``model.layers.{layer}.mlp.``)."""
    sub_sets = spec.sub_experts.sets if spec.sub_experts else ()
    names = [spec.router, *(s.name for s in spec.stacked), *spec.per_expert]
    names += [n for names_ in sub_sets for n in names_]
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1 or column[0] == "{expert}":
            break
        common.append(column[0])
    return ".".join(common) + "."


def layer_prefix(spec: ExpertSpec) -> str:
    """The decoder-layer prefix template (``model.layers.{layer}.``), from the router's name."""
    return spec.router[: spec.router.index("{layer}") + len("{layer}.")]


def rules_for(spec: ExpertSpec, layer: int, *, others: Iterable[ExpertSpec] = ()) -> ExpertRules:
    def fill(template: str) -> str:
        return template.replace("{layer}", str(layer))

    router = fill(spec.router)
    router_module = router.rsplit(".", 1)[0] + "."
    prefixes = tuple(dict.fromkeys(fill(expert_prefix(t)) for t in spec.per_expert))
    sub = tuple(
        fill(expert_prefix(names[0]))
        for names in (spec.sub_experts.sets if spec.sub_experts else ())
    )
    modules = [p[: p.index("{expert}")] for p in prefixes]
    for st in spec.stacked:
        parent = fill(st.name).rsplit(".", 1)[0] + "."
        # a module holding the router (Gemma 4's router.per_expert_scale beside router.proj and
        # router.scale [D]; a block-level selection bias; Zaya's router MLP inside the module
        # holding its balancing biases) is no expert module: its listed tensors are sliced,
        # other leading-E ones refused, the rest carried
        if not parent.startswith(router_module) and not router_module.startswith(parent):
            modules.append(parent)
    return ExpertRules(
        block=fill(block_of(spec)),
        router=router,
        router_module=router_module,
        prefixes=prefixes,
        modules=tuple(dict.fromkeys(modules)),
        stacked={fill(st.name): st.axis for st in spec.stacked},
        shared=tuple(fill(s) for s in spec.shared),
        others=tuple(fill(block_of(o)) for o in others),
        sub_prefixes=sub,
        id_tables=frozenset(fill(n) for n in spec.id_tables),
        carried=frozenset(fill(n) for n in spec.carried),
    )


def _prefix_pattern(prefixes: tuple[str, ...]) -> re.Pattern[str] | None:
    if not prefixes:
        return None
    alternatives = []
    for p in prefixes:
        head, tail = p.split("{expert}")
        alternatives.append(re.escape(head) + r"(\d+)" + re.escape(tail))
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


def sort_layer(
    tensors: Iterable[TensorInfo], rules: ExpertRules, *, layer: int, num_experts: int
) -> LayerTensors:
    """Sort the tensors of decoder layer ``layer`` (every tensor under its layer prefix) by
    rule. The router must be among them (the caller checked)."""
    pattern = _prefix_pattern(rules.prefixes)
    sub_pattern = _prefix_pattern(rules.sub_prefixes)
    per_expert: dict[int, list[ExpertTensor]] = {}
    stacked: list[tuple[TensorInfo, int]] = []
    unknown: list[TensorInfo] = []
    router: TensorInfo | None = None
    for info in tensors:
        name = info.name
        if name == rules.router:
            router = info
            continue
        if name in rules.stacked:
            stacked.append((info, rules.stacked[name]))
            continue
        if name in rules.id_tables:  # mfprune.arch.id_tables reads and remaps them
            continue
        leading_e = bool(info.shape) and info.shape[0] == num_experts
        if name in rules.carried:  # one value for every expert (Inkling's gate.global_scale)
            if leading_e:
                unknown.append(info)
            continue
        if any(name.startswith(s) for s in rules.shared) or any(
            name.startswith(o) and not rules.block.startswith(o) for o in rules.others
        ):
            continue
        if sub_pattern and sub_pattern.match(name):
            continue  # a sub-expert's tensor: mfprune.arch.sub_experts
        if any(name.startswith(p[: p.index("{expert}")]) for p in rules.sub_prefixes):
            unknown.append(info)  # beside the sub-experts, in no rule
            continue
        match = pattern.match(name) if pattern else None
        if match:
            index = next(i for i, g in enumerate(match.groups()) if g is not None)
            expert = int(match.group(index + 1))
            per_expert.setdefault(expert, []).append(ExpertTensor(info, rules.prefixes[index]))
            continue
        if name.startswith(rules.router_module):
            unknown.append(info)
        elif any(name.startswith(m) for m in rules.modules):
            (stacked.append((info, 0)) if leading_e else unknown.append(info))
        elif name.startswith(rules.block):
            if leading_e:
                unknown.append(info)
        elif _EXPERT_NAME.search(name):
            unknown.append(info)
    assert router is not None  # resolve_layout only sorts layers that have a router
    return LayerTensors(
        layer=layer,
        router=router,
        per_expert={e: tuple(ts) for e, ts in sorted(per_expert.items())},
        stacked=tuple(stacked),
        unknown=tuple(unknown),
    )


def first_missing(
    members: Iterable[ExpertTensor], templates: Iterable[str], *, layer: int, expert: int
) -> str | None:
    """The first of ``templates`` (filled for ``layer`` / ``expert``) that ``members`` lack,
    plain or in a quantized form under the same module; None when every one is there."""
    have = {t.info.name for t in members}
    for template in templates:
        name = template.format(layer=layer, expert=expert)
        module = name.rsplit(".", 1)[0] + "."
        if name not in have and not any(h.startswith(module) for h in have):
            return name
    return None


def group_by_layer(tensors: Iterable[TensorInfo], prefix: str) -> dict[int, list[TensorInfo]]:
    """Tensors under ``prefix`` (a template with ``{layer}``), grouped by layer index."""
    head, tail = prefix.split("{layer}")
    pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))
    groups: dict[int, list[TensorInfo]] = {}
    for info in tensors:
        match = pattern.match(info.name)
        if match:
            groups.setdefault(int(match.group(1)), []).append(info)
    return groups

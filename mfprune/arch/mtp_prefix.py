"""Multi-token-prediction layers stored under their own prefix (``spec.mtp_prefix``).

Qwen3-Next, Qwen3.5-MoE and Qwen4-Exp save their MTP head as ``mtp.layers.{i}.*`` (a whole
decoder layer: attention, router, experts, shared expert) beside ``mtp.fc``, ``mtp.norm`` and
``mtp.pre_fc_norm_*``, with the count in ``mtp_num_hidden_layers``; transformers ignores
``^mtp.*`` on load, servers build the head with the config's expert count. Inside mfprune the
checkpoint is viewed with MTP layer ``i`` named as decoder layer ``num_layers + i`` (the
adapter's layer prefix: ``model.layers.{N + i}.*``), so every rule of DeepSeek-style MTP layers
(kept experts and heads of the last decoder layer, router rows, ``--drop-mtp``) applies
unchanged; the rewrite writes each output tensor under its stored name (``real_name``).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING

from mfprune.arch.expert_tensors import layer_prefix
from mfprune.arch.spec import ArchSpec, ExpertSpec
from mfprune.checkpoint import Checkpoint
from mfprune.errors import ModelError
from mfprune.io.reader import TensorInfo

if TYPE_CHECKING:
    from mfprune.arch.layout import ModelLayout


def _parts(spec: ArchSpec) -> tuple[str, str, str]:
    """(stored MTP-layer prefix before and after the index, decoder-layer prefix before it):
    ``("mtp.layers.", ".", "model.layers.")``; Inkling's ``("model.mtp.layers.",
    ".transformer_block.", "model.layers.")``."""
    assert spec.mtp_prefix is not None
    router = spec.experts.router
    head, tail = spec.mtp_prefix.split("{layer}")
    return head, tail, router[: router.index("{layer}")]


def mtp_module(spec: ArchSpec) -> str | None:
    """The MTP head's module (``mtp.``: the prefix up to its list of layers), holding its
    layers and its own tensors; None without one."""
    if not spec.mtp_prefix:
        return None
    return spec.mtp_prefix.split("{layer}")[0].rsplit(".", 2)[0] + "."


def mtp_view(ckpt: Checkpoint, spec: ArchSpec, num_layers: int) -> Checkpoint:
    """``ckpt`` with MTP layer ``i`` under ``spec.mtp_prefix`` renamed decoder layer
    ``num_layers + i``; ``ckpt`` itself without such a prefix (or already viewed)."""
    if not spec.mtp_prefix:
        return ckpt
    stored, tail, decoder = _parts(spec)
    pattern = re.compile(re.escape(stored) + r"(\d+)" + re.escape(tail))
    tensors = {}
    renamed = 0
    for name, info in ckpt.tensors.items():
        m = pattern.match(name)
        if m:
            name = f"{decoder}{num_layers + int(m.group(1))}.{name[m.end() :]}"
            info = replace(info, name=name)
            renamed += 1
        if name in tensors:
            raise ModelError(
                f"{name} is stored both as a decoder layer and as MTP layer "
                f"{int(name[len(decoder) :].split('.')[0]) - num_layers} ({spec.mtp_prefix})",
                hint="the checkpoint holds its MTP layers twice; keep one copy",
            )
        tensors[name] = info
    if not renamed:
        return ckpt
    return replace(ckpt, tensors=tensors)


def real_name(spec: ArchSpec, num_layers: int, name: str) -> str:
    """The stored name of ``name`` from a ``mtp_view`` (MTP layers back under their prefix)."""
    if not spec.mtp_prefix:
        return name
    stored, tail, decoder = _parts(spec)
    m = re.match(re.escape(decoder) + r"(\d+)\.", name)
    if m is None or int(m.group(1)) < num_layers:
        return name
    return f"{stored}{int(m.group(1)) - num_layers}{tail}{name[m.end() :]}"


_EXPERTS = re.compile(r"(?:^|\.)experts\.")
# attention of a layer: its module (self_attn., attention., attn., cross_attn.) or projections
_ATTENTION = re.compile(r"(?:^|\.)(?:(?:\w*_)?(?:attn|attention)|[qkvo]_proj|w?qkv\w*)\.")


def _expert_specs(layout: ModelLayout) -> list[ExpertSpec]:
    spec = layout.spec
    return [s.experts for s in spec.stacks] or [
        k.spec for k in (layout.experts, layout.attention_experts) if k is not None
    ]


def _outside_layers(ckpt: Checkpoint, layout: ModelLayout) -> list[TensorInfo]:
    """The tensors outside the decoder layers (MTP layers the adapter describes are decoder
    layers here, ``mtp_view``), less the parts the adapter carries on purpose
    (``spec.untouched``: towers with experts or attention of their own, a talker)."""
    spec = layout.spec
    heads = [t.name for t in spec.heads.tensors] if layout.heads is not None else []
    prefixes = {layer_prefix(es).split("{layer}")[0] for es in _expert_specs(layout)}
    prefixes |= {name.split("{layer}")[0] for name in heads if "{layer}" in name}
    layers = [re.compile(re.escape(head) + r"\d+\.") for head in sorted(prefixes)]
    return [
        info
        for name, info in ckpt.tensors.items()
        if not any(p.match(name) for p in layers) and not name.startswith(spec.untouched)
    ]


def outside_experts(ckpt: Checkpoint, layout: ModelLayout) -> list[TensorInfo]:
    """The tensors outside the decoder layers (and ``untouched``) named like an expert
    (``experts.``) or like the adapter's router module (``mlp.gate.``): an MoE the rewrite
    would not prune (an MTP head under a prefix the adapter does not describe)."""
    routers = []
    for es in _expert_specs(layout):
        module = es.router.rsplit(".", 1)[0] + "."
        routers.append(re.compile(r"(?:^|\.)" + re.escape(module[len(layer_prefix(es)) :])))
    return [
        info
        for info in _outside_layers(ckpt, layout)
        if _EXPERTS.search(info.name) or any(r.search(info.name) for r in routers)
    ]


def outside_attention(ckpt: Checkpoint, layout: ModelLayout) -> list[TensorInfo]:
    """The tensors outside the decoder layers (and ``untouched``) named like a layer's
    attention (``self_attn.``, ``attention.``, ``q_proj``, ``qkv``...): heads the rewrite would
    not prune (an MTP head under a prefix the adapter does not describe)."""
    return [info for info in _outside_layers(ckpt, layout) if _ATTENTION.search(info.name)]

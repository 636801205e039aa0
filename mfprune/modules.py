"""Where a loaded transformers model keeps its routers and attention output projections.

Shared by the exactness oracle (which masks routers and heads) and the profiler (which hooks
them). ``adapter_routers`` finds routers from the adapter's tensor names (through
transformers' key renamings), wherever the family keeps them and its selection bias; the
oracle uses it; ``routing_modules`` gives the profiler the routing module around each.
``find_routers`` finds them by class name and module path.

* Routers: every family's top-k router class (``*TopKRouter`` / ``*TopkRouter``), and JetMoE's
  ``JetMoeTopKGating``. A router under ``self_attention`` / ``self_attn`` routes attention
  experts (JetMoE's mixture of attention); any other routes MLP experts.
* ``self_attn.o_proj`` (Nemotron-H: ``mixer.o_proj``): the ``nn.Linear`` whose input is the
  concatenated per-head outputs.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from mfprune.arch.spec import ArchSpec, ExpertSpec
from mfprune.errors import ModelError

ROUTER_CLASS = re.compile(r"(TopKRouter|TopkRouter|TopKGating)$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_ATTENTION_PARTS = ("self_attention", "self_attn")
_O_PROJ_NAMES = ("self_attn.o_proj", "mixer.o_proj")


def layer_index(name: str) -> int | None:
    """Decoder-layer index in a module name such as ``model.layers.3.mlp.gate``."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def is_router(module: nn.Module) -> bool:
    return bool(ROUTER_CLASS.search(type(module).__name__))


def text_model(model: nn.Module) -> nn.Module:
    """The part of ``model`` that maps text ids to logits: ``model`` itself, unless its class
    has no forward of its own and it holds a ``thinker`` (Qwen3-Omni-MoE: the thinker, a whole
    causal LM, answers in text; its talker and code2wav only speak, from the thinker's
    states, in ``generate``)."""
    thinker = getattr(model, "thinker", None)
    if isinstance(thinker, nn.Module) and type(model).forward is nn.Module.forward:
        return thinker
    return model


def is_block_diffusion(config: object) -> bool:
    """A block-diffusion model (DiffusionGemma, its config says ``canvas_length``; a loaded
    config or config.json's dict): an encoder, a causal LM over the prompt that writes a KV
    cache, and a decoder that denoises a canvas of tokens over that cache, tying its every
    layer weight to the encoder's."""
    if isinstance(config, dict):
        return config.get("canvas_length") is not None
    return getattr(config, "canvas_length", None) is not None


def refuse_block_diffusion(config: dict, what: str) -> None:
    """Refuse ``what``, a step that runs a causal LM's forward (repair, bench), for a
    block-diffusion model (``is_block_diffusion``)."""
    if is_block_diffusion(config):
        raise ModelError(
            f"{what} is not supported for block-diffusion models ({config.get('model_type')}): "
            "it runs a causal LM, and this model's decoder denoises a canvas over the prompt's "
            "KV cache",
            hint="prune it from a profile or a plan without it: mfprune prune MODEL --profile "
            "STATS --verify",
        )


def find_routers(model: nn.Module, *, attention: bool) -> dict[int, tuple[str, nn.Module]]:
    """Map layer index -> ``(name, router)`` for the MLP (or attention) routers of ``model``'s
    text model (``text_model``: Qwen3-Omni's talker has routers of its own, never pruned).

    Raises:
        ValueError: if one layer holds two routers of the same kind.
    """
    found: dict[int, tuple[str, nn.Module]] = {}
    text = {id(m) for m in text_model(model).modules()}
    for name, module in model.named_modules():
        if not is_router(module) or id(module) not in text:
            continue
        layer = layer_index(name)
        in_attention = any(part in name.split(".") for part in _ATTENTION_PARTS)
        if layer is None or in_attention != attention:
            continue
        if layer in found:
            raise ValueError(f"two routers in layer {layer}: {found[layer][0]} and {name}")
        found[layer] = (name, module)
    return found


def parent_of(model: nn.Module, name: str) -> nn.Module:
    """The module that holds ``name`` (the MoE block around a router, for instance)."""
    return model.get_submodule(name.rpartition(".")[0])


def moe_block(model: nn.Module, router: str) -> nn.Module:
    """The MoE block around the router module ``router``: its parent, or the nearest module
    above that holds the experts (Zaya nests its router MLP in ``mlp.gate.router_mlp``)."""
    name = router
    while "." in name:
        name = name.rpartition(".")[0]
        block = model.get_submodule(name)
        if hasattr(block, "experts") or hasattr(block, "output_linear"):
            return block
    return parent_of(model, router)


def find_o_projs(model: nn.Module) -> dict[int, nn.Linear]:
    """Map layer index -> that decoder layer's ``self_attn.o_proj`` linear (``mixer.o_proj``
    where a layer holds one mixer, attention or another: Nemotron-H; layers without one are
    absent: JetMoE's attention is a mixture of attention experts). Only the language model's
    decoder is searched (``get_decoder``): Llama 4's vision tower has ``layers.N.self_attn.
    o_proj`` too; Qwen3-Omni's talker, outside its thinker (``text_model``), too. A
    block-diffusion model's encoder is searched instead: its decoder's layers are the same
    weights, and the profiler runs the encoder."""
    text = text_model(model)
    if is_block_diffusion(getattr(model, "config", None)):
        encoder = text.get_encoder()
        decoder = getattr(encoder, "language_model", encoder)  # not the vision tower
    else:
        get_decoder = getattr(text, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else None
    found: dict[int, nn.Linear] = {}
    for name, module in (decoder if isinstance(decoder, nn.Module) else model).named_modules():
        layer = layer_index(name)
        if name.endswith(_O_PROJ_NAMES) and layer is not None and isinstance(module, nn.Linear):
            found[layer] = module
    return found


def find_o_proj(model: nn.Module, layer: int) -> nn.Linear:
    """The ``self_attn.o_proj`` linear of decoder layer ``layer``.

    Raises:
        ValueError: if that layer has none.
    """
    o_proj = find_o_projs(model).get(layer)
    if o_proj is None:
        raise ValueError(f"heads: layer {layer} has no self_attn.o_proj linear to mask")
    return o_proj


def loaded_name(model: nn.Module, key: str) -> str:
    """The name transformers gives the on-disk tensor ``key`` in ``model`` (its key renamings:
    Mixtral's ``block_sparse_moe.gate.weight`` is ``mlp.gate.weight`` once loaded)."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    name = key
    for rename in get_model_conversion_mapping(model):
        if hasattr(rename, "rename_source_key"):
            name, _ = rename.rename_source_key(name)
    return name


@dataclass(frozen=True)
class RouterSite:
    """Where one layer's routing can be masked: the module that owns the router weight (its
    forward computes the logits), and the selection bias wherever the family keeps it."""

    layer: int
    name: str  # in-memory name of the module owning the router weight
    module: nn.Module
    num_experts: int  # E: rows of the router weight
    top_k: int
    bias: torch.Tensor | None = None  # added to scores before top-k (sigmoid + bias families)
    # other modules computing logits from the same (tied) router weight: DiffusionGemma's
    # decoder layers, which share their every weight with the encoder's (``module``)
    twins: tuple[nn.Module, ...] = ()


def _logits_module(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """The module (name, module) whose forward computes the router logits from the weight of
    module ``name``: that module, unless it is an ``nn.Linear`` whose parent never calls it
    and uses its weight in an ``F.linear`` call of its own (LongCat's ``router.classifier``)."""
    module = model.get_submodule(name)
    parent_name, _, child = name.rpartition(".")
    if not isinstance(module, nn.Linear) or not parent_name:
        return name, module
    parent = model.get_submodule(parent_name)
    try:
        source = inspect.getsource(type(parent).forward)
    except (OSError, TypeError):
        return name, module
    return (name, module) if f"self.{child}(" in source else (parent_name, parent)


def adapter_routers(
    model: nn.Module, spec: ExpertSpec, layers: Iterable[int], *, stacks: tuple = ()
) -> dict[int, RouterSite]:
    """The router of each of ``layers``, found from the adapter's tensor names (not by class).
    ``stacks`` (``ExpertLayout.stacks``, an encoder-decoder model's): each layer is found with
    its stack's templates at its index there; sites keep mfprune's numbers.

    Raises:
        ValueError: if a router weight (or the selection bias of a ``biased_score`` family)
            is not in the loaded model.
    """
    if stacks:
        from mfprune.arch.layout import in_stacks

        sites = {}
        for stack, local in in_stacks(stacks, layers):
            for index, site in adapter_routers(model, stack.spec, local).items():
                sites[local[index]] = dataclasses.replace(site, layer=local[index])
        return sites
    # every name of a tied tensor (DiffusionGemma saves the decoder's, which is the encoder's)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors |= dict(model.named_buffers(remove_duplicate=False))
    config = model.config.get_text_config() if hasattr(model, "config") else None
    top_k = spec.top_k or getattr(config, spec.top_k_key, None)
    if top_k is None and config is not None:  # a dotted key: in a sub-config (DBRX)
        from mfprune.arch.layout import config_value

        top_k = config_value(config.to_dict(), spec.top_k_key)
    top_k = int(top_k or 1)
    sites = {}
    for layer in layers:
        weight_name = loaded_name(model, spec.router.format(layer=layer))
        if weight_name not in tensors:
            raise ValueError(
                f"layer {layer}: the adapter's router {spec.router.format(layer=layer)} "
                f"(loaded as {weight_name}) is not in the model"
            )
        # the first module holding the weight routes (the profiler hooks it); the others too
        owners = [n.rpartition(".")[0] for n, t in tensors.items() if t is tensors[weight_name]]
        module_name, others = owners[0], owners[1:]
        bias = None
        hashed = any(loaded_name(model, t.format(layer=layer)) in tensors for t in spec.id_tables)
        if spec.selection == "biased_score" and spec.selection_bias and not hashed:
            bias_name = loaded_name(model, spec.selection_bias.format(layer=layer))
            if bias_name not in tensors:
                raise ValueError(f"layer {layer}: selection bias {bias_name} is not in the model")
            bias = tensors[bias_name]
        module_name, module = _logits_module(model, module_name)
        sites[layer] = RouterSite(
            layer=layer,
            name=module_name,
            module=module,
            num_experts=int(tensors[weight_name].shape[0]),
            top_k=top_k,
            bias=bias,
            twins=tuple(_logits_module(model, name)[1] for name in others),
        )
    return sites


def stack_routers(
    model: nn.Module, spec: ArchSpec, kind: ExpertSpec, layers: Iterable[int]
) -> dict[int, RouterSite]:
    """``adapter_routers`` from the adapter alone (the oracle has no layout): an encoder-decoder
    model's stacks are numbered from the loaded config (``mfprune.arch.layout.stack_layouts``)."""
    if not spec.stacks:
        return adapter_routers(model, kind, layers)
    from mfprune.arch.layout import stack_layouts

    stacks = stack_layouts(spec, model.config.get_text_config().to_dict())
    return adapter_routers(model, kind, layers, stacks=stacks)


def routing_modules(
    model: nn.Module, spec: ExpertSpec, layers: Iterable[int], *, stacks: tuple = ()
) -> dict[int, tuple[str, nn.Module]]:
    """Map layer -> ``(name, module)`` of the module that routes each of ``layers``, found from
    the adapter: the module owning the router weight, or, when that is a bare ``nn.Linear``
    (JetMoE's ``router.layer``, Granite's, Hunyuan's ``gate.wg``, AFMoE's ``router.gate``), the
    router module around it. Its parent is the MoE block. (The profiler.)

    Raises:
        ValueError: as ``adapter_routers``.
    """
    found = {}
    for layer, site in adapter_routers(model, spec, layers, stacks=stacks).items():
        name, module = site.name, site.module
        if type(module) is nn.Linear:  # a bare linear (PhiMoE's router subclasses nn.Linear)
            name = name.rpartition(".")[0]
            module = model.get_submodule(name)
        found[layer] = (name, module)
    return found

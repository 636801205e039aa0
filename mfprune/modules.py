"""Where a loaded transformers model keeps its routers and attention output projections.

Shared by the exactness oracle (which masks routers and heads) and the profiler (which hooks
them): both find the same modules the same way, by class name and module path.

* Routers: every family's top-k router class (``*TopKRouter`` / ``*TopkRouter``), and JetMoE's
  ``JetMoeTopKGating``. A router under ``self_attention`` / ``self_attn`` routes attention
  experts (JetMoE's mixture of attention); any other routes MLP experts.
* ``self_attn.o_proj``: the ``nn.Linear`` whose input is the concatenated per-head outputs.
"""

from __future__ import annotations

import re

from torch import nn

ROUTER_CLASS = re.compile(r"(TopKRouter|TopkRouter|TopKGating)$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_ATTENTION_PARTS = ("self_attention", "self_attn")


def layer_index(name: str) -> int | None:
    """Decoder-layer index in a module name such as ``model.layers.3.mlp.gate``."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def is_router(module: nn.Module) -> bool:
    return bool(ROUTER_CLASS.search(type(module).__name__))


def find_routers(model: nn.Module, *, attention: bool) -> dict[int, tuple[str, nn.Module]]:
    """Map layer index -> ``(name, router)`` for the MLP (or attention) routers of ``model``.

    Raises:
        ValueError: if one layer holds two routers of the same kind.
    """
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        if not is_router(module):
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


def find_o_projs(model: nn.Module) -> dict[int, nn.Linear]:
    """Map layer index -> that decoder layer's ``self_attn.o_proj`` linear (layers without one
    are absent: JetMoE's attention is a mixture of attention experts)."""
    found: dict[int, nn.Linear] = {}
    for name, module in model.named_modules():
        layer = layer_index(name)
        if (
            name.endswith("self_attn.o_proj")
            and layer is not None
            and isinstance(module, nn.Linear)
        ):
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

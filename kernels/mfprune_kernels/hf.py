"""The fused MoE kernel as a transformers v5 experts implementation.

transformers v5 dispatches the forward of every ``@use_experts_implementation`` experts module
(Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, Granite-MoE, Phi-MoE, ...) through
``transformers.integrations.moe.ExpertsInterface`` by the name in
``config._experts_implementation``. :func:`register` adds ours under ``"mfprune_triton"``;
then ``from_pretrained(..., experts_implementation="mfprune_triton")``, or
``model.set_experts_implementation("mfprune_triton")`` on a loaded model, selects it.

Profiling hook: give an experts module a callable attribute ``mfprune_norms_sink`` and each
forward also computes every slot's ``‖E_e(x)‖₂`` in the kernel's epilogue and calls
``sink(module, top_k_index [T, K], top_k_weights [T, K], norms [T, K])``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mfprune_kernels.errors import KernelInputError
from mfprune_kernels.moe.triton_moe import fused_moe

#: The name under which :func:`register` adds the kernel.
IMPLEMENTATION_NAME = "mfprune_triton"

#: Attribute of an experts module that, when set to a callable, receives the slot norms.
NORMS_SINK_ATTR = "mfprune_norms_sink"

_ALTERNATIVE = "use experts_implementation='grouped_mm' (or 'eager') for this model"


def _unsupported(module: torch.nn.Module) -> str | None:
    """Why ``module`` does not fit the kernel (plain concatenated SwiGLU), or None."""
    from transformers import activations
    from transformers.integrations import moe

    flags = {
        "has_bias": False,
        "is_transposed": False,
        "is_concatenated": True,
        "has_gate": True,
        "has_post_expert_norm": False,
    }
    for flag, wanted in flags.items():
        if getattr(module, flag, wanted) != wanted:
            return f"its experts have {flag}={not wanted}"
    silu = (torch.nn.SiLU, getattr(activations, "SiLUActivation", torch.nn.SiLU))
    if not isinstance(getattr(module, "act_fn", None), silu):
        return f"its activation is {type(getattr(module, 'act_fn', None)).__name__}, not SiLU"
    default_gate = getattr(moe, "_default_apply_gate", None)
    gate = getattr(type(module), "_apply_gate", default_gate)
    if default_gate is not None and gate is not default_gate:
        return f"{type(module).__name__} has its own gating function"
    if not (hasattr(module, "gate_up_proj") and hasattr(module, "down_proj")):
        return "it has no fused gate_up_proj/down_proj tensors"
    return None


def experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The ``ExpertsInterface`` contract: ``hidden_states [T, D]``, ``top_k_index [T, K]``,
    ``top_k_weights [T, K]`` -> ``[T, D]``; ``self`` is the experts module."""
    reason = _unsupported(self)
    if reason is not None:
        raise KernelInputError(
            f"{IMPLEMENTATION_NAME} cannot run {type(self).__name__}: {reason}; {_ALTERNATIVE}"
        )
    tensors = (hidden_states, self.gate_up_proj, self.down_proj)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise KernelInputError(
            f"{IMPLEMENTATION_NAME} is forward-only (no backward): run the model under "
            "torch.no_grad() or torch.inference_mode(), or train with 'grouped_mm'"
        )
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])  # [T, D]
    index = top_k_index.reshape(x.shape[0], -1)  # [T, K]
    weights = top_k_weights.reshape(index.shape)  # [T, K]
    args = (x, index, weights, self.gate_up_proj, self.down_proj)
    sink: Callable | None = getattr(self, NORMS_SINK_ATTR, None)
    if sink is None:
        return fused_moe(*args).view(shape)
    out, norms = fused_moe(*args, return_norms=True)
    sink(self, index, weights, norms)
    return out.view(shape)


def register(name: str = IMPLEMENTATION_NAME) -> str:
    """Add :func:`experts_forward` to transformers' ``ExpertsInterface`` under ``name``
    (idempotent) and return the name, for ``experts_implementation=name``.

    Call it before the model is built or loaded: transformers checks the name then.
    """
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(name, experts_forward)
    return name

"""mfprune's Triton kernels, each with a plain PyTorch reference beside it.

- :func:`fused_moe` — SwiGLU mixture-of-experts forward (``moe/triton_moe.py``), optionally
  returning each slot's expert-output norm; :func:`moe_reference` is its twin (``moe/naive.py``).
- :func:`register` — make it a transformers v5 experts implementation (``"mfprune_triton"``).

The Triton parts are imported on first use, so the references work where Triton is absent.
On CPU the kernels run only under ``TRITON_INTERPRET=1``, set before triton is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mfprune_kernels.errors import KernelInputError
from mfprune_kernels.moe.naive import moe_reference

if TYPE_CHECKING:
    from mfprune_kernels.hf import IMPLEMENTATION_NAME, experts_forward, register
    from mfprune_kernels.moe.triton_moe import fused_moe

__all__ = [
    "IMPLEMENTATION_NAME",
    "KernelInputError",
    "experts_forward",
    "fused_moe",
    "moe_reference",
    "register",
]

_LAZY = {
    "fused_moe": "mfprune_kernels.moe.triton_moe",
    "IMPLEMENTATION_NAME": "mfprune_kernels.hf",
    "experts_forward": "mfprune_kernels.hf",
    "register": "mfprune_kernels.hf",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mfprune_kernels' has no attribute {name!r}")

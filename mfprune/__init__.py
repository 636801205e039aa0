"""mfprune: shrink Mixture-of-Experts LLMs to the task they are used for.

Library API (the CLI is a thin layer over these):

- ``inspect_model(model)``: family, MoE layers, experts, heads, parameter split.
- ``PrunePlan``: what each layer keeps; ``PrunePlan.load`` / ``save``.
- ``rewrite_checkpoint(model, plan, out)``: the streaming, exact rewrite.
"""

__version__ = "0.1.0"

from mfprune.inspect import ModelReport, inspect_model
from mfprune.plan import PrunePlan
from mfprune.rewrite import RewriteResult, rewrite_checkpoint

__all__ = [
    "ModelReport",
    "PrunePlan",
    "RewriteResult",
    "__version__",
    "inspect_model",
    "rewrite_checkpoint",
]

"""mfprune: shrink Mixture-of-Experts LLMs to the task they are used for.

Library API (the CLI is a thin layer over these):

- ``inspect_model(model)``: family, MoE layers, experts, heads, parameter split.
- ``PrunePlan``: what each layer keeps; ``PrunePlan.load`` / ``save``.
- ``rewrite_checkpoint(model, plan, out)``: the streaming, exact rewrite.
- ``make_plan(layout, expert_scores=..., keep_ratio=...)``: scores -> a plan under a budget.
- ``load_pretrained(dir)``: loads a pruned model, also one with per-layer expert counts.
- ``profile_model(model, data)``: how task data uses every expert and head -> ``ProfileStats``
  (``save`` / ``load``; ``merge_stats`` adds stats of disjoint data).
- ``run_bench(model, baseline=...)``: lm-eval quality, speed and memory side by side, the gate
  -> ``BenchReport``.
- ``run_shrink(load_config("shrink.toml"))``: the CI step, profile → prune → bench → gate.
- ``mfprune.heldout.heldout_loss(model, HeldOut.load(tokenizer, texts), experts=...)``: the
  held-out loss of a pruning plan measured with the experts masked, without a rewrite.

Wherever a model folder is taken, the string ``"default"`` names the trained demo model shipped
in ``mfprune/default_model`` (``mfprune.checkpoint.model_location``).
"""

__version__ = "0.1.0"

from mfprune.inspect import ModelReport, inspect_model
from mfprune.loading import load_pretrained
from mfprune.plan import PrunePlan
from mfprune.planner import make_plan
from mfprune.rewrite import RewriteResult, rewrite_checkpoint

_LAZY = ("ProfileStats", "merge_stats", "profile_model")
_LAZY_MODULES = {"run_bench": "mfprune.bench", "BenchReport": "mfprune.bench"}
_LAZY_MODULES |= {"run_shrink": "mfprune.shrink", "load_config": "mfprune.shrink"}


def __getattr__(name: str) -> object:
    """Profiling needs torch; import it only when asked for (the CLI starts faster)."""
    if name in _LAZY:
        from mfprune import profiling

        return getattr(profiling, name)
    if name in _LAZY_MODULES:
        import importlib

        return getattr(importlib.import_module(_LAZY_MODULES[name]), name)
    raise AttributeError(f"module 'mfprune' has no attribute '{name}'")


__all__ = [
    "BenchReport",
    "ModelReport",
    "ProfileStats",
    "PrunePlan",
    "RewriteResult",
    "__version__",
    "inspect_model",
    "load_config",
    "load_pretrained",
    "make_plan",
    "merge_stats",
    "profile_model",
    "rewrite_checkpoint",
    "run_bench",
    "run_shrink",
]

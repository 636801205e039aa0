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

# Every name is imported when first used: `import mfprune` (and so every CLI command) starts
# without torch or transformers, which only the commands that run a model need.
_WHERE = {
    "BenchReport": "mfprune.bench",
    "ModelReport": "mfprune.inspect",
    "ProfileStats": "mfprune.profiling",
    "PrunePlan": "mfprune.plan",
    "RewriteResult": "mfprune.rewrite",
    "inspect_model": "mfprune.inspect",
    "load_config": "mfprune.shrink",
    "load_pretrained": "mfprune.loading",
    "make_plan": "mfprune.planner",
    "merge_stats": "mfprune.profiling",
    "profile_model": "mfprune.profiling",
    "rewrite_checkpoint": "mfprune.rewrite",
    "run_bench": "mfprune.bench",
    "run_shrink": "mfprune.shrink",
}


def __getattr__(name: str) -> object:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'mfprune' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = ["__version__", *_WHERE]

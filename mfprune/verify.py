"""verify_rewrite: check a pruned checkpoint against its source on sample tokens.

The pruned model's logits must equal the source model's logits with the removed experts
masked out of the router and the removed heads zeroed (``mfprune.oracle``). Both models are
loaded in memory, so this is for small models and tests; large rewrites are exact by
construction (the same code paths are checked on every family in the test suite).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mfprune.arch import ArchSpec, spec_for_config
from mfprune.arch.layout import resolve_layout
from mfprune.checkpoint import open_checkpoint
from mfprune.loading import load_pretrained
from mfprune.plan import PrunePlan
from mfprune.rewrite.rewriter import PLAN_FILE


@dataclass(frozen=True)
class VerifyResult:
    max_abs_diff: float  # pruned vs masked original: ~1e-7 in fp32 when exact
    masking_effect: float  # masked vs unmasked original: how much the pruning changes
    tokens: int

    @property
    def exact(self) -> bool:
        return self.max_abs_diff <= 1e-5 * max(1.0, self.masking_effect)


def verify_rewrite(
    source: str | Path,
    pruned: str | Path,
    *,
    spec: ArchSpec | None = None,
    seq_len: int = 32,
    batch: int = 2,
    seed: int = 0,
) -> VerifyResult:
    """Compare ``pruned`` against ``source`` masked by the plan stored in ``pruned``.

    ``spec`` is the adapter the rewrite used (``--arch``); by default the built-in one.
    Multi-token-prediction layers are not compared: transformers does not run them.
    """
    from mfprune.oracle import logits, masked_logits, sample_ids

    ckpt = open_checkpoint(source)
    spec = spec or spec_for_config(ckpt.config)
    layout = resolve_layout(ckpt, spec)
    plan = PrunePlan.load(Path(pruned) / PLAN_FILE)

    def removed(kept: dict[int, tuple[int, ...]], total: int) -> dict[int, list[int]]:
        return {
            layer: sorted(set(range(total)) - set(ids))
            for layer, ids in kept.items()
            if layer < layout.num_layers
        }

    att = layout.attention_experts
    heads = layout.heads
    original = load_pretrained(source, dtype=torch.float32).eval()
    small = load_pretrained(pruned, dtype=torch.float32).eval()  # also per-layer counts
    ids = sample_ids(
        original.config.get_text_config().vocab_size, batch=batch, seq=seq_len, seed=seed
    )
    reference = masked_logits(
        original,
        ids,
        experts=removed(plan.experts, layout.experts.num_experts) or None,
        attention_experts=removed(plan.attention_experts, att.num_experts) if att else None,
        heads=removed(plan.heads, heads.num_heads) if heads and plan.heads else None,
        spec=spec,
    )
    unmasked = logits(original, ids)
    got = logits(small, ids)
    return VerifyResult(
        max_abs_diff=(got - reference).abs().max().item(),
        masking_effect=(reference - unmasked).abs().max().item(),
        tokens=ids.numel(),
    )

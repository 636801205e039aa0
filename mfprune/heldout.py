"""Held-out loss of a model with experts and heads pruned, measured without rewriting it.

``HeldOut.load`` tokenizes texts once (each alone, as the tokenizer encodes it, at most
``max_tokens`` tokens; batches of similar lengths, right-padded); ``heldout_loss`` is the mean
next-token cross-entropy (nats) over every predicted token, with the pruned experts masked out
of their routers and the pruned heads zeroed (``mfprune.oracle.masked_logits``). The test suite
proves the masked original computes exactly what the rewritten checkpoint computes, so these
are the pruned model's losses, at the cost of one forward pass and no checkpoint on disk.

Right padding needs no attention mask: attention is causal, so a real token never sees the
padding after it, and padded positions are left out of the loss.

Used by ``make demo`` (``mfprune.demo``), ``benchmarks/specialize.py`` and the tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mfprune.oracle import masked_logits

#: per decoder layer, ids to prune (experts or heads)
Dropped = Mapping[int, Sequence[int]]


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """The ``text`` field of every record of a JSONL file (the first ``limit`` ones)."""
    texts = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append(json.loads(line)["text"])
            if limit is not None and len(texts) >= limit:
                break
    return texts


@dataclass(frozen=True)
class HeldOut:
    """Tokenized texts, ready to evaluate: batches of (ids, mask), and the predicted tokens."""

    batches: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    tokens: int  # tokens predicted (every token but each text's first)
    texts: int

    @classmethod
    def load(
        cls,
        tokenizer: Any,
        texts: Iterable[str],
        *,
        max_tokens: int = 512,
        batch_size: int = 16,
    ) -> HeldOut:
        encoded = [tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"] for t in texts]
        encoded = [ids for ids in encoded if len(ids) >= 2]
        encoded.sort(key=len)  # batches of similar lengths: little padding
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batches = []
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = True
            batches.append((ids, mask))
        tokens = sum(len(ids) - 1 for ids in encoded)
        return cls(batches=tuple(batches), tokens=tokens, texts=len(encoded))


def heldout_loss(
    model: Any,
    data: HeldOut,
    *,
    experts: Dropped | None = None,
    heads: Dropped | None = None,
) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on ``data``, with ``experts`` /
    ``heads`` (per layer, the ids to prune) masked out. The model is left unchanged."""
    total = 0.0
    for ids, mask in data.batches:
        out = masked_logits(model, ids, experts=experts or None, heads=heads or None)
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100).to(out.device)
        total += F.cross_entropy(
            out[:, :-1].reshape(-1, out.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        ).item()
    return total / data.tokens


def dropped(kept: Mapping[int, Sequence[int]], total: int) -> dict[int, list[int]]:
    """Kept ids per layer (a plan) -> the ids to mask per layer."""
    return {layer: [i for i in range(total) if i not in set(ids)] for layer, ids in kept.items()}

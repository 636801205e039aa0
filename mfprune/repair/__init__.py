"""Repair after pruning (``mfprune prune --repair METHOD --data TASK``).

* ``none`` (the default): the exact rewrite — the pruned checkpoint computes exactly what the
  original computes with the dropped experts masked out of their routers (``mfprune.oracle``).
* ``refit``: layer by layer on the task's tokens, the kept experts are refit so that each
  pruned MoE block reproduces the original block's output: their down projections in closed
  form (ridge least squares, refit.py), then their gate, up and down projections together by
  a few hundred steps of gradient descent on the same objective, early-stopped on calibration
  tokens they do not fit (refine.py; ``steps=0`` stops at the closed form). Shapes, names and
  config are those of the plain prune; only the kept experts' tensors differ.

``merge`` (folding dropped experts into kept ones, HC-SMoE / MC-SMoE style) is not offered: on
the default model it did worse than dropping plus refit (docs/benchmarks.md).

``repaired_tensors`` runs the repair and yields the repaired tensors as source-named tensors in
temporary safetensors files, for ``rewrite_checkpoint(..., replacements=...)`` to stream.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mfprune.arch.layout import ModelLayout
from mfprune.checkpoint import Checkpoint
from mfprune.errors import MfpruneError, did_you_mean
from mfprune.io.reader import TensorInfo
from mfprune.plan import PrunePlan

METHODS = ("none", "refit")
DEFAULT_RIDGE = 1e-3
DEFAULT_STEPS = 300  # refine.py's steps per layer after the closed form


@dataclass(frozen=True)
class RepairResult:
    """What a repair did: method, calibration data, and per layer the reconstruction errors."""

    method: str
    data: str
    data_fingerprint: str
    tokens: int
    documents: int
    ridge: float
    steps: int
    seconds: float
    layers: list[Any] = field(default_factory=list)  # mfprune.repair.refit.LayerFit
    tensors: dict[str, TensorInfo] = field(default_factory=dict)  # source name -> repaired

    def to_dict(self) -> dict[str, Any]:
        """The provenance record (``mfprune_provenance.json``'s ``repair``)."""
        return {
            "method": self.method,
            "data": self.data,
            "data_fingerprint": self.data_fingerprint,
            "tokens": self.tokens,
            "documents": self.documents,
            "ridge": self.ridge,
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "tensors_repaired": len(self.tensors),
            "layers": [fit.to_dict() for fit in self.layers],
        }


def check_method(method: str, data: str | Path | None) -> None:
    """Fail fast on a repair method or data that cannot work (before any work is done)."""
    if method not in METHODS:
        raise MfpruneError(
            f"unknown repair method '{method}'{did_you_mean(method, METHODS)}",
            hint=f"use one of: {', '.join(METHODS)}",
        )
    if method != "none" and data is None:
        raise MfpruneError(
            f"--repair {method} needs the task's data to calibrate on",
            hint="pass --data TASK (the same kind of file `mfprune profile --data` reads)",
        )
    if method == "none" and data is not None:
        raise MfpruneError(
            "--data is only read by --repair", hint="add --repair refit, or drop --data"
        )


@contextmanager
def repaired_tensors(
    ckpt: Checkpoint,
    layout: ModelLayout,
    plan: PrunePlan,
    *,
    method: str,
    data: str | Path,
    max_tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    ridge: float = DEFAULT_RIDGE,
    steps: int = DEFAULT_STEPS,
    sequential: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Iterator[RepairResult]:
    """Repair ``ckpt`` pruned by ``plan``; the yielded result's ``tensors`` live in a temporary
    folder until the context ends. ``sequential``: one decoder layer in memory at a time
    (sequential.py). ``steps``: refine.py's steps per layer (0: the closed form only).
    ``on_start`` gets the number of token passes (per repaired layer: its tokens, and each
    refinement step's tokens), ``on_batch`` each batch's (or step's) tokens."""
    from mfprune.modules import refuse_block_diffusion
    from mfprune.profiling.data import load_token_data
    from mfprune.profiling.run import (
        _pad_id,
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_seq_len,
    )
    from mfprune.repair.refit import refit_model
    from mfprune.repair.tensors import locate_repaired, write_repaired

    check_method(method, data)
    if steps < 0:
        raise MfpruneError(f"--refit-steps must be 0 or more, not {steps}", hint="try 300")
    layout.require_one_stack("--repair")
    layout.require_single_pass("--repair", hint="prune it with --repair none (the exact rewrite)")
    refuse_block_diffusion(ckpt.config, "--repair")
    start = time.perf_counter()
    experts = layout.experts
    if experts is None:
        raise MfpruneError("this model has no routed experts to repair", hint="drop --repair")
    if plan.heads or plan.attention_experts:
        raise MfpruneError(
            "--repair refit repairs MLP experts only, and this plan also prunes heads or "
            "attention experts",
            hint="prune those without --repair, or plan experts only",
        )
    if experts.sub_experts:
        raise MfpruneError(
            "--repair refit refits each kept expert's own down projection, but here experts "
            "are products of sub-experts that several experts share",
            hint="prune this model with --repair none",
        )
    torch_device = resolve_device(device)
    tokenizer = load_tokenizer(ckpt.root)
    seq_len = resolve_seq_len(ckpt.config, seq_len)  # as profile: min(2048, positions)
    tokens = load_token_data(data, tokenizer, seq_len=seq_len, max_tokens=max_tokens)
    if sequential:
        with _sequential_repair(
            ckpt, layout, plan, tokens, tokenizer, device=torch_device, batch_size=batch_size,
            ridge=ridge, steps=steps, on_start=on_start, on_batch=on_batch,
        ) as done:  # fmt: skip
            fits, replaced = done
            yield RepairResult(
                method=method,
                data=str(data),
                data_fingerprint=tokens.fingerprint,
                tokens=tokens.tokens,
                documents=tokens.documents,
                ridge=ridge,
                steps=steps,
                seconds=time.perf_counter() - start,
                layers=fits,
                tensors=replaced,
            )
        return
    model = load_model(ckpt.root, dtype="auto", device=torch_device)
    kept = {
        layer: list(plan.kept_experts(experts, layer))
        for layer in experts.layers
        if len(plan.kept_experts(experts, layer)) < experts.num_experts
    }
    from mfprune.repair.refit import refittable_experts

    modules = refittable_experts(model, kept)  # refused up front
    where = {
        layer: locate_repaired(ckpt, experts, layer, modules[layer], kept[layer], refined=steps > 0)
        for layer in kept
    }
    batches = list(tokens.batches(batch_size=batch_size, pad_id=_pad_id(tokenizer)))
    if on_start is not None:
        on_start(_passes(tokens.tokens, len(kept), steps))
    fits = refit_model(
        model, kept=kept, batches=batches, ridge=ridge, steps=steps, on_batch=on_batch
    )
    with tempfile.TemporaryDirectory(prefix="mfprune-repair-") as tmp:
        replaced: dict[str, TensorInfo] = {}
        for layer in kept:
            replaced.update(write_repaired(Path(tmp), layer, where[layer], kept[layer]))
        del model, modules, where
        yield RepairResult(
            method=method,
            data=str(data),
            data_fingerprint=tokens.fingerprint,
            tokens=tokens.tokens,
            documents=tokens.documents,
            ridge=ridge,
            steps=steps,
            seconds=time.perf_counter() - start,
            layers=fits,
            tensors=replaced,
        )


def _passes(tokens: int, layers: int, steps: int) -> int:
    """Token passes of a repair (progress): per layer, its tokens and each refinement step's."""
    from mfprune.repair.refine import step_tokens

    return layers * (tokens + (steps * step_tokens(tokens) if steps else 0))


@contextmanager
def _sequential_repair(
    ckpt: Checkpoint,
    layout: ModelLayout,
    plan: PrunePlan,
    tokens: Any,
    tokenizer: Any,
    *,
    device: Any,
    batch_size: int,
    ridge: float,
    steps: int,
    on_start: Callable[[int], None] | None,
    on_batch: Callable[[int], None] | None,
) -> Iterator[tuple[list[Any], dict[str, TensorInfo]]]:
    """Refit layer by layer on a meta skeleton; the repaired tensors live in a temporary
    folder until the context ends."""
    from mfprune.profiling.run import _pad_id
    from mfprune.profiling.sequential import build_skeleton, checkpoint_dtype
    from mfprune.repair.sequential import refit_sequential

    experts = layout.experts
    kept = {
        layer: list(plan.kept_experts(experts, layer))
        for layer in experts.layers
        if len(plan.kept_experts(experts, layer)) < experts.num_experts
    }
    model = build_skeleton(ckpt, dtype=checkpoint_dtype(ckpt), device=device)
    batches = list(tokens.batches(batch_size=batch_size, pad_id=_pad_id(tokenizer)))
    if on_start is not None:
        on_start(_passes(tokens.tokens, len(kept), steps))
    with tempfile.TemporaryDirectory(prefix="mfprune-repair-") as tmp:
        yield refit_sequential(
            ckpt, model, experts, kept=kept, batches=batches, folder=Path(tmp), device=device,
            ridge=ridge, steps=steps, on_batch=on_batch,
        )  # fmt: skip

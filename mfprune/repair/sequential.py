"""``--repair refit --sequential``: the refit of refit.py, one decoder layer in memory at a time
(mfprune.profiling.sequential.LayerByLayer), for models bigger than memory.

Every batch's hidden states [B, S, D] are kept on CPU between layers. For each decoder layer in
turn, loaded from the safetensors: if it loses experts, the MoE block's input x [B, S, H] of
every batch is recorded (a pre-hook that stops the layer there), the kept experts are refit
(and refined) from them exactly as in memory, the repaired tensors are written, and then every
batch goes through the layer with its dropped experts masked — the pruned, repaired path the
next layer is refit on. Peak memory: one layer's weights, every batch's hidden states and
block inputs, one layer's normal equations and refinement sample (refine.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mfprune.arch.layout import ExpertLayout
from mfprune.checkpoint import Checkpoint
from mfprune.io.reader import TensorInfo
from mfprune.oracle import masking
from mfprune.repair.refit import (
    LayerFit,
    dropped_experts,
    moe_block_of,
    refit_layer,
    refittable_experts,
)
from mfprune.repair.tensors import locate_repaired, write_repaired


class _Stop(Exception):
    """Raised at the MoE block: the rest of the layer is not needed to record its input."""


def refit_sequential(
    ckpt: Checkpoint,
    model: nn.Module,
    experts: ExpertLayout,
    *,
    kept: Mapping[int, Sequence[int]],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    folder: Path,
    device: torch.device,
    ridge: float,
    steps: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[LayerFit], dict[str, TensorInfo]]:
    """Refit ``model`` (a meta skeleton of ``ckpt``) layer by layer; return the fits and the
    repaired tensors, written into ``folder``, by source name."""
    from mfprune.arch import spec_for_config
    from mfprune.errors import MfpruneError, ModelError
    from mfprune.profiling.sequential import LayerByLayer

    try:  # the masking of the dropped experts reads the skeleton's own config
        spec_for_config(model.config.to_dict())
    except MfpruneError as e:
        raise ModelError(
            f"--repair refit --sequential cannot run {ckpt.config.get('model_type')}: one layer "
            f"at a time it runs as '{model.config.model_type}' ({type(model).__name__}), which "
            "has no adapter of its own",
            hint="repair it without --sequential",
        ) from e
    refittable_experts(model, kept)  # refused before any layer is read (the skeleton has shapes)
    runner = LayerByLayer(ckpt, model, device=device)
    drop = dropped_experts(model, kept)
    fits: list[LayerFit] = []
    replaced: dict[str, TensorInfo] = {}

    def visit(i: int, _layer: nn.Module, run: Callable[[int], torch.Tensor]) -> Any:
        if i not in drop:
            return None
        block = moe_block_of(model, i)
        # as loaded: matched to the disk before the repair changes them
        where = locate_repaired(ckpt, experts, i, block.experts, kept[i], refined=steps > 0)
        inputs = [(_block_input(block, run, b), batches[b][1]) for b in range(len(batches))]
        fits.append(
            refit_layer(
                model, layer=i, kept=kept[i], drop=drop[i], inputs=inputs, ridge=ridge,
                steps=steps, on_batch=on_batch,
            )
        )  # fmt: skip
        replaced.update(write_repaired(folder, i, where, sorted(kept[i])))
        return masking(model, experts={i: drop[i]})  # the next layers see the pruned path

    runner.walk(batches, visit)
    return fits, replaced


def _block_input(block: nn.Module, run: Callable[[int], torch.Tensor], b: int) -> torch.Tensor:
    """Batch ``b``'s input of ``block`` [B, S, H] (the layer stops there)."""
    found: list[torch.Tensor] = []

    def stop(_module: nn.Module, args: tuple[Any, ...]) -> None:
        found.append(args[0].detach())
        raise _Stop

    handle = block.register_forward_pre_hook(stop)
    try:
        run(b)
    except _Stop:
        pass
    finally:
        handle.remove()
    return found[0]

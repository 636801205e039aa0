"""Which on-disk tensors hold the experts' down projections, and the repaired copies of them.

The adapters name every per-expert tensor but not its role, so the down projection of layer L
is found by value: the one per-expert tensor (or stacked tensor) whose bytes equal the loaded
model's ``down_proj`` of a kept expert — exactly one must match, or repair stops. The repaired
tensors are written, in the source dtype and shape and under the source names, into
safetensors files of their own (one per layer), so the rewriter streams them like any other
source tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mfprune.arch.layout import ExpertLayout
from mfprune.checkpoint import Checkpoint
from mfprune.errors import ModelError
from mfprune.io.reader import TensorInfo, read_header
from mfprune.profiling.sequential import read_tensor

_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class DownTensors:
    """Layer ``layer``'s down projections on disk: one per expert, or one stacked [E, H, I]."""

    layer: int
    per_expert: dict[int, TensorInfo]  # expert id -> [H, I]; empty when stacked
    stacked: TensorInfo | None = None  # [E, H, I]


def find_down_tensors(
    ckpt: Checkpoint, experts: ExpertLayout, layer: int, down: torch.Tensor, kept: Sequence[int]
) -> DownTensors:
    """Match ``down`` (the loaded ``down_proj`` [E, H, I], before any repair) to the on-disk
    tensors of ``layer`` (module docstring)."""
    spec, probe = experts.spec, int(kept[0])
    matches: list[DownTensors] = []
    for template in spec.per_expert:
        info = ckpt.tensors.get(template.format(layer=layer, expert=probe))
        if info is not None and _same(info, down[probe]):
            found = {e: ckpt.tensors[template.format(layer=layer, expert=e)] for e in kept}
            matches.append(DownTensors(layer=layer, per_expert=found))
    for st in spec.stacked:
        info = ckpt.tensors.get(st.name.format(layer=layer))
        if info is not None and st.axis == 0 and _same(info, down):
            matches.append(DownTensors(layer=layer, per_expert={}, stacked=info))
    if not matches:
        candidates = [
            ckpt.tensors.get(t.format(layer=layer, expert=probe)) for t in spec.per_expert
        ]
        candidates += [ckpt.tensors.get(st.name.format(layer=layer)) for st in spec.stacked]
        quantized = sorted({c.dtype for c in candidates if c and c.dtype not in _FLOATS})
        if quantized:
            raise ModelError(
                f"layer {layer}: the experts are stored as {', '.join(quantized)}: --repair "
                "writes float tensors only",
                hint="repair a float (F32 / BF16 / F16) checkpoint, or use --repair none",
            )
    if len(matches) != 1:
        raise ModelError(
            f"layer {layer}: {len(matches)} on-disk tensors match the experts' down "
            "projections (expected exactly one)",
            hint="--repair cannot tell where this checkpoint keeps them; use --repair none",
        )
    found = matches[0]
    for info in [found.stacked] if found.stacked else found.per_expert.values():
        if info.dtype not in _FLOATS:
            raise ModelError(
                f"{info.name} is {info.dtype}: --repair writes float tensors only",
                hint="repair a float (F32 / BF16 / F16) checkpoint, or use --repair none",
            )
    return found


def _same(info: TensorInfo, value: torch.Tensor) -> bool:
    if info.dtype not in _FLOATS or tuple(info.shape) != tuple(value.shape):
        return False
    disk = read_tensor(info)
    return torch.equal(disk, value.detach().to("cpu", disk.dtype))


def write_repaired(
    folder: Path, where: DownTensors, down: torch.Tensor, kept: Sequence[int]
) -> dict[str, TensorInfo]:
    """Write the repaired ``down`` [E, H, I] of the kept experts as source-named tensors in
    ``folder``; return their infos by source name."""
    from safetensors.torch import save_file

    out: dict[str, torch.Tensor] = {}
    if where.stacked is not None:
        stacked = read_tensor(where.stacked)
        for k in kept:
            stacked[k] = down[k].detach().to("cpu", stacked.dtype)
        out[where.stacked.name] = stacked
    else:
        for k in kept:
            info = where.per_expert[k]
            out[info.name] = down[k].detach().to("cpu", _FLOATS[info.dtype]).contiguous()
    path = folder / f"layer-{where.layer:05d}.safetensors"
    save_file(out, str(path), metadata={"format": "pt"})
    return read_header(path).tensors

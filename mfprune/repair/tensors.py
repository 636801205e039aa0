"""Which on-disk tensors hold the experts' repaired weights, and the repaired copies of them.

The adapters name every per-expert tensor but not its role, so a loaded expert parameter of
layer L (``down_proj`` [E, H, I], ``gate_up_proj`` [E, 2I, H]) is found on disk by value: the
one per-expert tensor (or stacked tensor) whose bytes equal the loaded parameter of a kept
expert — exactly one must match, or repair stops. A fused ``gate_up_proj`` that the checkpoint
stores as separate gate and up tensors (transformers concatenates them on load) is found as its
two halves. The repaired tensors are written, in the source dtype and shape and under the
source names, into safetensors files of their own (one per layer), so the rewriter streams
them like any other source tensor.
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
class OnDisk:
    """Where rows ``rows`` of each expert's slice of one loaded parameter of layer ``layer``
    live on disk: one tensor per expert, or one stacked [E, ...]."""

    layer: int
    per_expert: dict[int, TensorInfo]  # expert id -> its tensor; empty when stacked
    stacked: TensorInfo | None = None  # [E, ...]
    rows: tuple[int, int] | None = None  # (start, stop) on the slice's first axis; None: all


def find_down_tensors(
    ckpt: Checkpoint, experts: ExpertLayout, layer: int, down: torch.Tensor, kept: Sequence[int]
) -> list[OnDisk]:
    """Match ``down`` (the loaded ``down_proj`` [E, H, I], before any repair) to the on-disk
    tensors of ``layer`` (module docstring)."""
    return find_expert_tensors(ckpt, experts, layer, down, kept, what="down projections")


def find_gate_up_tensors(
    ckpt: Checkpoint, experts: ExpertLayout, layer: int, gate_up: torch.Tensor, kept: Sequence[int]
) -> list[OnDisk]:
    """Match ``gate_up`` (the loaded ``gate_up_proj`` [E, 2I, H]): stored fused, or as a gate
    and an up tensor (its two halves)."""
    return find_expert_tensors(
        ckpt, experts, layer, gate_up, kept, what="gate/up projections", halves=True
    )


def find_expert_tensors(
    ckpt: Checkpoint,
    experts: ExpertLayout,
    layer: int,
    value: torch.Tensor,
    kept: Sequence[int],
    *,
    what: str,
    halves: bool = False,
) -> list[OnDisk]:
    """The on-disk tensors of ``layer`` that hold ``value`` [E, a, b] (loaded, before any
    repair): one that holds it whole or, with ``halves``, two that hold [:, :a/2] and
    [:, a/2:]."""
    whole = _matches(ckpt, experts, layer, value, kept, None)
    if len(whole) == 1 or not halves:
        return [_one(whole, ckpt, experts, layer, kept, what)]
    a = value.shape[1] // 2
    parts = [
        _matches(ckpt, experts, layer, value[:, rows[0] : rows[1]], kept, rows)
        for rows in ((0, a), (a, 2 * a))
    ]
    if whole or any(len(p) != 1 for p in parts):
        return [_one(whole, ckpt, experts, layer, kept, what)]  # raises, with the reason
    return [p[0] for p in parts]


def _matches(
    ckpt: Checkpoint,
    experts: ExpertLayout,
    layer: int,
    value: torch.Tensor,
    kept: Sequence[int],
    rows: tuple[int, int] | None,
) -> list[OnDisk]:
    spec, probe = experts.spec, int(kept[0])
    found: list[OnDisk] = []
    for template in spec.per_expert:
        info = ckpt.tensors.get(template.format(layer=layer, expert=probe))
        if info is not None and _same(info, value[probe]):
            names = {e: ckpt.tensors[template.format(layer=layer, expert=e)] for e in kept}
            found.append(OnDisk(layer=layer, per_expert=names, rows=rows))
    for st in spec.stacked:
        info = ckpt.tensors.get(st.name.format(layer=layer))
        if info is not None and st.axis == 0 and _same(info, value):
            found.append(OnDisk(layer=layer, per_expert={}, stacked=info, rows=rows))
    return found


def _one(
    matches: list[OnDisk],
    ckpt: Checkpoint,
    experts: ExpertLayout,
    layer: int,
    kept: Sequence[int],
    what: str,
) -> OnDisk:
    """The single match, or the reason there is none."""
    spec, probe = experts.spec, int(kept[0])
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
            f"layer {layer}: {len(matches)} on-disk tensors match the experts' {what} "
            "(expected exactly one)",
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
    folder: Path, layer: int, parts: Sequence[tuple[OnDisk, torch.Tensor]], kept: Sequence[int]
) -> dict[str, TensorInfo]:
    """Write the repaired values of the kept experts (each part: where it lives on disk and the
    loaded parameter [E, ...] it comes from) as source-named tensors in ``folder``; return
    their infos by source name."""
    from safetensors.torch import save_file

    out: dict[str, torch.Tensor] = {}
    for where, value in parts:
        start, stop = where.rows if where.rows is not None else (0, value.shape[1])
        if where.stacked is not None:
            stacked = read_tensor(where.stacked)
            for k in kept:
                stacked[k] = value[k, start:stop].detach().to("cpu", stacked.dtype)
            out[where.stacked.name] = stacked
            continue
        for k in kept:
            info = where.per_expert[k]
            part = value[k, start:stop].detach().to("cpu", _FLOATS[info.dtype])
            out[info.name] = part.contiguous()
    path = folder / f"layer-{layer:05d}.safetensors"
    save_file(out, str(path), metadata={"format": "pt"})
    return read_header(path).tensors


def locate_repaired(
    ckpt: Checkpoint,
    experts: ExpertLayout,
    layer: int,
    module: torch.nn.Module,
    kept: Sequence[int],
    *,
    refined: bool,
) -> list[tuple[OnDisk, torch.Tensor]]:
    """The on-disk homes of the parameters that ``--repair refit`` changes in layer
    ``layer``'s experts ``module`` (before any repair): ``down_proj``, and ``gate_up_proj``
    when the refinement runs; each with the loaded parameter, for ``write_repaired``."""
    down, gate_up = module.down_proj, module.gate_up_proj
    parts = [(w, down) for w in find_down_tensors(ckpt, experts, layer, down, kept)]
    if refined:
        parts += [(w, gate_up) for w in find_gate_up_tensors(ckpt, experts, layer, gate_up, kept)]
    return parts

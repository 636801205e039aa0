"""Keeping some slices of one axis of a row-major tensor, expressed as source byte ranges."""

from __future__ import annotations

import math
from collections.abc import Iterable

from mfprune.io.reader import TensorInfo
from mfprune.io.writer import ByteRange, OutTensor, read_bytes

MAX_RANGES = 256  # beyond this many ranges, read the tensor once and gather in memory


def blocks_for(ids: Iterable[int], width: int) -> list[tuple[int, int]]:
    """Element blocks ``[i*width, (i+1)*width)`` for sorted ``ids``, adjacent ones merged."""
    blocks: list[tuple[int, int]] = []
    for i in ids:
        a, b = i * width, (i + 1) * width
        if blocks and blocks[-1][1] == a:
            blocks[-1] = (blocks[-1][0], b)
        else:
            blocks.append((a, b))
    return blocks


def slice_tensor(
    info: TensorInfo, *, axis: int, blocks: list[tuple[int, int]], name: str | None = None
) -> OutTensor:
    """An output tensor holding the ``blocks`` (element ranges along ``axis``) of ``info``.

    The result is byte-identical to ``torch.cat([t.narrow(axis, a, b - a) for a, b in blocks],
    axis)`` without ever materialising ``t``.
    """
    shape = info.shape
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1 :]) * info.itemsize  # bytes per step along the axis
    kept = sum(b - a for a, b in blocks)
    ranges: list[ByteRange] = []
    for o in range(outer):
        for a, b in blocks:
            start, length = info.start + (o * shape[axis] + a) * inner, (b - a) * inner
            if ranges and ranges[-1][0] + ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
            elif length:
                ranges.append((start, length))
    new_shape = (*shape[:axis], kept, *shape[axis + 1 :])
    nbytes = math.prod(new_shape) * info.itemsize
    if len(ranges) <= MAX_RANGES:
        return OutTensor(name or info.name, info.dtype, new_shape, nbytes, info, ranges=ranges)
    whole = memoryview(read_bytes(info))
    data = b"".join(whole[s - info.start : s - info.start + n] for s, n in ranges)
    return OutTensor(name or info.name, info.dtype, new_shape, nbytes, info, data=data)


def copy_tensor(info: TensorInfo, *, name: str | None = None) -> OutTensor:
    """An output tensor identical to ``info`` (optionally renamed)."""
    return OutTensor(
        name or info.name,
        info.dtype,
        info.shape,
        info.nbytes,
        info,
        ranges=[(info.start, info.nbytes)],
    )

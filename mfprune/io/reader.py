"""Lazy, validating reader of safetensors headers: tensor names, dtypes, shapes, byte ranges.

Nothing here loads tensor data; the rewriter copies byte ranges straight from these offsets.
Every header is checked before use (size, JSON, dtypes, shapes against data lengths, bounds),
so a corrupted or hostile file fails with a clear message instead of a crash or a huge read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from mfprune.errors import CheckpointError

DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: ``file`` at absolute offset ``start``, ``nbytes`` long."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]  # in on-disk order
    metadata: dict[str, str]
    raw_header: bytes
    file_size: int


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header of one ``.safetensors`` file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"file is {size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise _corrupt(path, f"header claims {n:,} bytes but the file has {size:,}")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _corrupt(path, "header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _corrupt(path, "__metadata__ is not an object")
    data_start, data_len = 8 + n, size - 8 - n
    entries = []
    for name, entry in header.items():
        entries.append(_parse_entry(path, name, entry, data_len))
    entries.sort(key=lambda e: e[1])
    end = 0
    tensors: dict[str, TensorInfo] = {}
    for (name, begin, stop), (dtype, shape) in ((e[:3], e[3:]) for e in entries):
        if begin < end:
            raise _corrupt(path, f"tensor '{name}' overlaps the previous tensor's bytes")
        end = stop
        tensors[name] = TensorInfo(
            name=name,
            dtype=dtype,
            shape=shape,
            file=path,
            start=data_start + begin,
            nbytes=stop - begin,
        )
    return SafetensorsHeader(
        path=path, tensors=tensors, metadata=metadata, raw_header=raw, file_size=size
    )


def _parse_entry(
    path: Path, name: str, entry: object, data_len: int
) -> tuple[str, int, int, str, tuple[int, ...]]:
    if not isinstance(entry, dict):
        raise _corrupt(path, f"entry '{name}' is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise _corrupt(path, f"tensor '{name}' has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _corrupt(path, f"tensor '{name}' has a malformed shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise _corrupt(
            path, f"tensor '{name}' has data offsets {offsets!r} outside the {data_len:,}-byte data"
        )
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise _corrupt(
            path,
            f"tensor '{name}' {dtype}{shape} needs {expected:,} bytes "
            f"but its offsets span {offsets[1] - offsets[0]:,}",
        )
    return name, offsets[0], offsets[1], dtype, tuple(shape)


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"corrupted safetensors file {path.name}: {why}")

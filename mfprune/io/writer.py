"""Streaming safetensors writer: a header computed up front, then data copied range by range.

A tensor's bytes come either from byte ranges of a source file (copied kernel-side with
``copy_file_range``: unchanged tensors and expert-axis slices never enter Python memory) or
from a bytes object (tensors gathered along an inner axis, e.g. o_proj columns).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mfprune.io.reader import TensorInfo

ByteRange = tuple[int, int]  # (absolute offset in the source file, length)
_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output: its name, dtype, shape and where its bytes come from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    source: TensorInfo
    ranges: Sequence[ByteRange] = ()  # byte ranges of source.file, concatenated
    data: bytes | None = None  # or the bytes themselves


def write_shard(path: Path, tensors: Iterable[OutTensor], *, metadata: dict[str, str]) -> None:
    """Write one safetensors file holding ``tensors`` in the order given (not yet fsynced:
    the caller syncs, e.g. in the background while the next shard is written)."""
    tensors = list(tensors)
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as safetensors does
    sources: dict[Path, int] = {}
    try:
        with open(path, "wb") as out:
            out.write(len(raw).to_bytes(8, "little") + raw)
            out.flush()
            for t in tensors:
                if t.data is not None:
                    out.write(t.data)
                    continue
                out.flush()
                if t.source.file not in sources:
                    sources[t.source.file] = os.open(t.source.file, os.O_RDONLY)
                for start, length in t.ranges:
                    _copy_range(sources[t.source.file], out.fileno(), start, length)
            out.flush()
    finally:
        for fd in sources.values():
            os.close(fd)


def _copy_range(src: int, dst: int, start: int, length: int) -> None:
    """Append ``length`` bytes of ``src`` from ``start`` to ``dst`` (at its current position)."""
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < length:
        n = min(_CHUNK, length - done)
        if use_cfr:
            try:
                copied = os.copy_file_range(src, dst, n, start + done)
            except OSError:  # cross-device or unsupported filesystem: plain reads
                use_cfr = False
                continue
        else:
            copied = os.write(dst, os.pread(src, n, start + done))
        if copied <= 0:
            raise OSError(f"short copy: {done} of {length} bytes")
        done += copied


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_bytes(info: TensorInfo, ranges: Sequence[ByteRange] | None = None) -> bytes:
    """The bytes of ``info`` (or of the given ranges of its file)."""
    fd = os.open(info.file, os.O_RDONLY)
    try:
        parts = [os.pread(fd, n, s) for s, n in (ranges or [(info.start, info.nbytes)])]
    finally:
        os.close(fd)
    return b"".join(parts)

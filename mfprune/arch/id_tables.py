"""Tensors whose values are expert ids: DeepSeek-V4's hash-routed layers choose a token's
experts from a fixed table ``tid2eid [V, K]`` (token id -> its K expert ids) instead of the
router's top-k. Pruning keeps every expert such a table names (dropping one would change
which experts those tokens use, which no router mask reproduces) and rewrites the values to
the kept experts' new numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mfprune.errors import ModelError
from mfprune.io.reader import TensorInfo

_INT_DTYPES = {"I64": np.int64, "I32": np.int32, "I16": np.int16, "U8": np.uint8, "I8": np.int8}


@dataclass(frozen=True)
class IdTable:
    """One layer's id table, checked: ``named`` holds every expert id it contains."""

    info: TensorInfo
    named: frozenset[int]

    def remapped(self, kept: Sequence[int]) -> bytes:
        """The table's bytes with each id replaced by its kept expert's new number (every id
        it names is in ``kept``: ``PrunePlan.validate`` checked)."""
        values = read_ids(self.info)
        new = np.full(max(self.named, default=0) + 1, -1, dtype=values.dtype)
        for n, old in enumerate(kept):
            if old < new.size:
                new[old] = n
        out = new[values]
        assert (out >= 0).all(), "a plan dropped an expert the id table names"
        return out.astype(values.dtype.newbyteorder("<")).tobytes()


def read_ids(info: TensorInfo) -> np.ndarray:
    """The integer values of ``info`` (little-endian on disk), shaped as stored."""
    dtype = _INT_DTYPES.get(info.dtype)
    if dtype is None:
        raise ModelError(
            f"{info.name} holds expert ids but is stored as {info.dtype}",
            hint="an id table must be an integer tensor",
        )
    with open(info.file, "rb") as f:
        f.seek(info.start)
        raw = f.read(info.nbytes)
    if len(raw) != info.nbytes:
        raise ModelError(f"{info.file.name} ends inside tensor '{info.name}'")
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(info.shape)


def resolve_id_tables(
    templates: Iterable[str], tensors: Mapping[str, TensorInfo], *, layer: int, num_experts: int
) -> tuple[IdTable, ...]:
    """The id tables present in ``layer`` (hash layers have them, the others not), each
    checked to name only experts 0..E-1."""
    found = []
    for template in templates:
        info = tensors.get(template.format(layer=layer))
        if info is None:
            continue
        values = read_ids(info)
        named = frozenset(int(v) for v in np.unique(values))
        bad = sorted(v for v in named if not 0 <= v < num_experts)
        if bad:
            raise ModelError(
                f"{info.name} routes tokens to experts {bad[:5]}, but layer {layer} has "
                f"{num_experts} experts",
                hint="the config does not match the weights",
            )
        found.append(IdTable(info=info, named=named))
    return tuple(found)

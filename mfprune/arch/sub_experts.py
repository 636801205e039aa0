"""Product experts (CartesianMoE): routed experts built from shared sub-experts.

A layer has S sets of sub-experts; routed expert e is the product of one sub-expert per set,
``table[e] = (i_1, ..., i_S)`` (see ``SubExpertSpec``). Pruning keeps the router rows of the
kept experts, as for any family, and a sub-expert only while some kept expert still uses it:
the others are *dead* and their tensors go; the survivors of each set are renumbered in order
and the table rewritten with the new numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mfprune.arch.expert_tensors import ExpertTensor, expert_prefix, first_missing
from mfprune.arch.spec import SubExpertSpec
from mfprune.errors import ModelError
from mfprune.io.reader import TensorInfo

Table = tuple[tuple[int, ...], ...]  # [E][S]: routed expert -> its sub-expert in each set


@dataclass(frozen=True)
class SubExpertLayer:
    """One MoE layer's product structure, checked against its tensors."""

    layer: int
    table: Table  # [E][S]
    counts: tuple[int, ...]  # [S]: sub-experts per set
    # set s -> sub-expert i -> its tensors (every tensor under its prefix)
    tensors: tuple[Mapping[int, tuple[ExpertTensor, ...]], ...]

    def used(self, kept: Iterable[int]) -> tuple[tuple[int, ...], ...]:
        """Per set, the sub-experts that some expert of ``kept`` uses (ascending)."""
        rows = [self.table[e] for e in kept]
        return tuple(tuple(sorted({row[s] for row in rows})) for s in range(len(self.counts)))

    def dead(self, kept: Iterable[int]) -> tuple[tuple[int, ...], ...]:
        """Per set, the sub-experts no expert of ``kept`` uses: pruning frees them."""
        used = self.used(kept)
        return tuple(
            tuple(i for i in range(n) if i not in used[s]) for s, n in enumerate(self.counts)
        )

    def kept_table(self, kept: Sequence[int]) -> list[list[int]]:
        """The table of the pruned layer: kept experts in order, sub-experts renumbered."""
        new_id = [{old: new for new, old in enumerate(ids)} for ids in self.used(kept)]
        return [[new_id[s][i] for s, i in enumerate(self.table[e])] for e in kept]

    def held_params(self, kept: Iterable[int]) -> int:
        """Parameters of the sub-experts that the experts ``kept`` use."""
        return sum(self.params(s, i) for s, ids in enumerate(self.used(kept)) for i in ids)

    def params(self, s: int, i: int) -> int:
        """Parameters of sub-expert ``i`` of set ``s``."""
        return sum(math.prod(t.info.shape) for t in self.tensors[s].get(i, ()))


def sub_prefixes(spec: SubExpertSpec, layer: int) -> tuple[str, ...]:
    """Each set's sub-expert prefix in ``layer`` (``...sub_experts.0.{expert}.``), by set."""
    return tuple(expert_prefix(names[0]).replace("{layer}", str(layer)) for names in spec.sets)


def _pattern(prefix: str) -> re.Pattern[str]:
    head, tail = prefix.split("{expert}")
    return re.compile(re.escape(head) + r"(\d+)" + re.escape(tail))


def is_sub_expert_tensor(spec: SubExpertSpec, layer: int, name: str) -> bool:
    """Whether ``name`` lies under one of ``layer``'s sub-expert prefixes."""
    return any(_pattern(p).match(name) for p in sub_prefixes(spec, layer))


def resolve_sub_experts(
    cfg: dict[str, Any],
    spec: SubExpertSpec,
    *,
    layer: int,
    num_experts: int,
    tensors: Iterable[TensorInfo],
) -> SubExpertLayer:
    """The product structure of ``layer`` from ``config.json``, checked against the router's
    ``num_experts`` rows and the layer's tensors; a ModelError names the first mismatch."""
    counts = _counts(cfg, spec, layer)
    table = _table(cfg, spec, layer, counts)
    if len(table) != num_experts:
        raise ModelError(
            f"layer {layer}'s sub-expert table has {len(table)} experts but its router has "
            f"{num_experts} rows",
            hint=f"the config's {spec.table_key} / {spec.counts_key} do not match the weights",
        )
    for e, row in enumerate(table):
        if len(row) != len(counts) or any(not 0 <= i < n for i, n in zip(row, counts, strict=True)):
            raise ModelError(
                f"layer {layer}: expert {e}'s sub-experts {list(row)} do not fit the set sizes "
                f"{list(counts)}",
                hint=f"fix config.json's {spec.table_key}",
            )
    found: list[dict[int, list[ExpertTensor]]] = [{} for _ in spec.sets]
    prefixes = sub_prefixes(spec, layer)
    for info in tensors:
        for s, prefix in enumerate(prefixes):
            match = _pattern(prefix).match(info.name)
            if match:
                found[s].setdefault(int(match.group(1)), []).append(ExpertTensor(info, prefix))
                break
    for s, (names, n) in enumerate(zip(spec.sets, counts, strict=True)):
        beyond = sorted(i for i in found[s] if i >= n)
        if beyond:
            raise ModelError(
                f"{found[s][beyond[0]][0].info.name} exists but set {s} of layer {layer} has "
                f"{n} sub-experts",
                hint="the config does not match the weights; fix config.json",
            )
        for i in range(n):
            name = first_missing(found[s].get(i, ()), names, layer=layer, expert=i)
            if name is not None:
                raise ModelError(
                    f"sub-expert tensor {name} is missing (set {s} has {n} sub-experts)",
                    hint="the config does not match the weights",
                )
    return SubExpertLayer(
        layer=layer,
        table=table,
        counts=counts,
        tensors=tuple({i: tuple(ts) for i, ts in sorted(by_sub.items())} for by_sub in found),
    )


def _counts(cfg: dict[str, Any], spec: SubExpertSpec, layer: int) -> tuple[int, ...]:
    per_layer = cfg.get(spec.layer_counts_key)
    key = spec.counts_key
    value = cfg.get(key)
    if isinstance(per_layer, dict) and str(layer) in per_layer:
        key, value = f"{spec.layer_counts_key}[{layer}]", per_layer[str(layer)]
    if (
        not isinstance(value, list)
        or len(value) != len(spec.sets)
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value)
    ):
        raise ModelError(
            f"config.json '{key}' = {value!r} is not {len(spec.sets)} sub-expert counts",
            hint=f"the adapter names {len(spec.sets)} sets of sub-experts; fix config.json",
        )
    return tuple(value)


def _table(cfg: dict[str, Any], spec: SubExpertSpec, layer: int, counts: tuple[int, ...]) -> Table:
    tables = cfg.get(spec.table_key)
    if tables is None:  # the full grid, row-major: expert e = (e // n_2, e % n_2) for S = 2
        grid: list[tuple[int, ...]] = [()]
        for n in counts:
            grid = [(*row, i) for row in grid for i in range(n)]
        return tuple(grid)
    rows = tables.get(str(layer)) if isinstance(tables, dict) else None
    if not isinstance(rows, list) or not all(
        isinstance(r, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in r)
        for r in rows
    ):
        raise ModelError(
            f"config.json '{spec.table_key}' has no valid table for layer {layer} (got {rows!r})",
            hint="each MoE layer needs a list of sub-expert index lists, one per routed expert",
        )
    return tuple(tuple(r) for r in rows)

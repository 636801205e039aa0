"""ProfileStats: how a task uses every expert, attention expert and head — saved, loaded, merged.

Every number is a sum over the profiled (non-padding) tokens, so stats of disjoint data add:
``merge_stats`` of the stats of two halves of a data set equals the stats of the whole. The file is
safetensors plus string metadata (docs/stats-format.md); ``load`` checks all of it.

Letters: L MoE layers (of one kind), E experts, K top-k, L_all decoder layers, H query heads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from mfprune.errors import CheckpointError, StatsError
from mfprune.io.outputs import Input, OutputTarget, claim_file, write_file

FORMAT = "mfprune.stats/1"
EXPERT_KINDS = ("experts", "attention_experts")
_EXPERT_SUMS = ("count", "soft", "ean", "reap_num")


@dataclass(frozen=True)
class ExpertStats:
    """Per MoE layer and expert, sums over the tokens routed to it (T_i).

    g_i(t) is the routing weight the model really applied, E_i(x) the expert's output before
    weighting. REAP (BRIEF §2) is ``reap_num / count``; frequency is ``count``.
    """

    layers: tuple[int, ...]  # [L] decoder-layer index of each row
    top_k: int  # K: every token is routed to K experts
    count: torch.Tensor  # [L, E] int64: |T_i|
    soft: torch.Tensor  # [L, E] float64: Σ_{t∈T_i} g_i(t)
    ean: torch.Tensor  # [L, E] float64: Σ_{t∈T_i} ‖E_i(x_t)‖₂
    reap_num: torch.Tensor  # [L, E] float64: Σ_{t∈T_i} g_i(t)·‖E_i(x_t)‖₂
    tokens: torch.Tensor  # [L] int64: token passes through each layer (tokens x passes)
    # [L] int64: slots routed to router rows that are not prunable experts (LongCat's
    # zero-compute experts, Zaya's skip class) or given weight 0; None when there are none.
    # count sums to tokens * K minus these.
    extra_slots: torch.Tensor | None = None
    # [L] int64: how many times each layer runs per token (looped layers, Inkling 2 Loop: more
    # than once, every pass summed); None: every layer once
    passes: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.count.shape[1]

    def layer_passes(self) -> torch.Tensor:
        """[L] int64: how many times each layer runs per token."""
        return _passes(self.passes, len(self.layers))

    def reap(self) -> torch.Tensor:
        """[L, E] mean of g·‖E(x)‖ over routed tokens; 0 for experts never routed to."""
        return torch.where(self.count > 0, self.reap_num / self.count.clamp_min(1), 0.0)

    def add(self, other: ExpertStats) -> ExpertStats:
        extra = [t for t in (self.extra_slots, other.extra_slots) if t is not None]
        return replace(
            self,
            **{k: getattr(self, k) + getattr(other, k) for k in (*_EXPERT_SUMS, "tokens")},
            extra_slots=sum(extra[1:], extra[0]) if extra else None,
        )


@dataclass(frozen=True)
class HeadStats:
    """Per attention layer and query head: Σ_t ‖o_proj[:, head h's columns] · (head h's
    output)‖₂, the size of what the head writes into the residual stream. ``layers`` are all
    decoder layers, or a hybrid's attention layers (L_att of them)."""

    layers: tuple[int, ...]  # [L_att]
    usage: torch.Tensor  # [L_att, H] float64
    tokens: torch.Tensor  # [L_att] int64: token passes (tokens x passes)
    passes: torch.Tensor | None = None  # [L_att] int64, as ExpertStats.passes

    def add(self, other: HeadStats) -> HeadStats:
        return replace(self, usage=self.usage + other.usage, tokens=self.tokens + other.tokens)

    def layer_passes(self) -> torch.Tensor:
        """[L_att] int64: how many times each layer runs per token."""
        return _passes(self.passes, len(self.layers))


def _passes(passes: torch.Tensor | None, rows: int) -> torch.Tensor:
    return passes if passes is not None else torch.ones(rows, dtype=torch.int64)


def looped(passes: torch.Tensor | None) -> bool:
    """Whether a ``passes`` tensor names a layer that runs more than once per token (the file
    records it only then)."""
    return passes is not None and bool((passes != 1).any())


@dataclass(frozen=True)
class StatsMeta:
    """Where the stats came from; stored as the file's string metadata."""

    family: str
    model_type: str
    model_fingerprint: str  # Checkpoint.fingerprint(): config.json + shard headers
    data_fingerprint: str  # sha256 of the token ids (of all parts, once merged)
    data_parts: tuple[str, ...]  # the data fingerprint of each profiled part
    tokens: int  # non-padding tokens profiled
    documents: int
    dtype: str  # the dtype the model ran in ("mixed" after merging different ones)
    mfprune_version: str
    format: str = FORMAT


@dataclass(frozen=True)
class ProfileStats:
    """The artifact ``mfprune profile`` writes: expert, attention-expert and head usage."""

    meta: StatsMeta
    experts: ExpertStats
    attention_experts: ExpertStats | None = None  # JetMoE's mixture of attention
    heads: HeadStats | None = None  # None where the attention has no per-head o_proj

    def save(self, path: str | Path | OutputTarget) -> Path:
        """Write atomically (temp file beside ``path``, then rename); return the path.
        ``path`` may be a target already claimed with ``check_stats_out``."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, str] = {
            "format": self.meta.format,
            "mfprune_version": self.meta.mfprune_version,
            "family": self.meta.family,
            "model_type": self.meta.model_type,
            "model_fingerprint": self.meta.model_fingerprint,
            "data_fingerprint": self.meta.data_fingerprint,
            "data_parts": json.dumps(list(self.meta.data_parts)),
            "tokens": str(self.meta.tokens),
            "documents": str(self.meta.documents),
            "dtype": self.meta.dtype,
        }
        for kind in EXPERT_KINDS:
            stats: ExpertStats | None = getattr(self, kind)
            if stats is None:
                continue
            meta[f"{kind}.top_k"] = str(stats.top_k)
            tensors[f"{kind}.layers"] = torch.tensor(stats.layers, dtype=torch.int64)
            for name in (*_EXPERT_SUMS, "tokens"):
                tensors[f"{kind}.{name}"] = getattr(stats, name)
            if stats.extra_slots is not None and bool(stats.extra_slots.any()):
                tensors[f"{kind}.extra_slots"] = stats.extra_slots
            if looped(stats.passes):
                tensors[f"{kind}.passes"] = stats.layer_passes()
        if self.heads is not None:
            tensors["heads.layers"] = torch.tensor(self.heads.layers, dtype=torch.int64)
            tensors["heads.usage"] = self.heads.usage
            tensors["heads.tokens"] = self.heads.tokens
            if looped(self.heads.passes):
                tensors["heads.passes"] = self.heads.layer_passes()
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        target = path if isinstance(path, OutputTarget) else check_stats_out(path)
        return write_file(target, sorted_metadata(save(tensors, metadata=meta)))

    @classmethod
    def load(cls, path: str | Path) -> ProfileStats:
        """Read and check a stats file; raise StatsError naming what is wrong."""
        return _load(Path(path))

    def summary(self) -> dict[str, Any]:
        """What a person wants to know about the stats (printed by the CLI)."""
        out: dict[str, Any] = {
            "family": self.meta.family,
            "tokens": self.meta.tokens,
            "documents": self.meta.documents,
            "parts": len(self.meta.data_parts),
            "dtype": self.meta.dtype,
            "model_fingerprint": self.meta.model_fingerprint,
            "data_fingerprint": self.meta.data_fingerprint,
        }
        for kind in EXPERT_KINDS:
            s: ExpertStats | None = getattr(self, kind)
            if s is not None:
                never = {
                    L: (s.count[i] == 0).nonzero().flatten().tolist()
                    for i, L in enumerate(s.layers)
                }
                out[kind] = {
                    "layers": list(s.layers),
                    "experts": s.num_experts,
                    "top_k": s.top_k,
                    "never_routed": {L: ids for L, ids in never.items() if ids},
                }
        if self.heads is not None:
            out["heads"] = {"layers": len(self.heads.layers), "heads": self.heads.usage.shape[1]}
        return out


# ------------------------------------------------------------------------------------- merge


def merge_stats(*parts: ProfileStats) -> ProfileStats:
    """Add the stats of disjoint data profiled on the same model.

    Raises:
        StatsError: fewer than two parts, another model, different layers, or the same data
            twice.
    """
    if len(parts) < 2:
        raise StatsError("merge needs at least two stats files", hint="name two or more files")
    first = parts[0]
    seen: dict[str, int] = {}
    for n, part in enumerate(parts):
        if part.meta.model_fingerprint != first.meta.model_fingerprint:
            raise StatsError(
                f"stats #{n + 1} come from another model than stats #1 (model fingerprint "
                f"{part.meta.model_fingerprint[:12]}… vs {first.meta.model_fingerprint[:12]}…)",
                hint="merge only stats profiled on the same checkpoint",
            )
        for fp in part.meta.data_parts:
            if fp in seen:
                raise StatsError(
                    f"stats #{seen[fp] + 1} and #{n + 1} hold the same data "
                    f"(data fingerprint {fp[:12]}…): merging would count it twice",
                    hint="merge stats of disjoint data, e.g. --shard 0/2 and --shard 1/2",
                )
            seen[fp] = n
    merged = first
    for part in parts[1:]:
        merged = _add(merged, part)
    data_parts = tuple(sorted(seen))
    dtypes = {p.meta.dtype for p in parts}
    meta = replace(
        merged.meta,
        data_parts=data_parts,
        data_fingerprint=hashlib.sha256("\n".join(data_parts).encode()).hexdigest(),
        dtype=dtypes.pop() if len(dtypes) == 1 else "mixed",
        mfprune_version=_version(),
    )
    return replace(merged, meta=meta)


def _add(a: ProfileStats, b: ProfileStats) -> ProfileStats:
    for kind in (*EXPERT_KINDS, "heads"):
        if _Shape.of(getattr(a, kind)) != _Shape.of(getattr(b, kind)):
            raise StatsError(
                f"the stats disagree on {kind} (layers, shapes, top-k or passes per layer) "
                "although they name "
                "the same model",
                hint="one of the files was edited; re-create it with `mfprune profile`",
            )
    return replace(
        a,
        meta=replace(
            a.meta,
            tokens=a.meta.tokens + b.meta.tokens,
            documents=a.meta.documents + b.meta.documents,
        ),
        experts=a.experts.add(b.experts),
        attention_experts=a.attention_experts.add(b.attention_experts)
        if a.attention_experts and b.attention_experts
        else None,
        heads=a.heads.add(b.heads) if a.heads and b.heads else None,
    )


@dataclass(frozen=True)
class _Shape:
    """What two stats must share to be added."""

    layers: tuple[int, ...]
    shape: tuple[int, ...]
    top_k: int
    passes: tuple[int, ...]

    @classmethod
    def of(cls, s: ExpertStats | HeadStats | None) -> _Shape | None:
        if s is None:
            return None
        passes = tuple(s.layer_passes().tolist())
        if isinstance(s, HeadStats):
            return cls(s.layers, tuple(s.usage.shape), 0, passes)
        return cls(s.layers, tuple(s.count.shape), s.top_k, passes)


# ---------------------------------------------------------------------------------- save/load


def check_stats_out(
    path: str | Path | None, *, inputs: Iterable[Input] = (), flag: str = "--out"
) -> OutputTarget:
    """Vet and claim an output path for a stats file before any work (the one output guard,
    ``mfprune.io.outputs``): an existing file there is replaced only if it is a stats file."""
    return claim_file(
        path,
        inputs=inputs,
        flag=flag,
        example="stats.safetensors",
        replaceable=is_stats_file,
        kind_name="an mfprune stats file",
    )


def sorted_metadata(blob: bytes) -> bytes:
    """``blob`` (a serialized safetensors file) with its ``__metadata__`` keys in sorted order.
    safetensors writes them in hash order, which differs from process to process: without this,
    identical runs would write stats files whose bytes differ. The header keeps its length (the
    same JSON, reordered; padded with spaces as the format allows), so no offset moves."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    if not meta:
        return blob
    ordered = {"__metadata__": dict(sorted(meta.items())), **header}
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > n:  # cannot happen for the same JSON; keep the original rather than guess
        return blob
    return blob[:8] + text.ljust(n, b" ") + blob[8 + n :]


def is_stats_file(path: Path) -> bool:
    """Whether ``path`` is a safetensors file whose metadata says mfprune stats."""
    from mfprune.io.reader import read_header

    try:
        return read_header(path).metadata.get("format") == FORMAT
    except (CheckpointError, OSError):
        return False


def _load(path: Path) -> ProfileStats:
    from mfprune.io.reader import read_header

    if not path.is_file():
        what = "does not exist"
        if path.is_dir():
            model = (path / "config.json").is_file()
            what = "is a model folder, not a stats file" if model else "is a folder"
        raise StatsError(f"stats file {path} {what}", hint="pass a file made by `mfprune profile`")
    try:
        header = read_header(path)
    except CheckpointError as exc:
        raise StatsError(f"{path} is not a valid stats file: {exc.message}") from None
    meta = header.metadata
    if meta.get("format") != FORMAT:
        found = f"'{meta['format']}'" if "format" in meta else "no format"
        if meta.get("format") == "pt" or (path.parent / "config.json").is_file():
            found += ": it holds model weights"
        raise StatsError(
            f"{path} is not an mfprune stats file ({found}; expected '{FORMAT}')",
            hint="pass a file made by `mfprune profile` with this mfprune version or older",
        )
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise StatsError(f"{path} is not a valid stats file: {exc}") from None
    return _Parser(path, meta, tensors).stats()


class _Parser:
    """Builds ProfileStats from a file's metadata and tensors, checking every invariant."""

    def __init__(self, path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]):
        self.path, self.meta, self.tensors = path, meta, tensors

    def fail(self, why: str) -> StatsError:
        return StatsError(f"{self.path} is corrupted: {why}")

    def field(self, key: str) -> str:
        if key not in self.meta:
            raise self.fail(f"metadata '{key}' is missing")
        return self.meta[key]

    def integer(self, key: str) -> int:
        value = self.field(key)
        if not value.isdigit():
            raise self.fail(f"metadata '{key}' = {value!r} is not a count")
        return int(value)

    def tensor(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.tensors:
            raise self.fail(f"tensor '{name}' is missing")
        t = self.tensors[name]
        if t.dtype != dtype:
            raise self.fail(f"tensor '{name}' is {t.dtype}, expected {dtype}")
        if tuple(t.shape) != shape:
            raise self.fail(f"tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise self.fail(f"tensor '{name}' holds NaN or infinite values")
        if (t < 0).any():
            raise self.fail(f"tensor '{name}' holds negative values")
        return t

    def layers(self, kind: str) -> tuple[int, ...]:
        name = f"{kind}.layers"
        t = self.tensors.get(name)
        if t is None or t.dim() != 1:
            raise self.fail(f"tensor '{name}' is missing or not 1-D")
        layers = tuple(self.tensor(name, torch.int64, (t.numel(),)).tolist())
        if not layers or list(layers) != sorted(set(layers)):
            raise self.fail(f"'{name}' = {list(layers)} is not a sorted list of layer indices")
        return layers

    def passes(self, kind: str, rows: int) -> torch.Tensor | None:
        """``{kind}.passes`` [rows]: absent (every layer once: files of models without looped
        layers, and every file before it existed) or each layer's passes per token (≥ 1)."""
        name = f"{kind}.passes"
        if name not in self.tensors:
            return None
        passes = self.tensor(name, torch.int64, (rows,))
        if (passes < 1).any():
            raise self.fail(f"'{name}' = {passes.tolist()}: a layer runs at least once per token")
        return passes

    def tokens(self, kind: str, rows: int, total: int, passes: torch.Tensor | None) -> torch.Tensor:
        tokens = self.tensor(f"{kind}.tokens", torch.int64, (rows,))
        want = total * _passes(passes, rows)  # [rows]: every pass of a looped layer counts
        if (tokens != want).any():
            per = f" x passes {passes.tolist()}" if passes is not None else ""
            raise self.fail(
                f"'{kind}.tokens' = {tokens.tolist()} but the file says {total} tokens{per}"
            )
        return tokens

    def experts(self, kind: str, total: int) -> ExpertStats | None:
        if f"{kind}.layers" not in self.tensors and f"{kind}.top_k" not in self.meta:
            return None
        layers = self.layers(kind)
        top_k = self.integer(f"{kind}.top_k")
        count = self.tensors.get(f"{kind}.count")
        if count is None or count.dim() != 2:
            raise self.fail(f"tensor '{kind}.count' is missing or not 2-D")
        shape = (len(layers), count.shape[1])
        sums = {k: self.tensor(f"{kind}.{k}", torch.float64, shape) for k in _EXPERT_SUMS[1:]}
        count = self.tensor(f"{kind}.count", torch.int64, shape)
        passes = self.passes(kind, len(layers))
        tokens = self.tokens(kind, len(layers), total, passes)
        extra = None
        if f"{kind}.extra_slots" in self.tensors:
            extra = self.tensor(f"{kind}.extra_slots", torch.int64, (len(layers),))
        routed = count.sum(dim=1) + (extra if extra is not None else 0)  # [L]
        if (routed != tokens * top_k).any():
            more = f" (with {extra.tolist()} to zero-compute experts)" if extra is not None else ""
            raise self.fail(
                f"'{kind}.count' routes {routed.tolist()} tokens per layer{more}, expected "
                f"{tokens.tolist()} token passes x top-{top_k}"
            )
        return ExpertStats(
            layers=layers,
            top_k=top_k,
            count=count,
            tokens=tokens,
            extra_slots=extra,
            passes=passes,
            **sums,
        )

    def heads(self, total: int) -> HeadStats | None:
        if "heads.layers" not in self.tensors:
            return None
        layers = self.layers("heads")
        usage = self.tensors.get("heads.usage")
        if usage is None or usage.dim() != 2:
            raise self.fail("tensor 'heads.usage' is missing or not 2-D")
        usage = self.tensor("heads.usage", torch.float64, (len(layers), usage.shape[1]))
        passes = self.passes("heads", len(layers))
        return HeadStats(
            layers=layers,
            usage=usage,
            tokens=self.tokens("heads", len(layers), total, passes),
            passes=passes,
        )

    def stats(self) -> ProfileStats:
        total = self.integer("tokens")
        try:
            parts = json.loads(self.field("data_parts"))
        except json.JSONDecodeError:
            parts = None
        if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts) or not parts:
            raise self.fail("metadata 'data_parts' is not a list of fingerprints")
        meta = StatsMeta(
            family=self.field("family"),
            model_type=self.field("model_type"),
            model_fingerprint=self.field("model_fingerprint"),
            data_fingerprint=self.field("data_fingerprint"),
            data_parts=tuple(parts),
            tokens=total,
            documents=self.integer("documents"),
            dtype=self.field("dtype"),
            mfprune_version=self.field("mfprune_version"),
        )
        experts = self.experts("experts", total)
        if experts is None:
            raise self.fail("tensor 'experts.layers' is missing")
        known = {
            f"{k}.{n}"
            for k in EXPERT_KINDS
            for n in (*_EXPERT_SUMS, "tokens", "layers", "extra_slots", "passes")
        }
        known |= {"heads.layers", "heads.usage", "heads.tokens", "heads.passes"}
        unknown = sorted(set(self.tensors) - known)
        if unknown:
            raise self.fail(f"unknown tensors {unknown}")
        return ProfileStats(
            meta=meta,
            experts=experts,
            attention_experts=self.experts("attention_experts", total),
            heads=self.heads(total),
        )


def _version() -> str:
    from mfprune import __version__

    return __version__

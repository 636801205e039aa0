"""rewrite_checkpoint: apply a PrunePlan to a checkpoint, streaming tensor by tensor.

The source is only read. Each output tensor is either copied byte for byte or sliced along its
expert / head axis straight from the source file's byte ranges; shards are written one at a
time into a temp folder that is renamed into place when everything is complete.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mfprune import __version__
from mfprune.arch import ArchSpec, spec_for_config
from mfprune.arch.expert_tensors import ExpertTensor
from mfprune.arch.layout import ExpertLayout, ModelLayout, resolve_layout
from mfprune.arch.mtp_prefix import mtp_view
from mfprune.checkpoint import (
    INDEX_NAME,
    PICKLE_SUFFIXES,
    Checkpoint,
    is_inside,
    open_checkpoint,
)
from mfprune.errors import ModelError
from mfprune.io.outputs import Input, OutputTarget, claim_folder, staged_folder
from mfprune.io.reader import TensorInfo
from mfprune.io.writer import OutTensor, fsync_path, write_shard
from mfprune.plan import PrunePlan, head_index
from mfprune.rewrite.card import CARD_FILE, model_card, source_history
from mfprune.rewrite.config_patch import config_changes, patch_config
from mfprune.rewrite.mtp import check_drop, check_outside_layers, drop_actions, dropped_config
from mfprune.rewrite.quant_config import patch_quantization_config
from mfprune.rewrite.quantized import companion_slices, missing_head_tensor
from mfprune.rewrite.slicing import blocks_for, copy_tensor, slice_tensor

PLAN_FILE = "mfprune_plan.json"
PROVENANCE_FILE = "mfprune_provenance.json"


@dataclass(frozen=True)
class RewriteResult:
    out: Path
    source_bytes: int
    out_bytes: int
    tensors_sliced: int
    tensors_dropped: int
    tensors_copied: int
    shards: int
    config_changes: dict[str, list[Any]]
    skipped_files: list[str] = field(default_factory=list)
    replaced: str | None = None  # the previous mfprune output that --overwrite replaced

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["out"] = str(self.out)
        return d


def rewrite_checkpoint(
    model: str | Path,
    plan: PrunePlan,
    out: str | Path | OutputTarget,
    *,
    spec: ArchSpec | None = None,
    overwrite: bool = False,
    inputs: tuple[Input, ...] = (),
    max_shard_bytes: int | None = None,
    allow_uneven: bool = False,
    drop_mtp: bool = False,
    replacements: Mapping[str, TensorInfo] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> RewriteResult:
    """Write the pruned copy of ``model`` described by ``plan`` to ``out``.

    Everything is validated first (model, adapter, plan, output location); nothing is written
    unless all of it passes. ``out`` is a path or a target already claimed with
    ``mfprune.io.outputs.claim_folder`` (``inputs``: more paths the output may not touch, beside
    the source model). ``allow_uneven`` accepts plans whose layers keep different expert
    counts; the output then loads with ``mfprune.load_pretrained``, not stock transformers.
    Multi-token-prediction layers are pruned like the last decoder layer unless the plan names
    them (``PrunePlan.with_mtp``); ``drop_mtp`` removes them and sets the config's count to 0.
    ``replacements`` (``mfprune.repair``): source tensors whose bytes come from elsewhere (same
    name, dtype and shape), streamed and sliced like the source's own; ``provenance``: extra
    entries for ``mfprune_provenance.json``.
    """
    ckpt = open_checkpoint(model)
    spec = spec or spec_for_config(ckpt.config)
    layout = resolve_layout(ckpt, spec)
    ckpt = mtp_view(ckpt, spec, layout.num_layers)  # the names the layout uses
    plan.validate(layout, allow_uneven=allow_uneven)
    if drop_mtp:
        check_drop(plan, layout)
    else:
        plan = plan.with_mtp(layout)
        plan.validate(layout, allow_uneven=allow_uneven)
    plan = plan.with_dead_sub_experts(layout)
    target = (
        out
        if isinstance(out, OutputTarget)
        else claim_folder(
            out, inputs=(Input(ckpt.root, "the source model"), *inputs), overwrite=overwrite
        )
    )
    out_dir = target.path
    with target.held():  # the lock goes with any failure before the rename
        history = source_history(ckpt.root, PROVENANCE_FILE)
        tensors, stats = plan_tensors(
            ckpt, layout, plan, drop_mtp=drop_mtp, replacements=replacements
        )
        new_config = patch_config(ckpt.config, layout, plan)
        new_config = patch_quantization_config(new_config, layout, plan)
        if drop_mtp:
            new_config = dropped_config(new_config, layout)
        limit = max_shard_bytes or max(s.file_size for s in ckpt.shards)
        shards = _assign_shards(tensors, limit)
        with staged_folder(target) as tmp:
            skipped = _copy_side_files(ckpt, tmp)
            names = _shard_names(len(shards))
            weight_map = {}
            # fsync shard k in the background while shard k+1 is copied (both release the GIL)
            with ThreadPoolExecutor(max_workers=1) as syncer:
                synced = []
                for name, shard in zip(names, shards, strict=True):
                    write_shard(tmp / name, shard, metadata={"format": "pt"})
                    synced.append(syncer.submit(fsync_path, tmp / name))
                    weight_map.update({t.name: name for t in shard})
                for future in synced:
                    future.result()
            if len(shards) > 1:
                index = {
                    "metadata": {"total_size": sum(t.nbytes for t in tensors)},
                    "weight_map": dict(sorted(weight_map.items())),
                }
                _write_json(tmp / INDEX_NAME, index)
            _write_json(tmp / "config.json", new_config)
            plan.save(tmp / PLAN_FILE)
            changes = config_changes(ckpt.config, new_config)
            out_bytes = sum((tmp / n).stat().st_size for n in names)
            record = {
                "format": "mfprune.provenance/1",
                "mfprune_version": __version__,
                "family": layout.family,
                "source": {
                    "path": str(ckpt.root),
                    "fingerprint": ckpt.fingerprint(),
                    "bytes": ckpt.nbytes,
                },
                "output_bytes": out_bytes,
                "config_changes": changes,
                "plan_meta": plan.meta,
                **(provenance or {}),
                "history": history,  # every earlier prune of the source, oldest first
            }
            _write_json(tmp / PROVENANCE_FILE, record)
            card = model_card(provenance=record, plan=plan, layout=layout)
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")
    return RewriteResult(
        out=out_dir,
        source_bytes=ckpt.nbytes,
        out_bytes=out_bytes,
        shards=len(shards),
        config_changes=changes,
        skipped_files=skipped,
        replaced=target.replaced,
        **stats,
    )


def plan_tensors(
    ckpt: Checkpoint,
    layout: ModelLayout,
    plan: PrunePlan,
    *,
    drop_mtp: bool = False,
    replacements: Mapping[str, TensorInfo] | None = None,
) -> tuple[list[OutTensor], dict[str, int]]:
    """Every output tensor, in source order, with where its bytes come from (a replaced
    source tensor's bytes from its replacement, same slices), under its stored name
    (``ckpt``: viewed as the layout names it, ``mtp_view``)."""
    actions: dict[str, OutTensor | None] = {}  # None: dropped
    if drop_mtp:
        drop_actions(ckpt, layout, actions)
    for experts in filter(None, (layout.experts, layout.attention_experts)):
        _expert_actions(experts, plan, actions, drop_mtp=drop_mtp, stored=layout.real_name)
    if plan.heads:
        _head_actions(ckpt.tensors, layout, plan, actions)
    check_outside_layers(ckpt, layout, plan, actions)
    out, stats = [], {"tensors_sliced": 0, "tensors_dropped": 0, "tensors_copied": 0}
    for name, info in ckpt.tensors.items():
        if name not in actions:
            out.append(copy_tensor(info))
            stats["tensors_copied"] += 1
        elif actions[name] is None:
            stats["tensors_dropped"] += 1
        else:
            out.append(actions[name])
            stats["tensors_sliced" if actions[name].shape != info.shape else "tensors_copied"] += 1
    if replacements:
        out = [_replaced(t, ckpt.tensors, replacements) for t in out]
    if layout.spec.mtp_prefix:  # MTP layers back under their own prefix
        out = [replace(t, name=layout.real_name(t.name)) for t in out]
    return out, stats


def _replaced(
    t: OutTensor, tensors: dict[str, TensorInfo], replacements: Mapping[str, TensorInfo]
) -> OutTensor:
    """``t`` with its bytes taken from the replacement of its source tensor, if it has one
    (same name, dtype and shape: the same byte ranges, relative to the tensor's start)."""
    new = replacements.get(t.source.name)
    if new is None:
        return t
    old = tensors.get(t.source.name)
    if old is None or (old.dtype, tuple(old.shape)) != (new.dtype, tuple(new.shape)) or t.data:
        raise ModelError(
            f"replacement for {t.source.name} does not match the source tensor",
            hint="this is a bug in mfprune: please report it",
        )
    ranges = [(start - old.start + new.start, length) for start, length in t.ranges]
    return replace(t, source=new, ranges=ranges)


def _expert_actions(
    experts: ExpertLayout,
    plan: PrunePlan,
    actions: dict[str, OutTensor | None],
    *,
    drop_mtp: bool = False,
    stored: Callable[[str], str] = str,
) -> None:
    """Pruned layers: router rows and stacked tensors sliced; every tensor under a kept
    expert's prefix renumbered, every tensor of a dropped expert dropped. Refuses a layer
    holding a tensor that looks per-expert and that no rule covers."""
    layers = experts.layers if drop_mtp else experts.all_layers
    unknown = [
        replace(info, name=stored(info.name))
        for layer in layers
        if len(plan.kept_experts(experts, layer)) < experts.num_experts
        for info in experts.tensors[layer].unknown
    ]
    if unknown:
        names = ", ".join(f"{i.name} {list(i.shape)}" for i in unknown[:4])
        more = f" and {len(unknown) - 4} more" if len(unknown) > 4 else ""
        raise ModelError(
            f"{len(unknown)} tensor(s) of pruned layers look per-expert but no adapter rule "
            f"covers them: {names}{more}; nothing was written",
            hint="list such a tensor in the adapter's [experts] stacked (one slice per expert "
            "along an axis), or keep every expert of that layer; see docs/checkpoint-formats.md",
        )
    for layer in layers:
        kept = plan.kept_experts(experts, layer)
        if len(kept) == experts.num_experts:
            continue
        lt = experts.tensors[layer]
        for info, axis in ((lt.router, 0), *lt.stacked):
            ids, slots = kept, experts.num_experts
            if info.name in experts.extended:  # LongCat: zero-compute experts after the E
                slots += experts.extra_rows
                ids = (*kept, *range(experts.num_experts, slots))
            rows = info.shape[axis] // slots  # 1, or DBRX's [E * I, D] blocks
            actions[info.name] = slice_tensor(info, axis=axis, blocks=blocks_for(ids, rows))
        for table in experts.id_tables.get(layer, ()):  # hash layers: ids renumbered
            info = table.info
            data = table.remapped(kept)
            actions[info.name] = OutTensor(
                info.name, info.dtype, info.shape, len(data), info, data=data
            )
        extra = range(experts.num_experts, experts.num_experts + experts.extra_rows)
        new_id = {old: new for new, old in enumerate((*kept, *extra))}
        _renumber(lt.per_expert, new_id, actions)
        if experts.sub_experts:  # CartesianMoE: a sub-expert lives while a kept expert uses it
            sub = experts.sub_experts[layer]
            for members, used in zip(sub.tensors, sub.used(kept), strict=True):
                _renumber(members, {old: new for new, old in enumerate(used)}, actions)


def _renumber(
    members: Mapping[int, tuple[ExpertTensor, ...]],
    new_id: Mapping[int, int],
    actions: dict[str, OutTensor | None],
) -> None:
    """Every tensor of a kept (sub-)expert renamed to its new number, the others dropped."""
    for e, tensors in members.items():
        for t in tensors:
            if e in new_id:
                actions[t.info.name] = copy_tensor(t.info, name=t.renamed(old=e, new=new_id[e]))
            else:
                actions[t.info.name] = None


def _head_actions(
    tensors: dict[str, TensorInfo],
    layout: ModelLayout,
    plan: PrunePlan,
    actions: dict[str, OutTensor | None],
) -> None:
    heads = layout.heads
    assert heads is not None  # plan.validate refuses head plans for models without heads
    by_module: dict[str, list[TensorInfo]] = {}
    for info in tensors.values():
        by_module.setdefault(info.name.rsplit(".", 1)[0], []).append(info)
    for layer, kept_q in plan.heads.items():
        kept = {"query": kept_q, "kv": head_index(heads, kept_q)}
        total = {"query": heads.num_heads, "kv": heads.num_kv_heads}
        for t in heads.spec.tensors:
            name = t.name.format(layer=layer)
            module_tensors = by_module.get(name.rsplit(".", 1)[0], [])
            info = tensors.get(name)
            if info is None:
                quantized = missing_head_tensor(name, module_tensors)
                if quantized is not None:
                    raise quantized
                if t.optional:
                    continue
                raise ModelError(
                    f"head tensor {name} is missing",
                    hint="the adapter's heads.tensors do not match this checkpoint",
                )
            width = heads.width(t)
            if len(info.shape) <= t.axis or info.shape[t.axis] != total[t.owner] * width:
                raise ModelError(
                    f"{info.name} has shape {list(info.shape)}; expected {total[t.owner]} "
                    f"{t.owner} heads x {width} along axis {t.axis}",
                    hint="the config's head counts do not match the weights",
                )
            blocks = blocks_for(kept[t.owner], width)
            actions[info.name] = slice_tensor(info, axis=t.axis, blocks=blocks)
            listed = {u.name.format(layer=layer): u for u in heads.spec.tensors}
            for extra in companion_slices(
                info,
                t,
                width=width,
                kept=kept[t.owner],
                module_tensors=module_tensors,
                handled=listed,
            ):
                actions[extra.name] = extra


def _assign_shards(tensors: list[OutTensor], limit: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


_WEIGHT_FILE = re.compile(r".*\.(safetensors|msgpack|h5|gguf)$")
#: the files of a model besides its weights and config: tokenizer, generation config, chat
#: template, processor, remote code, license. Anything else (the source's model card, metrics,
#: notebooks, an __init__.py) describes or belongs to the source, and is not carried over.
_MODEL_FILE = re.compile(
    r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt"
    r"|.*\.model|.*\.tiktoken|chat_template\.(jinja|json)|generation_config\.json"
    r"|(pre)?processor_config\.json|(configuration|modeling|tokenization)_\w+\.py"
    r"|(LICEN[CS]E|NOTICE|USE_POLICY)(\.\w+)?)$",
    re.IGNORECASE,
)


def _copy_side_files(ckpt: Checkpoint, tmp: Path) -> list[str]:
    """Copy the model's own side files (``_MODEL_FILE``); return what was not carried over.
    The source's README.md is replaced by the pruned model's own card, without a mention."""
    skipped = []
    own = ("config.json", INDEX_NAME, PLAN_FILE, PROVENANCE_FILE, CARD_FILE)
    for p in sorted(ckpt.root.iterdir()):
        name = p.name
        if name in own or name.startswith("."):
            continue
        if p.is_dir() or _WEIGHT_FILE.match(name) or p.suffix in PICKLE_SUFFIXES:
            if p not in ckpt.weight_files:
                skipped.append(name)
            continue
        if not _MODEL_FILE.match(name) or not is_inside(ckpt.root, p):  # links elsewhere too
            skipped.append(name)
            continue
        shutil.copyfile(p, tmp / name)
    return skipped


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

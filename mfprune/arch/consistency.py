"""Does config.json tell the truth about the weights? Checked from the safetensors headers
alone, before any work: the decoder-layer count, the hidden size, the vocabulary and the
attention heads. A config that lies would make a prune leave layers unpruned, or make
transformers fail (or silently mis-load) long after the rewrite was written.

Each mismatch is one line naming the key, the config's value and what the weights say.
"""

from __future__ import annotations

import re
from typing import Any

from mfprune.checkpoint import Checkpoint
from mfprune.errors import ArchError, ModelError

_FIX = "the config does not match the weights; fix config.json (or restore the one saved with them)"
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def check_config_against_weights(ckpt: Checkpoint, layout: Any) -> None:
    """Raise ModelError when config.json disagrees with the tensors (``layout``: ModelLayout;
    the layer count is checked before it is built, by ``check_layer_count``)."""
    from mfprune.arch.layout import lm_config

    cfg = lm_config(ckpt.config, layout.spec)  # a composite model's language model: text_config
    embedding = _embedding(ckpt)
    if embedding is not None and len(embedding.shape) == 2:
        rows, width = embedding.shape
        _same(cfg, "vocab_size", rows, f"{embedding.name} has {rows:,} rows")
        _same(cfg, "hidden_size", width, f"{embedding.name} is {width:,} wide")
    if layout.heads is not None:
        _check_heads(ckpt, layout)


def check_layer_count(ckpt: Checkpoint, spec: Any, num_layers: int) -> None:
    """The highest layer index in the tensor names must be the config's count (plus the MTP
    layers the config declares, ``spec.mtp_layers_key``); ``spec``: ArchSpec."""
    key = spec.num_layers_key
    prefix = spec.experts.router.split("{layer}")[0]
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for name in ckpt.tensors if (m := pattern.match(name))}
    if not indices:
        return
    from mfprune.arch.layout import lm_config

    cfg = lm_config(ckpt.config, spec)  # a composite model's MTP count sits in its text_config
    mtp = cfg.get(spec.mtp_layers_key) if spec.mtp_layers_key else None
    extra = mtp if isinstance(mtp, int) and not isinstance(mtp, bool) and mtp > 0 else 0
    found = max(indices) + 1
    if found != num_layers and not (extra and found == num_layers + extra):
        mtp = (
            f" (+ {extra} MTP)" if extra else (" and no MTP layers" if spec.mtp_layers_key else "")
        )
        hint = _FIX
        if found > num_layers + extra:
            hint += (
                "; an MTP / extra layer the adapter does not describe would keep its experts "
                "while the config's count changes (the adapter's mtp_layers_key names its count)"
            )
        stored = f"{prefix}0 … {prefix}{found - 1}"
        if spec.mtp_prefix and found > num_layers:  # mtp_view numbered them after the decoder
            last = spec.mtp_prefix.replace("{layer}", str(found - 1 - num_layers))
            stored = (
                f"{prefix}0 … {prefix}{num_layers - 1}, {spec.mtp_prefix.format(layer=0)} … {last}"
            )
        raise ModelError(
            f"config.json says {key} = {num_layers}{mtp} but the weights hold {found} layers "
            f"({stored})",
            hint=hint,
        )
    missing = sorted(set(range(found)) - indices)
    if missing:
        raise ModelError(
            f"the weights have no tensors for layer {missing[0]} ({prefix}{missing[0]}.*) "
            f"of {found}",
            hint="the checkpoint is incomplete; re-download or re-save it",
        )


def _embedding(ckpt: Checkpoint) -> Any:
    hits = [t for n, t in ckpt.tensors.items() if n.endswith(EMBEDDING_SUFFIXES)]
    return hits[0] if len(hits) == 1 else None  # several (e.g. encoder + decoder): not checked


def _same(cfg: dict[str, Any], key: str, actual: int, what: str) -> None:
    value = cfg.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value != actual:
        raise ModelError(f"config.json says {key} = {value:,} but {what}", hint=_FIX)


def _check_heads(ckpt: Checkpoint, layout: Any) -> None:
    """Every head tensor the adapter lists must be (heads or KV heads) x width along its axis,
    in the layers that hold heads (``HeadLayout.layers``): a hybrid's other layers (linear
    attention, Mamba) may keep tensors of the same name sized by their own head count."""
    heads, spec = layout.heads, layout.spec.heads
    for layer in heads.layers:
        for t in spec.tensors:
            info = ckpt.tensors.get(t.name.format(layer=layer))
            if info is None or len(info.shape) <= t.axis:
                continue
            try:
                width = heads.width(t)
            except ArchError:
                return  # the adapter's widths need keys this config lacks: nothing to check
            query = t.owner == "query"
            count = heads.num_heads if query else heads.num_kv_heads
            if info.shape[t.axis] != count * width:
                key = spec.count_key if query else (spec.kv_count_key or spec.count_key)
                derived = t.width == "head_dim" and not isinstance(
                    heads.config.get(spec.head_dim_key or ""), int
                )
                per = f"head_dim {width}" + (
                    f" = hidden_size / {spec.count_key}" if derived else ""
                )
                raise ModelError(
                    f"config.json says {key} = {count} (x {per} = {count * width}) but "
                    f"{info.name} is {info.shape[t.axis]} along axis {t.axis}",
                    hint=_FIX + " (check num_attention_heads, num_key_value_heads, head_dim)",
                )

"""The central checker: a rewritten checkpoint loads in stock transformers, its tensors are
the plan's slices of the source (byte for byte), and its logits equal the masked original's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from mfprune.checkpoint import open_checkpoint
from mfprune.oracle import logits, masked_logits, sample_ids

TOL = 1e-5


def load(path: Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict]:
    """Load with the class the checkpoint names (``architectures``): composite models (vision +
    text) load whole, towers included."""
    names = json.loads((path / "config.json").read_text()).get("architectures") or []
    cls = getattr(transformers, names[0], AutoModelForCausalLM) if names else AutoModelForCausalLM
    model, info = cls.from_pretrained(path, dtype=dtype, output_loading_info=True)
    return model.eval(), info


def removed(kept: dict[int, list[int]], total: int) -> dict[int, list[int]]:
    return {layer: sorted(set(range(total)) - set(ids)) for layer, ids in kept.items()}


def assert_exact(
    source: Path,
    out: Path,
    *,
    experts: dict[int, list[int]] | None = None,
    attention_experts: dict[int, list[int]] | None = None,
    heads: dict[int, list[int]] | None = None,
    allow_unexpected: bool = False,
    spec=None,
) -> float:
    """Logits of ``out`` == logits of ``source`` with the removed ids masked; returns the
    masking effect (max |masked - unmasked|), which must be non-trivial. ``spec``: the
    adapter (``--arch``) when it is not a built-in one."""
    original, _ = load(source)
    pruned, info = load(out)
    assert not info["missing_keys"], info["missing_keys"]
    if not allow_unexpected:
        assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    cfg = original.config.get_text_config()
    ids = sample_ids(cfg.vocab_size, batch=2, seq=24)
    reference = masked_logits(
        original,
        ids,
        experts=experts,
        attention_experts=attention_experts,
        heads=heads,
        spec=spec,
    )
    got = logits(pruned, ids)
    diff = (got - reference).abs().max().item()
    assert diff <= TOL, f"pruned logits differ from the masked original by {diff:.3g}"
    effect = (reference - logits(original, ids)).abs().max().item()
    assert effect > 1e-4, f"masking changed logits by only {effect:.3g}: the check is vacuous"
    return effect


_ID_TABLE = re.compile(r"^.*layers\.(\d+)\..*\.tid2eid$")  # DeepSeek-V4: token -> expert ids
# experts.3. (most families), experts.expert_3. (Switch Transformers, NLLB-MoE); layers.N. or
# block.N. (T5's stacks)
_PER_EXPERT = re.compile(r"^(.*(?:layers|block)\.(\d+)\..*experts\.(?:expert_)?)(\d+)(\..*)$")


def assert_tensors_are_slices(
    source: Path,
    out: Path,
    *,
    experts: dict[int, list[int]] | None = None,
    num_experts: int = 8,
    stack_first: dict[str, int] | None = None,
) -> None:
    """Every output tensor with its source shape is byte-identical to its source tensor (a
    renumbered per-expert tensor to the kept expert it came from; numbers after the kept ones
    to the source's extra experts from ``num_experts`` on, LongCat's zero experts); dtypes
    never change. Only the adapter's decoder renumbers experts: Qwen3-Omni's talker (an MoE
    beside the thinker) keeps its own. ``stack_first``: in an encoder-decoder
    model, a stack's name prefix -> the plan number of its layer 0 (``{"decoder.": 2}``)."""
    from mfprune.arch import spec_for_config

    src, dst = open_checkpoint(source), open_checkpoint(out)
    router = spec_for_config(src.config).experts.router
    stack = router.partition("layers.{layer}.")[0] + "layers." if "layers.{" in router else ""
    compared = 0
    for name, info in dst.tensors.items():
        origin = name
        m = _PER_EXPERT.match(name)
        first = next((n for p, n in (stack_first or {}).items() if name.startswith(p)), 0)
        if m and experts and first + int(m.group(2)) in experts and name.startswith(stack):
            kept, i = experts[first + int(m.group(2))], int(m.group(3))
            old = kept[i] if i < len(kept) else num_experts + i - len(kept)
            origin = f"{m.group(1)}{old}{m.group(4)}"
        assert origin in src.tensors, f"{name} has no source tensor"
        assert src.tensors[origin].dtype == info.dtype, name
        if src.tensors[origin].shape != info.shape:
            continue
        with safe_open(src.tensors[origin].file, "pt") as a, safe_open(info.file, "pt") as b:
            ta, tb = a.get_tensor(origin), b.get_tensor(name)
        hashed = _ID_TABLE.match(name)
        if hashed and experts and int(hashed.group(1)) in experts:  # values are expert ids
            new_id = {old: new for new, old in enumerate(experts[int(hashed.group(1))])}
            assert tb.tolist() == [[new_id[int(v)] for v in row] for row in ta], name
        else:
            assert torch.equal(ta.view(torch.uint8), tb.view(torch.uint8)), f"{name} != {origin}"
        compared += 1
    assert compared > 0


def config_diff(source: Path, out: Path) -> dict[str, tuple]:
    a = json.loads((source / "config.json").read_text())
    b = json.loads((out / "config.json").read_text())
    return {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}


def _bytes(info) -> torch.Tensor:
    with safe_open(info.file, "pt") as f:
        return f.get_tensor(info.name).contiguous().view(torch.uint8)


def assert_experts_follow(source: Path, out: Path, *, kept: dict[int, list[int]]) -> int:
    """In every pruned layer, each tensor under ``experts.{e}.`` of a kept expert is in the
    output under its new number with identical bytes (scales, zero points... included), and
    nothing of a dropped expert is left. Returns how many tensors were compared."""
    src, dst = open_checkpoint(source), open_checkpoint(out)
    expected: dict[str, str] = {}  # output name -> source name
    for name in src.tensors:
        m = _PER_EXPERT.match(name)
        if m and int(m.group(2)) in kept:
            ids = kept[int(m.group(2))]
            if int(m.group(3)) in ids:
                expected[f"{m.group(1)}{ids.index(int(m.group(3)))}{m.group(4)}"] = name
    actual = {n for n in dst.tensors if (m := _PER_EXPERT.match(n)) and int(m.group(2)) in kept}
    assert actual == set(expected), sorted(actual ^ set(expected))[:5]
    for name, origin in expected.items():
        a, b = src.tensors[origin], dst.tensors[name]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        assert torch.equal(_bytes(a), _bytes(b)), f"{name} != {origin}"
    return len(expected)


def assert_stacked_sliced(
    source: Path, out: Path, *, kept: dict[int, list[int]], names: list[str], rows: int = 1
) -> None:
    """Each ``names`` template (with ``{layer}``) of a pruned layer is the source tensor's
    kept rows along axis 0, byte for byte (``rows`` per expert: DBRX's [E * I, D] blocks)."""
    src, dst = open_checkpoint(source), open_checkpoint(out)
    for layer, ids in kept.items():
        for template in names:
            name = template.format(layer=layer)
            with safe_open(src.tensors[name].file, "pt") as f:
                full = f.get_tensor(name)
            with safe_open(dst.tensors[name].file, "pt") as f:
                got = f.get_tensor(name)
            want = full.unflatten(0, (-1, rows))[list(ids)].flatten(0, 1).contiguous()
            assert got.shape == want.shape, (name, got.shape, want.shape)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name

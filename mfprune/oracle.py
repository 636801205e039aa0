"""Reference side of the exactness oracle: logits of an unpruned model with pruning *simulated*.

The project's central check is that a rewritten (pruned) checkpoint computes exactly what the
original model computes when the pruned experts can never be routed to and the pruned attention
heads contribute nothing. ``masked_logits`` produces the right-hand side of that equation from
the *original* model, without touching its weights:

* Pruned experts get a selection score of ``-inf`` in their router, so top-k never picks them and
  every softmax normaliser excludes them, exactly as if the router had fewer rows. Routers are
  found from the adapter (``mfprune.modules.adapter_routers``: the router weight's name through
  transformers' key renamings; in an encoder-decoder model, ``stack_routers``: each layer with
  its stack's templates), not by class name:

  - the logits are always masked, so every softmax normaliser excludes the pruned experts as
    a router with fewer rows would; where modules share (tie) the router weight, in each
    (DiffusionGemma's encoder and decoder layers);
  - a family whose adapter says ``selection = "biased_score"`` (DeepSeek-V3: selection on
    ``sigmoid(logits) + e_score_correction_bias``, weights from the un-biased sigmoid; ERNIE
    4.5: ``softmax(logits) + bias`` in ``moe_statics``) also gets the mask on that bias
    (pruned entries ``-inf``), wherever the family keeps it (router, MoE block or expert
    module): a masked logit alone leaves ``0 + bias`` selectable;
  - a router weight owned by a plain ``nn.Linear`` (JetMoE's ``router.layer``) is masked with
    a forward hook on its output. JetMoE has two routers per layer: the MLP's (``experts``) and
    the attention's mixture-of-attention router (``attention_experts``);
  - any other owner computes the logits with a single ``torch.nn.functional.linear`` call inside
    ``forward``; during that forward, ``linear`` is temporarily swapped for one that adds the
    mask to its output (a forward making another number of calls is refused).

* Where transformers' CPU ``grouped_mm`` experts refuse a shape ("strides should be multiple
  of 16 bytes", e.g. hidden size 37), ``logits`` switches the model to the ``eager`` experts.

* Pruned query heads are zeroed at the input of ``self_attn.o_proj`` (a forward pre-hook), which
  is what removing the matching ``o_proj`` columns does.

All patches are undone in ``finally`` blocks, so the model is unchanged after every call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from mfprune.arch import ArchSpec, spec_for_config
from mfprune.modules import (
    RouterSite,
    find_o_proj,
    is_block_diffusion,
    stack_routers,
    text_model,
)

#: Ids to remove, per decoder-layer index.
Pruned = Mapping[int, Sequence[int]]


_GROUPED_MM_REFUSAL = "strides should be multiple of 16 bytes"
# Llama4ForConditionalGeneration (transformers 5.24) builds its output object from a field its
# language model's output lacks (image_outputs), so its every forward fails
_BROKEN_OUTPUT = "has no attribute 'image_outputs'"


def logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain forward pass: ``model(input_ids).logits`` as float32, ``[B, T, V]``, without
    gradients (``attention_mask``, ``[B, T]``, 0 at padding, when given). An encoder-decoder
    model (``config.is_encoder_decoder``) reads ``input_ids`` in both stacks: the encoder's
    input, and the decoder's (``decoder_input_ids``); the logits are the decoder's. So does a
    block-diffusion model (``is_block_diffusion``): the prompt, then the canvas its decoder
    denoises over the prompt's KV cache (else a random one), its logits the canvas's.

    Falls back to the ``eager`` experts implementation (for good) where ``grouped_mm`` refuses
    the model's shapes."""
    inputs = {"input_ids": input_ids.to(model.device), "use_cache": False}
    if getattr(model.config, "is_encoder_decoder", False) or is_block_diffusion(model.config):
        inputs["decoder_input_ids"] = inputs["input_ids"]
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask.to(model.device)
    with torch.no_grad():
        try:
            return _forward(model, inputs)
        except RuntimeError as exc:
            if _GROUPED_MM_REFUSAL not in str(exc):
                raise
        model.set_experts_implementation("eager")
        return _forward(model, inputs)


#: composite classes whose own forward fails on _BROKEN_OUTPUT (found on first use)
_RUN_LANGUAGE_MODEL: set[type] = set()


def _forward(model: PreTrainedModel, inputs: dict[str, Any]) -> torch.Tensor:
    """``model(**inputs).logits`` as float32. Where a composite model cannot build its output
    object (``_BROKEN_OUTPUT``), its own ``language_model`` (a causal LM with the LM head)
    runs the tokens, from then on for every model of its class (the failed forward ran the
    layers: hooks saw them once more): on text alone that is the composite's whole
    computation. A composite without a forward of its own runs text through its thinker
    (``text_model``: Qwen3-Omni-MoE)."""
    model = text_model(model)
    if type(model) not in _RUN_LANGUAGE_MODEL:
        try:
            return model(**inputs).logits.float()
        except AttributeError as exc:
            if _BROKEN_OUTPUT not in str(exc) or getattr(model, "language_model", None) is None:
                raise
        _RUN_LANGUAGE_MODEL.add(type(model))
    return model.language_model(**inputs).logits.float()


def sample_ids(vocab_size: int, *, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    """Deterministic random token ids of shape ``(batch, seq)`` drawn from ``[0, vocab_size)``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=generator, dtype=torch.long)


def masked_logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    experts: Pruned | None = None,
    attention_experts: Pruned | None = None,
    heads: Pruned | None = None,
    spec: ArchSpec | None = None,
) -> torch.Tensor:
    """Logits of ``model`` with the given experts/heads masked out (see the module docstring).

    Args:
        model: the original, unpruned model. It is left unchanged.
        input_ids: token ids, shape ``(batch, seq)``.
        experts: per layer index, the routed MLP experts to remove.
        attention_experts: per layer index, the attention experts to remove (JetMoE's
            mixture-of-attention router).
        heads: per layer index, the query heads to remove.
        spec: the adapter that says where the routers are; by default the built-in one for
            the model's ``model_type``.

    Returns:
        float32 logits, shape ``(batch, seq, vocab)``.

    Raises:
        ValueError: if a layer has no router (or no ``self_attn.o_proj`` for ``heads``), an id is
            out of range or repeated, or fewer than ``top_k`` experts would remain.
        RuntimeError: if a router's forward did not make exactly one ``linear`` call, i.e. the
            masking could not be applied as designed.
    """
    with masking(
        model, experts=experts, attention_experts=attention_experts, heads=heads, spec=spec
    ):
        return logits(model, input_ids)


@contextmanager
def masking(
    model: PreTrainedModel,
    *,
    experts: Pruned | None = None,
    attention_experts: Pruned | None = None,
    heads: Pruned | None = None,
    spec: ArchSpec | None = None,
) -> Iterator[None]:
    """While the context lasts, ``model`` computes as if the given experts / heads were
    removed (what ``masked_logits`` runs under; also used by ``mfprune.repair``)."""
    if (experts or attention_experts) and spec is None:
        spec = spec_for_config(model.config.to_dict())
    with ExitStack() as stack:
        for pruned, kind in ((experts, "experts"), (attention_experts, "attention_experts")):
            if not pruned:
                continue
            assert spec is not None
            kind_spec = spec.experts if kind == "experts" else spec.attention_experts
            if kind_spec is None:
                raise ValueError(f"{kind}: the {spec.family} adapter has no {kind}")
            sites = stack_routers(model, spec, kind_spec, pruned.keys())
            for layer, ids in pruned.items():
                stack.enter_context(_mask_site(sites[layer], ids))
        if heads:
            for layer, ids in heads.items():
                stack.enter_context(_mask_heads(model, layer, ids))
        yield


# --------------------------------------------------------------------------- expert masking


def _expert_mask(num_experts: int, top_k: int, ids: Sequence[int]) -> torch.Tensor:
    """A float32 vector over the router's experts: 0 for kept, ``-inf`` for pruned."""
    pruned = sorted({int(i) for i in ids})
    if len(pruned) != len(ids):
        raise ValueError(f"repeated expert ids: {list(ids)}")
    if pruned and not 0 <= pruned[0] <= pruned[-1] < num_experts:
        raise ValueError(f"expert ids {pruned} out of range for {num_experts} experts")
    if num_experts - len(pruned) < top_k:
        raise ValueError(
            f"pruning {len(pruned)} of {num_experts} experts leaves fewer than top_k={top_k}"
        )
    mask = torch.zeros(num_experts, dtype=torch.float32)
    mask[pruned] = float("-inf")
    return mask


@contextmanager
def _mask_site(site: RouterSite, ids: Sequence[int]) -> Iterator[None]:
    """Mask the pruned ``ids`` out of one layer's selection for the duration of the context:
    always on the router logits (so every softmax normaliser excludes them), and also on the
    selection bias where the family has one (so ``score + bias`` never selects them)."""
    mask = _expert_mask(site.num_experts, site.top_k, ids)
    applied = [0]  # how many times the logits were masked
    with ExitStack() as stack:
        for module in (site.module, *site.twins):  # twins: the same weight, tied
            if type(module).forward is nn.Linear.forward:  # a plain linear: logits out
                stack.enter_context(_mask_linear_output(module, mask, applied))
            else:
                stack.enter_context(_mask_linear_call(module, mask, applied))
        if site.bias is not None:
            stack.enter_context(_mask_correction_bias(site.bias, mask))
        yield
    if not applied[0]:  # a forward ran (or nothing did) without passing through the mask
        raise RuntimeError(
            f"layer {site.layer}: the mask on {site.name} was never applied, so the router "
            "computes its logits some other way; the masked reference would be the unmasked "
            "model"
        )


def _mask_router(router: nn.Module, ids: Sequence[int]) -> AbstractContextManager[None]:
    """Mask ``ids`` out of a router module found by other means (its own attributes say how
    many experts, top-k and any selection bias). Prefer ``masked_logits`` with an adapter."""
    bias = getattr(router, "e_score_correction_bias", None)
    layer = getattr(router, "layer", None)
    site = RouterSite(
        layer=-1,
        name=type(router).__name__,
        module=layer if isinstance(layer, nn.Linear) else router,
        num_experts=int(router.num_experts),
        top_k=int(getattr(router, "top_k", 1)),
        bias=bias if isinstance(bias, torch.Tensor) else None,
    )
    return _mask_site(site, ids)


@contextmanager
def _mask_correction_bias(bias: torch.Tensor, mask: torch.Tensor) -> Iterator[None]:
    """DeepSeek-V3: add ``mask`` to the selection bias in place; restore it afterwards. A
    bias over the routed experts only, shorter than the router's rows (Inkling: the rows
    after them score shared experts), takes the mask's first entries."""
    n = bias.shape[-1]
    if n < mask.numel():
        if torch.isinf(mask[n:]).any():
            raise ValueError(f"a pruned expert lies beyond the selection bias's {n} entries")
        mask = mask[:n]
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.add_(mask.to(device=bias.device, dtype=bias.dtype))
        yield
    finally:
        with torch.no_grad():
            bias.copy_(saved)


@contextmanager
def _mask_linear_output(
    linear: nn.Linear, mask: torch.Tensor, applied: list[int]
) -> Iterator[None]:
    """JetMoE: add ``mask`` to ``linear``'s output with a forward hook (``applied[0]``
    counts the calls)."""

    def hook(_module: nn.Module, _args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        applied[0] += 1
        return output + mask.to(device=output.device, dtype=output.dtype)

    handle = linear.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _mask_linear_call(router: nn.Module, mask: torch.Tensor, applied: list[int]) -> Iterator[None]:
    """Add ``mask`` to the result of the single ``F.linear`` call made by ``router.forward``
    (``applied[0]`` counts the forwards).

    ``router.forward`` is shadowed by an instance attribute that swaps
    ``torch.nn.functional.linear`` for a masking version while the original forward runs.
    """
    functional = torch.nn.functional
    had_instance_forward = "forward" in router.__dict__
    original_forward: Callable[..., Any] = router.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        original_linear = functional.linear
        calls = 0

        def masked_linear(*linear_args: Any, **linear_kwargs: Any) -> torch.Tensor:
            nonlocal calls
            calls += 1
            out = original_linear(*linear_args, **linear_kwargs)
            return out + mask.to(device=out.device, dtype=out.dtype)

        functional.linear = masked_linear
        try:
            result = original_forward(*args, **kwargs)
        finally:
            functional.linear = original_linear
        applied[0] += calls
        if calls != 1:
            raise RuntimeError(
                f"{type(router).__name__}.forward made {calls} F.linear calls, expected exactly 1;"
                " the oracle cannot mask this router"
            )
        return result

    router.forward = forward
    try:
        yield
    finally:
        if had_instance_forward:
            router.forward = original_forward
        else:
            del router.forward


# --------------------------------------------------------------------------- head masking


@contextmanager
def _mask_heads(model: PreTrainedModel, layer: int, ids: Sequence[int]) -> Iterator[None]:
    """Zero the pruned query heads' slices at the input of layer ``layer``'s ``o_proj``."""
    o_proj = find_o_proj(model, layer)
    config = model.config.get_text_config()
    num_heads = int(config.num_attention_heads)
    width, remainder = divmod(o_proj.in_features, num_heads)
    if remainder:
        raise ValueError(
            f"layer {layer}: o_proj input width {o_proj.in_features} is not a multiple of "
            f"num_attention_heads={num_heads}"
        )
    pruned = sorted({int(i) for i in ids})
    if len(pruned) != len(ids):
        raise ValueError(f"repeated head ids: {list(ids)}")
    if pruned and not 0 <= pruned[0] <= pruned[-1] < num_heads:
        raise ValueError(f"head ids {pruned} out of range for {num_heads} heads")
    drop = torch.zeros(num_heads, 1, dtype=torch.bool)
    drop[pruned] = True

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        per_head = hidden.reshape(*hidden.shape[:-1], num_heads, width)
        zeroed = per_head.masked_fill(drop.to(hidden.device), 0.0)
        return (zeroed.reshape(hidden.shape), *args[1:])

    handle = o_proj.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()

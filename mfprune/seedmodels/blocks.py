"""Pieces shared by the seed-paper reference models: router, routed-expert combine, FFN,
attention, and a decoder skeleton that each model fills with its own MoE block.

The shapes follow transformers' MoE contract, so mfprune's profiler and oracle see these models
as they see a stock family: a block (``moe``) holds a ``router`` whose class name ends in
``TopKRouter`` (forward: ``x [T, D] -> (logits [T, E], weights [T, K], index [T, K])``, the
logits from one ``F.linear`` call) and an ``experts`` module called as
``experts(hidden [T, D], top_k_index [T, K], top_k_weights [T, K]) -> [T, D]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast


class SeedTopKRouter(nn.Module):
    """Softmax router, top-k, renormalised over the k picked experts."""

    def __init__(self, *, hidden: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))  # [E, D]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)  # [T, E]
        probs = logits.float().softmax(dim=-1)
        weights, index = probs.topk(self.top_k, dim=-1)  # [T, K], [T, K]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), index


def combine(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    expert: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``sum_k w[t, k] * expert(index[t, k], hidden[t])`` for every token t; hidden [T, D],
    index/weights [T, K]; ``expert(e, rows [N, D]) -> [N, D]``. Experts run in id order."""
    out = torch.zeros_like(hidden)  # [T, D]
    for e in top_k_index.unique().tolist():
        token, slot = (top_k_index == e).nonzero(as_tuple=True)
        rows = expert(int(e), hidden[token]) * top_k_weights[token, slot, None]
        out.index_add_(0, token, rows.to(out.dtype))
    return out


class SwiGLU(nn.Module):
    def __init__(self, *, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SeedAttention(nn.Module):
    """Causal multi-head self-attention (no positional encoding: the causal mask orders)."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, s, d = x.shape  # [B, S, D]

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)  # [B, H, S, d/H]

        allowed = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()  # [S, S]
        if mask is not None:  # padding keys are never attended to (a token sees itself)
            allowed = allowed & mask[:, None, None, :].bool()
            allowed = allowed | torch.eye(s, dtype=torch.bool, device=x.device)
        out = F.scaled_dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), attn_mask=allowed
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, s, d))


class SeedLayer(nn.Module):
    """``x + mixer(norm(x))`` then ``x + moe(norm(x))``; the mixer is attention unless the
    model brings its own (``mixer_name``)."""

    def __init__(
        self, config: PretrainedConfig, *, moe: nn.Module, mixer: nn.Module, mixer_name: str
    ) -> None:
        super().__init__()
        self.mixer_name = mixer_name
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.add_module(mixer_name, mixer)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.moe = moe

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + getattr(self, self.mixer_name)(self.input_layernorm(x), mask)
        h = self.post_attention_layernorm(x)
        return x + self.moe(h.reshape(-1, h.shape[-1])).view_as(h)


class SeedDecoder(nn.Module):
    def __init__(self, config: PretrainedConfig, make_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(make_layer(i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> BaseModelOutput:
        x = self.embed_tokens(input_ids)  # [B, S, D]
        for layer in self.layers:
            x = layer(x, attention_mask)
        return BaseModelOutput(last_hidden_state=self.norm(x))


class SeedForCausalLM(PreTrainedModel, GenerationMixin):
    """A decoder of ``SeedLayer`` s and an LM head; subclasses say how a layer is made."""

    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["SeedLayer"]

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.model = SeedDecoder(config, self.make_layer)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def make_layer(self, layer: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **_: Any,
    ) -> CausalLMOutputWithPast:
        """Logits [B, S, V] of ``input_ids`` [B, S]. No KV cache: the "cache" is the token ids
        seen so far [B, S_past], and a step with it recomputes the whole prefix (exact, slow;
        it lets ``bench`` time decoding with transformers' calling convention)."""
        new = input_ids.shape[1]
        if past_key_values is not None:
            input_ids = torch.cat([past_key_values, input_ids], dim=1)
            if attention_mask is not None and attention_mask.shape[1] != input_ids.shape[1]:
                attention_mask = None  # decoding: every token is real
        hidden = self.model(input_ids, attention_mask).last_hidden_state
        logits = self.lm_head(hidden[:, -new:])  # [B, S, V]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)
            )
        cache = input_ids if use_cache else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)


def randomise(model: nn.Module, *, seed: int, router_std: float = 1.0) -> None:
    """Deterministic random weights: std 0.1 (routers ``router_std``, so routing varies
    between tokens), norms at 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            std = router_std if ".router." in name else 0.1
            param.copy_(torch.randn(param.shape, generator=generator) * std)

"""PESC / Camelidae (seeds/003): a dense FFN shared by every expert, experts that differ only
by a small adapter each, and a top-k router.

Expert e of a layer computes ``A_e(F(x))`` with ``F`` the layer's shared FFN and
``A_e(h) = h + up_e(silu(down_e(h)))`` its adapter (``down_e [r, D]``, ``up_e [D, r]``); the
layer returns ``sum_k g_k A_k(F(x))`` with the router's renormalised top-k weights ``g``. Since
``F`` is computed once and shared, pruning an expert removes only its adapter and its router
row; the shared FFN is never touched.

On disk (``save_pretrained``): ``model.layers.{L}.moe.router.weight [E, D]``,
``model.layers.{L}.moe.ffn.{gate,up,down}_proj.weight`` (shared),
``model.layers.{L}.moe.experts.{e}.{down,up}.weight`` (per expert).
Adapter: ``mfprune/seedmodels/pesc_moe.toml`` (``--arch``). Load with
``--model-code mfprune.seedmodels.pesc:PescForCausalLM``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from mfprune.seedmodels.blocks import (
    SeedAttention,
    SeedForCausalLM,
    SeedLayer,
    SeedTopKRouter,
    SwiGLU,
    combine,
)


class PescConfig(PretrainedConfig):
    model_type = "pesc_moe"

    def __init__(
        self,
        vocab_size: int = 128,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_local_experts: int = 8,
        num_experts_per_tok: int = 2,
        adapter_dim: int = 8,
        rms_norm_eps: float = 1e-6,
        **kwargs,
    ) -> None:
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.intermediate_size, self.num_hidden_layers = intermediate_size, num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_local_experts, self.num_experts_per_tok = num_local_experts, num_experts_per_tok
        self.adapter_dim, self.rms_norm_eps = adapter_dim, rms_norm_eps
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class Adapter(nn.Module):
    def __init__(self, *, hidden: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)  # [r, D]
        self.up = nn.Linear(rank, hidden, bias=False)  # [D, r]

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, D]
        return h + self.up(F.silu(self.down(h)))


class PescAdapters(nn.ModuleList):
    """The routed experts (``experts.{e}``): one adapter each, on the shared FFN's output."""

    def __init__(self, config: PescConfig) -> None:
        super().__init__(
            Adapter(hidden=config.hidden_size, rank=config.adapter_dim)
            for _ in range(config.num_local_experts)
        )

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:  # hidden = F(x) [T, D]; index, weights [T, K]
        return combine(hidden, top_k_index, top_k_weights, lambda e, h: self[e](h))


class PescMoe(nn.Module):
    def __init__(self, config: PescConfig) -> None:
        super().__init__()
        self.router = SeedTopKRouter(
            hidden=config.hidden_size,
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
        )
        self.ffn = SwiGLU(hidden=config.hidden_size, intermediate=config.intermediate_size)
        self.experts = PescAdapters(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D]
        _, weights, index = self.router(x)  # routed on the layer input
        return self.experts(self.ffn(x), index, weights)


class PescForCausalLM(SeedForCausalLM):
    config_class = PescConfig

    def make_layer(self, layer: int) -> nn.Module:
        return SeedLayer(
            self.config,
            moe=PescMoe(self.config),
            mixer=SeedAttention(self.config),
            mixer_name="self_attn",
        )

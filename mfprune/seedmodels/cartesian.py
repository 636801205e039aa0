"""CartesianMoE (seeds/002): routed experts that share knowledge "multiplicatively" — each is
the product of one sub-expert from each of S sets, so one sub-expert serves many experts.

Layer L has S sets of sub-experts (SwiGLU FFNs ``[D] -> [D]``, intermediate
``sub_expert_intermediate_size``); routed expert e is ``(i_1, ..., i_S) = table[L][e]`` and
computes ``A^S_{i_S}( ... A^1_{i_1}(x))``, sub-experts applied set by set. With the full grid
(``sub_expert_table`` unset) E = n_1 * ... * n_S and the table is the row-major product:
for S = 2, expert e = (e // n_2, e % n_2). The router scores the E routed experts; the layer
returns ``sum_k g_k expert_k(x)`` with renormalised top-k weights ``g``.

A pruned checkpoint keeps each layer's table (``sub_expert_table``: ``{layer: [[i_1, ...,
i_S] per expert]}``) and set sizes (``sub_expert_counts``: ``{layer: [n_1, ..., n_S]}``), since
layers lose different sub-experts; this class reads them.

On disk (``save_pretrained``): ``model.layers.{L}.moe.router.weight [E, D]``,
``model.layers.{L}.moe.experts.sets.{s}.{i}.{gate,up,down}_proj.weight`` (sub-expert i of set
s: ``[I, D]``, ``[I, D]``, ``[D, I]``). Adapter: ``mfprune/seedmodels/cartesian_moe.toml``
(``--arch``). Load with ``--model-code mfprune.seedmodels.cartesian:CartesianForCausalLM``.
"""

from __future__ import annotations

import math

import torch
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


class CartesianConfig(PretrainedConfig):
    model_type = "cartesian_moe"

    def __init__(
        self,
        vocab_size: int = 128,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_sub_experts: list[int] | None = None,
        sub_expert_intermediate_size: int = 32,
        num_local_experts: int | None = None,
        num_experts_per_tok: int = 2,
        sub_expert_table: dict[str, list[list[int]]] | None = None,
        sub_expert_counts: dict[str, list[int]] | None = None,
        rms_norm_eps: float = 1e-6,
        **kwargs,
    ) -> None:
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_sub_experts = list(num_sub_experts or [2, 4])
        self.sub_expert_intermediate_size = sub_expert_intermediate_size
        self.num_local_experts = num_local_experts or math.prod(self.num_sub_experts)
        self.num_experts_per_tok = num_experts_per_tok
        self.sub_expert_table, self.sub_expert_counts = sub_expert_table, sub_expert_counts
        self.rms_norm_eps = rms_norm_eps
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def layer_counts(self, layer: int) -> list[int]:
        """Sub-experts per set in ``layer`` [S]."""
        counts = (self.sub_expert_counts or {}).get(str(layer))
        return list(counts) if counts is not None else list(self.num_sub_experts)

    def layer_table(self, layer: int) -> list[list[int]]:
        """Each routed expert's sub-expert per set in ``layer`` [E][S]."""
        table = (self.sub_expert_table or {}).get(str(layer))
        if table is not None:
            return [list(row) for row in table]
        grid: list[list[int]] = [[]]
        for n in self.layer_counts(layer):
            grid = [[*row, i] for row in grid for i in range(n)]
        return grid


class CartesianExperts(nn.Module):
    """The routed experts of one layer: ``sets[s][i]`` is sub-expert i of set s."""

    def __init__(self, config: CartesianConfig, layer: int) -> None:
        super().__init__()
        d, i = config.hidden_size, config.sub_expert_intermediate_size
        self.table = config.layer_table(layer)  # [E][S]
        self.sets = nn.ModuleList(
            nn.ModuleList(SwiGLU(hidden=d, intermediate=i) for _ in range(n))
            for n in config.layer_counts(layer)
        )

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, D]
        for subs, i in zip(self.sets, self.table[e], strict=True):
            x = subs[i](x)
        return x

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:  # hidden [T, D]; index, weights [T, K]
        return combine(hidden, top_k_index, top_k_weights, self.expert)


class CartesianMoe(nn.Module):
    def __init__(self, config: CartesianConfig, layer: int) -> None:
        super().__init__()
        self.experts = CartesianExperts(config, layer)
        self.router = SeedTopKRouter(
            hidden=config.hidden_size,
            num_experts=len(self.experts.table),
            top_k=config.num_experts_per_tok,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D]
        _, weights, index = self.router(x)
        return self.experts(x, index, weights)


class CartesianForCausalLM(SeedForCausalLM):
    config_class = CartesianConfig

    def make_layer(self, layer: int) -> nn.Module:
        return SeedLayer(
            self.config,
            moe=CartesianMoe(self.config, layer),
            mixer=SeedAttention(self.config),
            mixer_name="self_attn",
        )

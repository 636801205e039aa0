"""sMLP (seeds/004): a sparse all-MLP block = a feature-wise MoE that mixes tokens (sMoE) and a
token-wise MoE of FFN experts (tMoE); no attention.

* sMoE (``model.layers.{L}.smoe``): the hidden vector is cut into ``num_spatial_units`` chunks
  of features and chunk c goes to spatial gating unit c (the paper's deterministic feature
  routing). Unit c mixes its chunk along the sequence with a causal (lower-triangular)
  ``[S, S]`` matrix and gates it: ``u_c(x) = x_c * (tril(W_c) x_c + b_c)``.
* tMoE (``model.layers.{L}.moe``): a softmax top-k router over ``num_local_experts`` SwiGLU FFN
  experts, like any routed-FFN MoE.

On disk: ``moe.router.weight [E, D]``, ``moe.experts.{e}.{gate,up,down}_proj.weight``,
``smoe.units.{c}.weight [S_max, S_max]`` and ``.bias [S_max]``. Adapter:
``mfprune/seedmodels/smlp_moe.toml`` (``--arch``; tMoE experts only: pruning an sMoE unit
would delete a slice of the hidden features every later layer reads, which no router mask
reproduces — see docs/custom-models.md).
Load with ``--model-code mfprune.seedmodels.smlp:SmlpForCausalLM``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from mfprune.seedmodels.blocks import (
    SeedForCausalLM,
    SeedLayer,
    SeedTopKRouter,
    SwiGLU,
    combine,
)


class SmlpConfig(PretrainedConfig):
    model_type = "smlp_moe"

    def __init__(
        self,
        vocab_size: int = 128,
        hidden_size: int = 64,
        intermediate_size: int = 64,
        num_hidden_layers: int = 2,
        num_local_experts: int = 8,
        num_experts_per_tok: int = 2,
        num_spatial_units: int = 4,
        max_position_embeddings: int = 64,
        rms_norm_eps: float = 1e-6,
        **kwargs,
    ) -> None:
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.intermediate_size, self.num_hidden_layers = intermediate_size, num_hidden_layers
        self.num_local_experts, self.num_experts_per_tok = num_local_experts, num_experts_per_tok
        self.num_spatial_units = num_spatial_units
        self.max_position_embeddings, self.rms_norm_eps = max_position_embeddings, rms_norm_eps
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class SpatialGatingUnit(nn.Module):
    """One sMoE expert: causal token mixing of its feature chunk, used as a gate."""

    def __init__(self, *, max_len: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_len, max_len))  # [S_max, S_max]
        self.bias = nn.Parameter(torch.zeros(max_len))  # [S_max]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, c] -> [B, S, c]
        s = x.shape[1]
        mix = torch.einsum("ts,bsc->btc", self.weight[:s, :s].tril(), x)
        return x * (mix + self.bias[:s, None])


class SpatialMoe(nn.Module):
    """sMoE: feature chunk c -> unit c; the outputs are concatenated back to [B, S, D]."""

    def __init__(self, config: SmlpConfig) -> None:
        super().__init__()
        if config.hidden_size % config.num_spatial_units:
            raise ValueError("hidden_size must be a multiple of num_spatial_units")
        self.units = nn.ModuleList(
            SpatialGatingUnit(max_len=config.max_position_embeddings)
            for _ in range(config.num_spatial_units)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:  # padding positions feed nothing into the mixing
            x = x * mask[..., None].to(x.dtype)
        chunks = x.chunk(len(self.units), dim=-1)  # each [B, S, D / units]
        return torch.cat([unit(c) for unit, c in zip(self.units, chunks, strict=True)], dim=-1)


class FfnExperts(nn.ModuleList):
    """tMoE experts (``experts.{e}``): SwiGLU FFNs."""

    def __init__(self, config: SmlpConfig) -> None:
        super().__init__(
            SwiGLU(hidden=config.hidden_size, intermediate=config.intermediate_size)
            for _ in range(config.num_local_experts)
        )

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:  # hidden [T, D]; index, weights [T, K]
        return combine(hidden, top_k_index, top_k_weights, lambda e, h: self[e](h))


class TokenMoe(nn.Module):
    def __init__(self, config: SmlpConfig) -> None:
        super().__init__()
        self.router = SeedTopKRouter(
            hidden=config.hidden_size,
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
        )
        self.experts = FfnExperts(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D]
        _, weights, index = self.router(x)
        return self.experts(x, index, weights)


class SmlpForCausalLM(SeedForCausalLM):
    config_class = SmlpConfig

    def make_layer(self, layer: int) -> nn.Module:
        return SeedLayer(
            self.config, moe=TokenMoe(self.config), mixer=SpatialMoe(self.config), mixer_name="smoe"
        )

"""Plain PyTorch references for the fused MoE kernels: slow, obvious, and the ground truth.

Dimension letters: T tokens, K top-k slots per token, S = T*K token-slots, E experts, D hidden,
I expert intermediate size. Slot ``s = t*K + k`` is token ``t``'s ``k``-th routing choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_reference(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    return_norms: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU mixture of experts, one expert at a time, computed in float32.

    Args:
        hidden_states: ``[T, D]``.
        top_k_index: ``[T, K]`` expert of each slot; a value outside ``[0, E)`` (the
            expert-parallel sentinel) drops the slot.
        top_k_weights: ``[T, K]`` routing weight of each slot.
        gate_up_proj: ``[E, 2I, D]``, gate rows first, then up rows (transformers v5 layout).
        down_proj: ``[E, D, I]``.
        return_norms: also return ``‖E_i(x)‖₂`` of each slot, before the routing weight.

    Returns:
        ``[T, D]`` in the dtype of ``hidden_states``; with ``return_norms``, also ``[T, K]``
        float32 norms (0 for dropped slots).
    """
    num_tokens, top_k = top_k_index.shape
    num_experts, two_i, _ = gate_up_proj.shape
    x = hidden_states.float()  # [T, D]
    out = torch.zeros_like(x)  # [T, D]
    norms = torch.zeros(num_tokens, top_k, dtype=torch.float32, device=x.device)  # [T, K]
    for expert in range(num_experts):
        token, slot = torch.where(top_k_index == expert)
        if token.numel() == 0:
            continue
        gate, up = (x[token] @ gate_up_proj[expert].float().T).split(two_i // 2, dim=-1)
        expert_out = (F.silu(gate) * up) @ down_proj[expert].float().T  # [n, D]
        norms[token, slot] = expert_out.norm(dim=-1)
        weight = top_k_weights[token, slot].float()[:, None]  # [n, 1]
        out.index_add_(0, token, expert_out * weight)
    out = out.to(hidden_states.dtype)
    return (out, norms) if return_norms else out


def align_slots_reference(
    top_k_index: torch.Tensor, *, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Python-loop twin of :func:`mfprune_kernels.moe.align.align_slots`.

    Returns ``(sorted_slot_ids, block_expert_ids)`` with the same contents and sizes: slots
    grouped by expert in increasing slot order, each expert's run (dropped slots last, as expert
    ``E``) padded to a multiple of ``block_m`` with the value ``S``, and one expert id per block
    (``E`` for dropped-slot blocks and for the unused tail).
    """
    flat = top_k_index.reshape(-1).tolist()
    num_slots = len(flat)
    buckets: list[list[int]] = [[] for _ in range(num_experts + 1)]
    for slot, expert in enumerate(flat):
        buckets[expert if 0 <= expert < num_experts else num_experts].append(slot)
    slot_ids: list[int] = []
    block_experts: list[int] = []
    for expert, slots in enumerate(buckets):
        num_blocks = -(-len(slots) // block_m)
        slot_ids += slots + [num_slots] * (num_blocks * block_m - len(slots))
        block_experts += [expert] * num_blocks
    nonempty = min(num_slots, num_experts + 1)
    capacity = -(-(num_slots + nonempty * (block_m - 1)) // block_m)
    slot_ids += [num_slots] * (capacity * block_m - len(slot_ids))
    block_experts += [num_experts] * (capacity - len(block_experts))
    device = top_k_index.device
    return (
        torch.tensor(slot_ids, dtype=torch.int32, device=device),
        torch.tensor(block_experts, dtype=torch.int32, device=device),
    )

"""Group token-slots by expert and pad each expert's run to the kernel's row block.

The grouped GEMMs walk ``sorted_slot_ids`` in blocks of ``block_m`` rows, and every block
belongs to exactly one expert (``block_expert_ids``). Everything here is tensor ops on the
device (sort, cumsum, scatter, searchsorted) with sizes that follow from the shapes alone, so
there is no host synchronisation and the step can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SlotAlignment:
    """Slots of one MoE call grouped by expert (see :func:`align_slots`).

    Attributes:
        sorted_slot_ids: ``[num_blocks * block_m]`` int32 slot ids (``s = t*K + k``), grouped
            by expert, each group padded with the value ``num_slots`` up to a whole block.
        block_expert_ids: ``[num_blocks]`` int32 expert of each block; ``num_experts`` marks
            blocks of dropped slots (expert-parallel sentinels) and the unused tail.
        block_m: rows per block.
        num_slots: ``S = T*K``.
    """

    sorted_slot_ids: torch.Tensor
    block_expert_ids: torch.Tensor
    block_m: int
    num_slots: int

    @property
    def num_blocks(self) -> int:
        return self.block_expert_ids.numel()


def align_capacity(num_slots: int, num_experts: int, block_m: int) -> int:
    """Blocks needed in the worst case: every non-empty group (at most ``min(S, E+1)``,
    counting the dropped-slot group) wastes at most ``block_m - 1`` rows."""
    nonempty = min(num_slots, num_experts + 1)
    return -(-(num_slots + nonempty * (block_m - 1)) // block_m)


def align_slots(top_k_index: torch.Tensor, *, num_experts: int, block_m: int) -> SlotAlignment:
    """Sort the ``S = T*K`` token-slots of ``top_k_index [T, K]`` by expert, padded per expert.

    Slots whose expert lies outside ``[0, E)`` (the expert-parallel sentinel ``E``) are grouped
    last under expert ``E``; the kernels write zeros for them. Within an expert, slots keep
    their order. The result has a fixed size (:func:`align_capacity` blocks), so no value has to
    be read back to the host.
    """
    device = top_k_index.device
    flat = top_k_index.reshape(-1)  # [S]
    num_slots = flat.numel()
    expert = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # [S]
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.index_add_(0, expert, torch.ones_like(expert))  # [E+1]; bincount would sync on CUDA
    padded = (counts + block_m - 1) // block_m * block_m  # [E+1]
    padded_end = padded.cumsum(0)  # [E+1]
    padded_start = padded_end - padded
    start = counts.cumsum(0) - counts  # [E+1]

    order = torch.argsort(expert, stable=True)  # [S] slot ids grouped by expert
    sorted_expert = expert[order]
    rank = torch.arange(num_slots, device=device) - start[sorted_expert]  # place within expert
    capacity = align_capacity(num_slots, num_experts, block_m)
    sorted_slot_ids = torch.full((capacity * block_m,), num_slots, dtype=torch.int32, device=device)
    sorted_slot_ids[padded_start[sorted_expert] + rank] = order.to(torch.int32)

    block_start = torch.arange(0, capacity * block_m, block_m, device=device)  # [num_blocks]
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert_ids = block_expert.clamp_(max=num_experts).to(torch.int32)
    return SlotAlignment(
        sorted_slot_ids=sorted_slot_ids,
        block_expert_ids=block_expert_ids,
        block_m=block_m,
        num_slots=num_slots,
    )

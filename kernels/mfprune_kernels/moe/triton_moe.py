"""Fused SwiGLU mixture-of-experts forward in Triton, with an optional per-slot output norm.

Two launches, each a grouped GEMM over the token-slots of one expert at a time:

1. ``gate_up``: ``H[s] = silu(x[t] @ Wg[e].T) * (x[t] @ Wu[e].T)`` with ``Wg, Wu`` the two
   halves of ``gate_up_proj[e]`` (``[2I, D]``); SwiGLU is applied in the epilogue, so the
   ``[S, 2I]`` pre-activation never reaches memory.
2. ``down``: ``Y[s] = g[s] * (H[s] @ down_proj[e].T)``, the routing weight applied in the
   epilogue; with ``NORMS`` the epilogue also writes the partial sums of squares of the
   unweighted row, so ``‖E_e(x_t)‖₂`` comes for the price of a reduction.

Then ``out[t] = Σ_k Y[t*K + k]``. For many slots the rows are grouped by expert and padded to
``BLOCK_M`` (:mod:`.align`) and each program multiplies a ``[BLOCK_M, BLOCK_K]`` tile of rows
with a ``[BLOCK_K, BLOCK_N]`` weight tile (``tl.dot``). For few slots (decode) there is no
sorting: one program per (slot, N-block), a matrix-vector product.

Under ``TRITON_INTERPRET=1`` (CPU tests) every load is cast to float32 (the interpreter's
bf16 arithmetic is wrong) and autotuning has a single config (several need a GPU).
See :func:`mfprune_kernels.moe.naive.moe_reference` for the plain PyTorch twin.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mfprune_kernels.errors import KernelInputError
from mfprune_kernels.moe.align import align_slots


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


#: Whether the kernels run under the Triton interpreter. ``@triton.jit`` reads the setting when
#: this module is imported, so it is read once, here, too.
INTERPRET: bool = _interpreting()

#: At most this many token-slots (``T*K``) take the decode path (no sorting, one program per
#: slot and N-block). Not tuned on a GPU yet.
DECODE_MAX_SLOTS = 32

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _configs(*, decode: bool) -> list[triton.Config]:
    """Autotuning candidates: one under the interpreter, a small sweep on a GPU."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1}, num_stages=1)]
    if decode:
        shapes = [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3)]
        return [
            triton.Config({"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 1}, num_warps=w, num_stages=s)
            for n, k, w, s in shapes
        ]
    # (BLOCK_N, BLOCK_K, warps, stages); the 16-bit GEMM1 with the largest tile needs 160 KiB
    # of shared memory at 2 stages. Configs that do not fit a GPU are skipped by the autotuner.
    shapes = [(64, 32, 4, 4), (64, 64, 4, 3), (128, 32, 4, 4), (128, 64, 8, 3), (128, 128, 8, 2)]
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for n, k, w, s in shapes
    ]


#: Narrowest N-block of any config: sizes the buffer of per-block partial norms.
_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for d in (False, True) for c in _configs(decode=d))
_TUNE_KEY = ["N", "KD", "BLOCK_M", "slots_pow2"]


@triton.jit
def _locate(
    slot_ids_ptr,
    block_expert_ptr,
    num_slots,
    num_experts,
    num_m_blocks,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    DECODE: tl.constexpr,
):
    """This program's N-block, its rows' slot ids ``[BLOCK_M]``, which rows are real slots,
    and the expert (int64) with whether it is a real one (not padding or a dropped slot).

    Programs are ordered so that ``GROUP_M`` consecutive row blocks (mostly one expert) sweep
    the N-blocks together, which keeps their weight tiles in L2.
    """
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n_blocks
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if DECODE:  # noqa: SIM108 (a constexpr branch reads better as a statement in a kernel)
        slot = rows  # one slot per program, in slot order; block_expert_ptr is top_k_index
    else:
        slot = tl.load(slot_ids_ptr + rows)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    active = (expert >= 0) & (expert < num_experts)
    return pid_n, slot, slot < num_slots, expert, active


@triton.jit
def _multiply_add(acc, a, b, DECODE: tl.constexpr, PRECISION: tl.constexpr):
    """``acc [M, N] += a [M, K] @ b [K, N]``: a tensor-core dot, or for decode (M = 1, below
    ``tl.dot``'s minimum) a broadcast multiply and a reduction in float32."""
    if DECODE:
        prod = a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :]
        return acc + tl.sum(prod, axis=1)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, D]
    w_ptr,  # [E, 2I, D]
    h_ptr,  # [S, I] out
    slot_ids_ptr,  # [num_m_blocks * BLOCK_M] int32 (unused for decode)
    block_expert_ptr,  # [num_m_blocks]: expert of each row block (decode: of each slot)
    num_slots,
    num_experts,
    num_m_blocks,
    N,  # I
    KD,  # D
    slots_pow2,  # autotuning key only
    stride_xt,
    stride_xd,
    stride_we,
    stride_wn,
    stride_wk,
    stride_hs,
    stride_hn,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DECODE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``H[s, n] = silu(x[t] · Wg[e, n]) * (x[t] · Wu[e, n])`` for one tile of slots × n."""
    pid_n, slot, valid, expert, active = _locate(
        slot_ids_ptr,
        block_expert_ptr,
        num_slots,
        num_experts,
        num_m_blocks,
        N,
        BLOCK_M,
        BLOCK_N,
        GROUP_M,
        DECODE,
    )
    token = (slot // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    a_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xd
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    u_ptrs = g_ptrs + N * stride_wn  # the up rows follow the I gate rows
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_steps = tl.where(active, tl.cdiv(KD, BLOCK_K), 0)  # dropped slots: nothing to multiply
    for step in range(0, k_steps):
        k_mask = offs_k < KD - step * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            g = g.to(tl.float32)
            u = u.to(tl.float32)
        acc_g = _multiply_add(acc_g, a, g, DECODE, PRECISION)
        acc_u = _multiply_add(acc_u, a, u, DECODE, PRECISION)
        a_ptrs += BLOCK_K * stride_xd
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    h = acc_g * tl.sigmoid(acc_g) * acc_u  # SwiGLU epilogue
    h_ptrs = h_ptr + slot[:, None].to(tl.int64) * stride_hs + offs_n[None, :] * stride_hn
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(
    h_ptr,  # [S, I]
    w_ptr,  # [E, D, I]
    y_ptr,  # [S, D] out
    route_ptr,  # [S] routing weights
    sq_ptr,  # [S, >= cdiv(D, BLOCK_N)] float32 out: partial sums of squares (NORMS only)
    slot_ids_ptr,
    block_expert_ptr,
    num_slots,
    num_experts,
    num_m_blocks,
    N,  # D
    KD,  # I
    slots_pow2,  # autotuning key only
    stride_hs,
    stride_hk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ys,
    stride_yn,
    stride_sq,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DECODE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    NORMS: tl.constexpr,
):
    """``Y[s, n] = g[s] * (H[s] · Wd[e, n])`` for one tile; with ``NORMS`` also
    ``sq[s, pid_n] = Σ_n (H[s] · Wd[e, n])²`` over this tile's n."""
    pid_n, slot, valid, expert, active = _locate(
        slot_ids_ptr,
        block_expert_ptr,
        num_slots,
        num_experts,
        num_m_blocks,
        N,
        BLOCK_M,
        BLOCK_N,
        GROUP_M,
        DECODE,
    )
    slot64 = slot.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    a_ptrs = h_ptr + slot64[:, None] * stride_hs + offs_k[None, :] * stride_hk
    b_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_steps = tl.where(active, tl.cdiv(KD, BLOCK_K), 0)  # dropped slots: write zeros
    for step in range(0, k_steps):
        k_mask = offs_k < KD - step * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = _multiply_add(acc, a, b, DECODE, PRECISION)
        a_ptrs += BLOCK_K * stride_hk
        b_ptrs += BLOCK_K * stride_wk
    if NORMS:  # columns past N hold zeros, so they add nothing
        tl.store(sq_ptr + slot64 * stride_sq + pid_n, tl.sum(acc * acc, axis=1), mask=valid)
    route = tl.load(route_ptr + slot64, mask=valid, other=0.0).to(tl.float32)
    y = acc * route[:, None]  # routing-weight epilogue
    y_ptrs = y_ptr + slot64[:, None] * stride_ys + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


def _autotuned(kernel: triton.JITFunction, *, decode: bool, reset: list[str] | None = None):
    return triton.autotune(configs=_configs(decode=decode), key=_TUNE_KEY, reset_to_zero=reset)(
        kernel
    )


_gate_up = {d: _autotuned(_gate_up_kernel, decode=d) for d in (False, True)}
# Autotuning runs the kernel once per config: the partial-norm buffer must start at zero again.
_down = {d: _autotuned(_down_kernel, decode=d, reset=["sq_ptr"]) for d in (False, True)}


def pick_block_m(num_slots: int, num_experts: int) -> int:
    """Rows per block for the grouped path: about the mean number of slots per expert, so that
    padding wastes little, within 16 (``tl.dot``'s minimum) to 64."""
    per_expert = num_slots / max(num_experts, 1)
    return next((m for m in (16, 32) if per_expert <= m), 64)


def _check_inputs(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> None:
    if hidden_states.dim() != 2 or top_k_index.dim() != 2:
        raise KernelInputError(
            f"expected hidden_states [T, D] and top_k_index [T, K]; got "
            f"{tuple(hidden_states.shape)} and {tuple(top_k_index.shape)}"
        )
    num_tokens, hidden = hidden_states.shape
    if top_k_index.shape[0] != num_tokens or top_k_weights.shape != top_k_index.shape:
        raise KernelInputError(
            f"top_k_index {tuple(top_k_index.shape)} and top_k_weights "
            f"{tuple(top_k_weights.shape)} must both be [T, K] with T = {num_tokens}"
        )
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise KernelInputError("expected gate_up_proj [E, 2I, D] and down_proj [E, D, I]")
    num_experts, two_i, d_in = gate_up_proj.shape
    if two_i % 2 or d_in != hidden or down_proj.shape != (num_experts, hidden, two_i // 2):
        raise KernelInputError(
            f"expert weights do not match: gate_up_proj {tuple(gate_up_proj.shape)} should be "
            f"[E, 2I, D={hidden}] and down_proj {tuple(down_proj.shape)} [E, D, I]"
        )
    dtypes = {hidden_states.dtype, gate_up_proj.dtype, down_proj.dtype}
    if len(dtypes) != 1 or hidden_states.dtype not in _DTYPES:
        raise KernelInputError(
            f"hidden states and expert weights must share one dtype of float32, float16, "
            f"bfloat16; got {sorted(str(d) for d in dtypes)}"
        )
    devices = {t.device for t in (hidden_states, top_k_index, top_k_weights, gate_up_proj)}
    if len(devices | {down_proj.device}) != 1:
        raise KernelInputError(f"all inputs must be on one device; got {sorted(map(str, devices))}")
    if not INTERPRET and hidden_states.device.type != "cuda":
        raise KernelInputError(
            f"the Triton MoE kernels need CUDA tensors, got {hidden_states.device}; on CPU set "
            "TRITON_INTERPRET=1 before triton is imported (slow: for tests), or use an "
            "experts implementation such as 'grouped_mm'"
        )


def fused_moe(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    return_norms: bool = False,
    block_m: int | None = None,
    decode: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU mixture-of-experts forward (inference only: no autograd).

    Args:
        hidden_states: ``[T, D]``.
        top_k_index: ``[T, K]`` expert of each slot; values outside ``[0, E)`` (the
            expert-parallel sentinel ``E``) drop the slot.
        top_k_weights: ``[T, K]`` routing weights (any float dtype).
        gate_up_proj: ``[E, 2I, D]``, the ``I`` gate rows then the ``I`` up rows.
        down_proj: ``[E, D, I]``.
        return_norms: also return each slot's ``‖E_e(x_t)‖₂`` (before the routing weight).
        block_m: rows per block on the grouped path; default :func:`pick_block_m`.
        decode: force (True) or forbid (False) the decode path; default: decode when
            ``T*K <= DECODE_MAX_SLOTS``.

    Returns:
        ``[T, D]`` in the dtype of ``hidden_states``; with ``return_norms`` also ``[T, K]``
        float32 norms (0 for dropped slots).

    Raises:
        KernelInputError: on mismatched shapes or dtypes, or CPU tensors outside the
            interpreter.
    """
    _check_inputs(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj)
    num_tokens, hidden = hidden_states.shape
    top_k = top_k_index.shape[1]
    num_experts, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    num_slots = num_tokens * top_k
    device, dtype = hidden_states.device, hidden_states.dtype
    norms = torch.zeros(num_tokens, top_k, dtype=torch.float32, device=device)  # [T, K]
    if num_slots == 0:
        out = torch.zeros_like(hidden_states)
        return (out, norms) if return_norms else out

    use_decode = num_slots <= DECODE_MAX_SLOTS if decode is None else decode
    if use_decode:
        block_m = 1
        slot_ids = top_k_index  # never read
        block_expert = top_k_index.reshape(num_slots).contiguous()  # [S]: one "block" per slot
        num_m_blocks = num_slots
    else:
        block_m = block_m or pick_block_m(num_slots, num_experts)
        if block_m < 16 or block_m & (block_m - 1):
            raise KernelInputError(f"block_m must be a power of two >= 16, got {block_m}")
        alignment = align_slots(top_k_index, num_experts=num_experts, block_m=block_m)
        slot_ids, block_expert = alignment.sorted_slot_ids, alignment.block_expert_ids
        num_m_blocks = alignment.num_blocks

    route = top_k_weights.reshape(num_slots).contiguous()  # [S]
    h = torch.empty(num_slots, inter, dtype=dtype, device=device)  # [S, I]
    y = torch.empty(num_slots, hidden, dtype=dtype, device=device)  # [S, D]
    if return_norms:
        sq = torch.zeros(
            num_slots, triton.cdiv(hidden, _MIN_BLOCK_N), dtype=torch.float32, device=device
        )
    else:
        sq = torch.zeros(1, 1, dtype=torch.float32, device=device)  # never written
    fp32_ieee = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    common = {
        "BLOCK_M": block_m,
        "DECODE": use_decode,
        "UPCAST": INTERPRET,
        "PRECISION": "ieee" if fp32_ieee else "tf32",
    }
    slots_pow2 = triton.next_power_of_2(num_slots)

    def grid(n: int):
        return lambda meta: (num_m_blocks * triton.cdiv(n, meta["BLOCK_N"]),)

    _gate_up[use_decode][grid(inter)](
        hidden_states,
        gate_up_proj,
        h,
        slot_ids,
        block_expert,
        num_slots,
        num_experts,
        num_m_blocks,
        inter,
        hidden,
        slots_pow2,
        *hidden_states.stride(),
        *gate_up_proj.stride(),
        *h.stride(),
        TOP_K=top_k,
        **common,
    )
    _down[use_decode][grid(hidden)](
        h,
        down_proj,
        y,
        route,
        sq,
        slot_ids,
        block_expert,
        num_slots,
        num_experts,
        num_m_blocks,
        hidden,
        inter,
        slots_pow2,
        *h.stride(),
        *down_proj.stride(),
        *y.stride(),
        sq.stride(0),
        NORMS=return_norms,
        **common,
    )
    out = y.view(num_tokens, top_k, hidden).sum(dim=1)  # [T, D]: the K slots of each token
    if not return_norms:
        return out
    return out, sq.sum(dim=1).sqrt().view(num_tokens, top_k)

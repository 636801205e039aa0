"""The Triton MoE kernels against their PyTorch twins, and as a transformers experts backend.

Without a GPU the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set by conftest),
which costs time per program: shapes here are tiny (T <= 64, dims <= 128) with 64-wide blocks.
Tests marked ``gpu`` need CUDA and are skipped without it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import mfprune_kernels
from mfprune import tinymodels
from mfprune_kernels import KernelInputError, fused_moe, moe_reference
from mfprune_kernels.moe import triton_moe
from mfprune_kernels.moe.align import align_slots
from mfprune_kernels.moe.naive import align_slots_reference

if not triton_moe.INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cpu" if triton_moe.INTERPRET else "cuda"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOLERANCE = {  # (atol, rtol) against the float32 reference, for outputs of size ~1
    torch.float32: (2e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 5e-2),
}


def make_moe(
    num_tokens: int,
    top_k: int,
    num_experts: int,
    hidden: int,
    inter: int,
    *,
    dtype: torch.dtype = torch.float32,
    routed: list[int] | None = None,
    seed: int = 0,
    device: str = DEVICE,
) -> tuple[torch.Tensor, ...]:
    """Random ``(x [T, D], top_k_index [T, K], top_k_weights [T, K], gate_up_proj, down_proj)``,
    routed by softmax-top-k over random scores, only to the experts in ``routed`` if given."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(num_tokens, num_experts, generator=gen)  # [T, E]
    if routed is not None:
        blocked = torch.ones(num_experts, dtype=torch.bool)
        blocked[routed] = False
        scores[:, blocked] = float("-inf")
    weights, index = scores.softmax(dim=-1).topk(top_k, dim=-1)  # [T, K]
    x = torch.randn(num_tokens, hidden, generator=gen)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    down = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    tensors = (x.to(dtype), index, weights, gate_up.to(dtype), down.to(dtype))
    return tuple(t.to(device) for t in tensors)


def assert_matches_reference(moe: tuple[torch.Tensor, ...], **kw: object) -> None:
    """``fused_moe`` and its norms against ``moe_reference`` on the same inputs."""
    out, norms = fused_moe(*moe, return_norms=True, **kw)
    ref, ref_norms = moe_reference(*moe, return_norms=True)
    atol, rtol = TOLERANCE[moe[0].dtype]
    assert out.dtype == moe[0].dtype and out.shape == moe[0].shape
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(norms, ref_norms, atol=atol, rtol=rtol)


# --- alignment ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "top_k", "num_experts", "block_m"),
    [(37, 2, 6, 16), (5, 8, 12, 16), (64, 1, 8, 64), (1, 1, 128, 16), (3, 2, 2, 4)],
)
def test_align_matches_reference(num_tokens, top_k, num_experts, block_m):
    _, index, *_ = make_moe(num_tokens, top_k, num_experts, 8, 8, device="cpu")
    index[0, 0] = num_experts  # an expert-parallel sentinel: a dropped slot
    got = align_slots(index, num_experts=num_experts, block_m=block_m)
    slot_ids, block_experts = align_slots_reference(index, num_experts=num_experts, block_m=block_m)
    assert torch.equal(got.sorted_slot_ids, slot_ids)
    assert torch.equal(got.block_expert_ids, block_experts)
    # every real slot exactly once, and every block holds a single expert's slots
    real = got.sorted_slot_ids[got.sorted_slot_ids < index.numel()]
    assert torch.equal(real.sort().values, torch.arange(index.numel(), dtype=torch.int32))
    blocks = got.sorted_slot_ids.view(-1, block_m)
    for block, expert in zip(blocks, got.block_expert_ids.tolist(), strict=True):
        slots = block[block < index.numel()].long()
        flat = index.reshape(-1)[slots]
        assert bool((flat == expert).all()) or expert == num_experts


# --- the fused kernel against the reference (grouped path) -------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "top_k", "num_experts", "hidden", "inter", "routed", "block_m"),
    [
        pytest.param(37, 2, 6, 96, 80, None, 16, id="odd-T-D-I_E6"),
        pytest.param(40, 2, 12, 64, 64, [0, 3, 4, 9, 11], 16, id="idle-experts_E12"),
        pytest.param(45, 1, 6, 64, 48, None, 32, id="top1"),
        pytest.param(16, 8, 12, 64, 32, None, 16, id="top8_E12"),
        pytest.param(50, 2, 8, 128, 64, None, 64, id="block64"),
    ],
)
def test_fused_moe_matches_reference(
    num_tokens, top_k, num_experts, hidden, inter, routed, block_m
):
    moe = make_moe(num_tokens, top_k, num_experts, hidden, inter, routed=routed)
    assert_matches_reference(moe, decode=False, block_m=block_m)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fused_moe_half_precision(dtype):
    moe = make_moe(33, 2, 6, 64, 64, dtype=dtype, routed=[0, 1, 2, 5])
    assert_matches_reference(moe, decode=False)


def test_without_norms_same_output():
    moe = make_moe(24, 2, 6, 64, 64)
    plain = fused_moe(*moe, decode=False)
    with_norms, _ = fused_moe(*moe, decode=False, return_norms=True)
    assert torch.equal(plain, with_norms)


def test_dropped_slots_give_zero():
    """Slots routed to the expert-parallel sentinel ``E`` contribute nothing, norm 0."""
    x, index, weights, gate_up, down = make_moe(20, 2, 6, 64, 64)
    index[::3, 1] = 6
    for decode in (False, True):
        out, norms = fused_moe(x, index, weights, gate_up, down, return_norms=True, decode=decode)
        ref, ref_norms = moe_reference(x, index, weights, gate_up, down, return_norms=True)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
        assert bool((norms[::3, 1] == 0).all())
        torch.testing.assert_close(norms, ref_norms, atol=2e-5, rtol=1e-5)


def test_no_tokens():
    x, index, weights, gate_up, down = make_moe(0, 2, 6, 64, 64)
    out, norms = fused_moe(x, index, weights, gate_up, down, return_norms=True)
    assert out.shape == (0, 64) and norms.shape == (0, 2)


# --- decode path: one program per (slot, N-block) ----------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "top_k", "num_experts", "dtype"),
    [
        (1, 2, 6, torch.float32),
        (3, 1, 12, torch.float32),
        (1, 8, 12, torch.float32),
        (2, 2, 6, torch.float16),
    ],
    ids=["T1_top2", "T3_top1", "T1_top8", "T2_fp16"],
)
def test_decode_matches_reference(num_tokens, top_k, num_experts, dtype):
    moe = make_moe(num_tokens, top_k, num_experts, 96, 80, dtype=dtype)
    assert_matches_reference(moe, decode=True)


def test_few_tokens_take_decode_path(monkeypatch):
    called = []
    monkeypatch.setattr(triton_moe, "align_slots", lambda *a, **k: called.append(1))
    fused_moe(*make_moe(2, 2, 6, 64, 64))  # T*K = 4 <= DECODE_MAX_SLOTS: no alignment
    assert not called


# --- input errors ------------------------------------------------------------------------------


def test_input_errors_name_the_problem():
    x, index, weights, gate_up, down = make_moe(4, 2, 6, 64, 64)
    with pytest.raises(KernelInputError, match="share one dtype"):
        fused_moe(x.half(), index, weights, gate_up, down)
    with pytest.raises(KernelInputError, match=r"should be \[E, 2I, D=64\]"):
        fused_moe(x, index, weights, gate_up[:, :, :32], down)
    with pytest.raises(KernelInputError, match="must both be"):
        fused_moe(x, index, weights[:, :1], gate_up, down)
    with pytest.raises(KernelInputError, match="power of two >= 16, got 24"):
        fused_moe(x, index, weights, gate_up, down, decode=False, block_m=24)


# --- as a transformers experts implementation --------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_experts_implementation_matches_eager(family):
    name = mfprune_kernels.register()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    eager = tinymodels.build_model(family, experts_implementation="eager")
    ours = tinymodels.build_model(family, experts_implementation=name)
    assert ours.config._experts_implementation == name
    with torch.no_grad():
        want = eager.to(DEVICE)(ids.to(DEVICE)).logits
        got = ours.to(DEVICE)(ids.to(DEVICE)).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_from_pretrained_selects_it(tiny_checkpoint):
    name = mfprune_kernels.register()
    path = tiny_checkpoint("mixtral")
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation=name).eval()
    assert model.config._experts_implementation == name
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model.to(DEVICE)(ids.to(DEVICE)).logits
        model.set_experts_implementation("eager")
        want = model(ids.to(DEVICE)).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_norms_sink_sees_each_slots_expert_norm():
    name = mfprune_kernels.register()
    model = tinymodels.build_model("mixtral", experts_implementation=name).to(DEVICE)
    experts = model.model.layers[0].mlp.experts
    seen: dict[str, tuple] = {}
    experts.register_forward_pre_hook(lambda mod, args: seen.update(inputs=args))
    experts.mfprune_norms_sink = lambda mod, index, weights, norms: seen.update(norms=norms)
    with torch.no_grad():
        model(torch.arange(10, device=DEVICE)[None])
    x, index, weights = seen["inputs"]
    _, want = moe_reference(
        x, index, weights, experts.gate_up_proj, experts.down_proj, return_norms=True
    )
    assert seen["norms"].shape == index.shape
    torch.testing.assert_close(seen["norms"], want, atol=1e-5, rtol=1e-5)


def test_refuses_what_it_cannot_run():
    name = mfprune_kernels.register()
    model = tinymodels.build_model("gpt_oss", experts_implementation=name).to(DEVICE)
    with torch.no_grad(), pytest.raises(KernelInputError, match=r"has_bias=True.*grouped_mm"):
        model(torch.arange(4, device=DEVICE)[None])
    mixtral = tinymodels.build_model("mixtral", experts_implementation=name).to(DEVICE)
    with pytest.raises(KernelInputError, match="forward-only"):
        mixtral(torch.arange(4, device=DEVICE)[None])


# --- the real compiler, without a GPU ----------------------------------------------------------


def test_kernels_compile_for_a_gpu_target(tmp_path):
    """The interpreter never runs the Triton compiler; compile for sm_90 (ptxas ships with
    triton), and check the grouped GEMMs' loads are software-pipelined."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    cmd = [sys.executable, "-W", "ignore", "-m", "mfprune_kernels.moe.compile_check"]
    proc = subprocess.run(
        [*cmd, "--first-config"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4  # gate_up and down, grouped and decode
    assert all("pipelined=True" in line for line in lines if "grouped" in line)


# --- GPU only: real shapes, bf16, autotuning ---------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    ("num_experts", "top_k", "hidden", "inter"),
    [(128, 8, 2048, 768), (64, 8, 2048, 768), (8, 2, 1024, 3584), (4, 2, 1024, 3584)],
    ids=["qwen3-30b", "qwen3-30b-half", "mixtral-ish", "mixtral-ish-half"],
)
@pytest.mark.parametrize("num_tokens", [1, 7, 300, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_real_shapes(num_experts, top_k, hidden, inter, num_tokens, dtype):
    moe = make_moe(num_tokens, top_k, num_experts, hidden, inter, dtype=dtype, device="cuda")
    assert_matches_reference(moe)


@pytest.mark.gpu
@requires_cuda
def test_gpu_matches_grouped_mm_backend():
    name = mfprune_kernels.register()
    ids = torch.randint(0, 128, (4, 64), device="cuda")
    model = tinymodels.build_model("qwen3_moe", experts_implementation=name).cuda().bfloat16()
    with torch.no_grad():
        got = model(ids).logits.float()
        model.set_experts_implementation("grouped_mm")
        want = model(ids).logits.float()
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)

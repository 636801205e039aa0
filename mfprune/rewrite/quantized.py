"""Head slices of quantized attention weights: where the kept heads' slices can be cut out of
a quantized tensor and its scales exactly, and a refusal with the numbers where they cannot.

Only FP8 block quantization (``weight`` F8_E4M3 + ``weight_scale_inv`` per block) can be
sliced by head, and only when each head's slice along the head axis is a whole number of
blocks: then every kept block of scales still covers exactly the weights it scaled. Scalar
scales (per-tensor ``input_scale`` / ``activation_scale``) are copied unchanged. Packed
integer formats (GPTQ/AWQ ``qweight``, compressed-tensors ``weight_packed``) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mfprune.arch.spec import HeadTensor
from mfprune.errors import ModelError
from mfprune.io.reader import TensorInfo
from mfprune.io.writer import OutTensor
from mfprune.rewrite.slicing import blocks_for, slice_tensor

FP8_SCALE = "weight_scale_inv"
# tensors of quantized formats that a head slice cannot cut (their axes are packed or grouped)
_UNSLICEABLE = {
    "weight_scale",
    "weight_zero_point",
    "weight_packed",
    "weight_shape",
    "weight_g_idx",
    "qweight",
    "qzeros",
    "scales",
    "g_idx",
}


def missing_head_tensor(name: str, module_tensors: Sequence[TensorInfo]) -> ModelError | None:
    """The error for a head tensor absent from disk while its module holds other tensors (a
    quantized form mfprune cannot slice by head); None when the module is truly absent or the
    missing tensor is not its weight (an optional bias)."""
    if not module_tensors or not name.endswith(".weight"):
        return None
    found = ", ".join(sorted(t.name.rsplit(".", 1)[-1] for t in module_tensors))
    return ModelError(
        f"head pruning cannot slice {name.rsplit('.', 1)[0]}: it is stored quantized ({found})",
        hint="prune only experts on this checkpoint (drop the plan's heads), or prune the "
        "unquantized model and quantize afterwards; see docs/checkpoint-formats.md",
    )


def companion_slices(
    info: TensorInfo,
    t: HeadTensor,
    *,
    width: int,
    kept: Sequence[int],
    module_tensors: Sequence[TensorInfo],
    handled: Mapping[str, object],
) -> list[OutTensor]:
    """Slices of the quantization tensors beside the head tensor ``info`` (same module)."""
    out = []
    for other in module_tensors:
        suffix = other.name.rsplit(".", 1)[-1]
        if other.name == info.name or other.name in handled or other.numel == 1:
            continue
        if suffix == FP8_SCALE and info.name.endswith(".weight"):
            out.append(_fp8_scale_slice(info, other, t, width=width, kept=kept))
            continue
        if suffix not in _UNSLICEABLE:
            continue  # not part of the weight's quantization (e.g. an unlisted bias)
        raise ModelError(
            f"head pruning cannot slice {other.name} {list(other.shape)} beside {info.name}: "
            "only FP8 block scales (weight_scale_inv) can follow a head slice",
            hint="prune only experts on this checkpoint (drop the plan's heads)",
        )
    return out


def _fp8_scale_slice(
    weight: TensorInfo, scale: TensorInfo, t: HeadTensor, *, width: int, kept: Sequence[int]
) -> OutTensor:
    axis = t.axis
    size, blocks = weight.shape[axis], scale.shape[axis]
    block = -(-size // blocks)  # rows (or columns) per scale entry
    if len(scale.shape) != len(weight.shape) or -(-size // block) != blocks or width % block:
        raise ModelError(
            f"head pruning on FP8 block weights needs each head's slice to be whole blocks: "
            f"{weight.name} has {width} elements per head along axis {axis} (head_dim), but "
            f"its blocks are {block} wide ({scale.name} {list(scale.shape)} for "
            f"{list(weight.shape)})",
            hint="prune only experts on this checkpoint, or prune heads on the unquantized model",
        )
    return slice_tensor(scale, axis=axis, blocks=blocks_for(kept, width // block))

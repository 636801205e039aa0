"""The weight format of a checkpoint (FP8 block, MXFP4, compressed-tensors, GPTQ, AWQ, or
plain floats), told from its ``quantization_config`` and the names of its tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mfprune.io.reader import TensorInfo


@dataclass(frozen=True)
class WeightFormat:
    name: str  # fp8-block | mxfp4 | compressed-tensors | gptq | awq | unquantized | unknown
    description: str  # one line for people
    quant_method: str | None = None  # as the config says
    block_size: tuple[int, int] | None = None  # FP8 block quantization: rows x cols per scale

    @property
    def quantized(self) -> bool:
        return self.name != "unquantized"


def _suffixes(tensors: dict[str, TensorInfo]) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name in tensors}


def detect_format(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> WeightFormat:
    qc = config.get("quantization_config")
    qc = qc if isinstance(qc, dict) else {}
    method = qc.get("quant_method") if isinstance(qc.get("quant_method"), str) else None
    suffixes = _suffixes(tensors)
    if "weight_scale_inv" in suffixes:
        block = qc.get("weight_block_size")
        size = tuple(block) if isinstance(block, list) and len(block) == 2 else None
        shown = f"{size[0]}x{size[1]} blocks" if size else "per-block scales"
        return WeightFormat(
            "fp8-block",
            f"FP8 (F8_E4M3 weights, F32 weight_scale_inv, {shown})",
            method,
            block_size=size,  # type: ignore[arg-type]
        )
    if any(s.endswith("_blocks") for s in suffixes) and any(
        s.endswith("_scales") for s in suffixes
    ):
        return WeightFormat(
            "mxfp4", "MXFP4 (U8 *_blocks: two FP4 codes a byte; U8 *_scales: E8M0)", method
        )
    if "weight_packed" in suffixes or (method == "compressed-tensors"):
        kind = qc.get("format", "pack-quantized" if "weight_packed" in suffixes else "?")
        zero = ", weight_zero_point" if "weight_zero_point" in suffixes else ""
        return WeightFormat(
            "compressed-tensors",
            f"compressed-tensors {kind} (weight_packed/weight_scale{zero})"
            if "weight_packed" in suffixes
            else f"compressed-tensors {kind} (weight + weight_scale)",
            method,
        )
    if "qweight" in suffixes:
        gptq = method == "gptq" or (method != "awq" and "g_idx" in suffixes)
        name = "gptq" if gptq else "awq"
        bits, group = qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size"))
        return WeightFormat(
            name,
            f"{name.upper()} {bits}-bit, group {group} (qweight/qzeros/scales"
            + ("/g_idx)" if "g_idx" in suffixes else ")"),
            method,
        )
    if method:
        return WeightFormat(
            "unknown", f"quant_method '{method}' with no tensor layout mfprune knows", method
        )
    dtypes = sorted({t.dtype for t in tensors.values()})
    return WeightFormat("unquantized", "unquantized (" + ", ".join(dtypes) + ")")

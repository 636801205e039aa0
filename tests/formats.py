"""Tiny checkpoints in the formats real MoE releases ship, written directly with safetensors.

Each writer takes a saved tiny checkpoint (``tinymodels.build_checkpoint``) and writes a copy
whose chosen linears are stored quantized, with the config's ``quantization_config`` set as the
format's producers write it:

* ``write_fp8``: DeepSeek-V3 / Qwen3-FP8 style, ``weight`` F8_E4M3 + ``weight_scale_inv`` F32
  per block (a real quantization, so transformers dequantizes it to the same model);
* ``write_mxfp4``: GPT-OSS, stacked ``*_blocks`` / ``*_scales`` U8 (random codes and exponents);
* ``write_packed``: compressed-tensors pack-quantized, compressed-tensors float8, GPTQ and AWQ
  (random packed ints: these check the tensor mapping, transformers needs extra packages to
  run them).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

Select = Callable[[str, torch.Tensor], bool]

EXPERT_LINEAR = re.compile(r"\.experts\.\d+\.\w+\.weight$")
ATTENTION_LINEAR = re.compile(r"\.self_attn\.\w+_proj\.weight$")


def experts_only(name: str, tensor: torch.Tensor) -> bool:
    return bool(EXPERT_LINEAR.search(name)) and tensor.ndim == 2


def experts_and_attention(name: str, tensor: torch.Tensor) -> bool:
    return experts_only(name, tensor) or (
        bool(ATTENTION_LINEAR.search(name)) and tensor.ndim == 2 and "kv_a_proj" not in name
    )


def _copy_with(
    source: Path, out: Path, tensors: dict[str, torch.Tensor], quantization: dict[str, Any]
) -> Path:
    out.mkdir(parents=True)
    for p in source.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and not p.name.endswith(".index.json"):
            shutil.copyfile(p, out / p.name)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = quantization
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def fp8_block(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [R, C]`` -> (F8_E4M3 codes [R, C], F32 scales [ceil(R/b0), ceil(C/b1)])."""
    rows, cols = weight.shape
    b0, b1 = block
    scale = torch.zeros(math.ceil(rows / b0), math.ceil(cols / b1))
    codes = torch.empty_like(weight, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = weight[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1].float()
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / 448.0
            codes[i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] = tile / scale[i, j]
    return codes.to(torch.float8_e4m3fn), scale


def write_fp8(
    source: Path, out: Path, *, block: int = 8, select: Select = experts_only, **extra: Any
) -> Path:
    """FP8 block quantization of every selected ``.weight`` (``block`` x ``block`` tiles)."""
    tensors = {}
    for name, t in load_file(source / "model.safetensors").items():
        if select(name, t):
            codes, scale = fp8_block(t, (block, block))
            tensors[name] = codes
            tensors[name.removesuffix("weight") + "weight_scale_inv"] = scale
        else:
            tensors[name] = t
    quantization = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [block, block],
        **extra,
    }
    return _copy_with(source, out, tensors, quantization)


def write_mxfp4(source: Path, out: Path, *, seed: int = 0) -> Path:
    """GPT-OSS MXFP4: each fused expert matrix ``[E, A, B]`` becomes ``_blocks [E, B, A/32, 16]``
    (two FP4 codes a byte) and ``_scales [E, B, A/32]`` (E8M0 exponents)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in load_file(source / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, a, b = t.shape
            shape = (experts, b, a // 32)
            tensors[name + "_blocks"] = torch.randint(0, 256, (*shape, 16), generator=g).to(
                torch.uint8
            )
            tensors[name + "_scales"] = torch.randint(118, 124, shape, generator=g).to(torch.uint8)
        else:
            tensors[name] = t
    quantization = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    return _copy_with(source, out, tensors, quantization)


# name -> (suffix -> (dtype, shape from (out, in))), quantization_config
_GROUP = 16
PACKED_FORMATS: dict[str, tuple[dict[str, tuple[torch.dtype, Callable]], dict[str, Any]]] = {
    "compressed-tensors": (
        {
            "weight_packed": (torch.int32, lambda o, i: (o, i // 8)),
            "weight_scale": (torch.bfloat16, lambda o, i: (o, i // _GROUP)),
            "weight_zero_point": (torch.int32, lambda o, i: (o // 8, i // _GROUP)),
            "weight_shape": (torch.int64, lambda o, i: (2,)),
        },
        {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 4,
                        "type": "int",
                        "symmetric": False,
                        "strategy": "group",
                        "group_size": _GROUP,
                    },
                }
            },
            "ignore": ["lm_head", "re:.*mlp.gate$"],
        },
    ),
    "compressed-tensors-fp8": (
        {
            "weight": (torch.float8_e4m3fn, lambda o, i: (o, i)),
            "weight_scale": (torch.float32, lambda o, i: (o, 1)),
        },
        {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                }
            },
            "ignore": ["lm_head", "re:.*mlp.gate$"],
        },
    ),
    "gptq": (
        {
            "qweight": (torch.int32, lambda o, i: (i // 8, o)),
            "qzeros": (torch.int32, lambda o, i: (i // _GROUP, o // 8)),
            "scales": (torch.float16, lambda o, i: (i // _GROUP, o)),
            "g_idx": (torch.int32, lambda o, i: (i,)),
        },
        {"quant_method": "gptq", "bits": 4, "group_size": _GROUP, "desc_act": False, "sym": True},
    ),
    "awq": (
        {
            "qweight": (torch.int32, lambda o, i: (i, o // 8)),
            "qzeros": (torch.int32, lambda o, i: (i // _GROUP, o // 8)),
            "scales": (torch.float16, lambda o, i: (i // _GROUP, o)),
        },
        {
            "quant_method": "awq",
            "bits": 4,
            "group_size": _GROUP,
            "version": "gemm",
            "zero_point": True,
            "modules_to_not_convert": ["gate"],
        },
    ),
}


def write_packed(
    source: Path,
    out: Path,
    fmt: str,
    *,
    select: Select = experts_only,
    seed: int = 0,
    **extra: Any,
) -> Path:
    """Every selected ``X.weight [out, in]`` replaced by ``fmt``'s tensors ``X.<suffix>``,
    filled with random values of the format's dtypes and shapes."""
    layout, quantization = PACKED_FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in load_file(source / "model.safetensors").items():
        if not select(name, t):
            tensors[name] = t
            continue
        module = name.removesuffix(".weight")
        rows, cols = t.shape
        for suffix, (dtype, shape_of) in layout.items():
            shape = shape_of(rows, cols)
            if suffix == "weight_shape":
                value = torch.tensor([rows, cols], dtype=dtype)
            elif dtype.is_floating_point:
                value = torch.rand(shape, generator=g).to(dtype)
            else:
                value = torch.randint(-(2**31), 2**31 - 1, shape, generator=g, dtype=torch.int64)
                value = value.to(dtype)
            tensors[f"{module}.{suffix}"] = value
    return _copy_with(source, out, tensors, {**quantization, **extra})

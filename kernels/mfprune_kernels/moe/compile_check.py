"""Compile the MoE kernels for a real GPU target without a GPU, to catch what the interpreter
lets through (it runs the kernels as NumPy and never sees the Triton compiler).

It runs :func:`fused_moe` on CPU tensors with the kernel launches replaced by recorders, turns
each recorded launch into the signature and specialisation a real launch would get (pointer
dtypes, integer arguments equal to 1 as constants, 16-divisibility hints), and compiles it with
every autotuning config for ``cuda:<arch>`` down to a cubin (triton ships ``ptxas``). It
reports each config's shared memory and whether the loads are software-pipelined.

Run with the interpreter off: ``python -m mfprune_kernels.moe.compile_check [--arch 90]``.
Exit status 1 if a compile fails.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mfprune_kernels.moe import triton_moe

_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
}


class _Recorder:
    """Stands in for an autotuned kernel: ``kernel[grid](*args, **kw)`` records the call."""

    def __init__(self, autotuner: Any, calls: list) -> None:
        self.autotuner, self.calls = autotuner, calls

    def __getitem__(self, grid: Any):
        return lambda *args, **kwargs: self.calls.append((self.autotuner, args, kwargs))


def record_launches(**case: Any) -> list[tuple[Any, tuple, dict]]:
    """``(autotuner, args, constexpr kwargs)`` of each launch :func:`fused_moe` makes for
    ``case`` (``num_tokens, top_k, num_experts, hidden, inter, dtype, return_norms``)."""
    gen = torch.Generator().manual_seed(0)
    num_tokens, top_k, num_experts = case["num_tokens"], case["top_k"], case["num_experts"]
    hidden, inter, dtype = case["hidden"], case["inter"], case["dtype"]
    scores = torch.randn(num_tokens, num_experts, generator=gen)
    weights, index = scores.softmax(-1).topk(top_k, dim=-1)
    x = torch.zeros(num_tokens, hidden, dtype=dtype)
    gate_up = torch.zeros(num_experts, 2 * inter, hidden, dtype=dtype)
    down = torch.zeros(num_experts, hidden, inter, dtype=dtype)
    calls: list = []
    saved = triton_moe._gate_up, triton_moe._down, triton_moe._check_inputs
    try:
        triton_moe._gate_up = {d: _Recorder(k, calls) for d, k in saved[0].items()}
        triton_moe._down = {d: _Recorder(k, calls) for d, k in saved[1].items()}
        triton_moe._check_inputs = lambda *args: None  # CPU tensors outside the interpreter
        triton_moe.fused_moe(x, index, weights, gate_up, down, return_norms=case["return_norms"])
    finally:
        triton_moe._gate_up, triton_moe._down, triton_moe._check_inputs = saved
    return calls


def compile_launch(
    autotuner: Any, args: tuple, kwargs: dict, config: triton.Config, arch: int
) -> dict[str, Any]:
    """Compile one recorded launch with ``config`` for ``cuda:<arch>``; return its stats."""
    fn = autotuner.fn
    names = fn.arg_names
    signature: dict[str, str] = {}
    constants: dict[str, Any] = {**kwargs, **config.kwargs}
    divisible = []
    for name, value in zip(names, args, strict=False):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            divisible.append(name)  # CUDA allocations are 256-byte aligned
        elif value == 1:
            constants[name] = 1  # what a launch does with integer arguments equal to 1
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                divisible.append(name)
    signature.update({name: "constexpr" for name in constants})
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    ttgir = kernel.asm["ttgir"]
    return {
        "kernel": fn.__name__,
        "config": dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages),
        "shared_bytes": kernel.metadata.shared,
        "pipelined": bool(re.search(r"async_copy_global_to_local|async_tma_copy", ttgir)),
    }


def check(
    *,
    arch: int = 90,
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,),
    all_configs: bool = True,
) -> list[dict[str, Any]]:
    """Compile the grouped and the decode launches (with norms) of a Qwen3-30B-A3B-sized call.

    Raises whatever the Triton compiler raises.
    """
    if triton_moe.INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter never compiles anything")
    results = []
    for dtype in dtypes:
        for num_tokens in (512, 2):  # the grouped path, then the decode path
            case = dict(num_tokens=num_tokens, top_k=8, num_experts=128, hidden=2048, inter=768)
            for autotuner, args, kwargs in record_launches(**case, dtype=dtype, return_norms=True):
                configs = autotuner.configs if all_configs else autotuner.configs[:1]
                for config in configs:
                    stats = compile_launch(autotuner, args, kwargs, config, arch)
                    stats.update(dtype=str(dtype), decode=kwargs["DECODE"])
                    results.append(stats)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--first-config", action="store_true", help="only each kernel's first config")
    args = ap.parse_args()
    by_name = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    try:
        results = check(
            arch=args.arch,
            dtypes=tuple(by_name[d] for d in args.dtypes),
            all_configs=not args.first_config,
        )
    except Exception as exc:  # report the compiler's error without a traceback
        print(f"error: compile failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    for r in results:
        path = "decode" if r["decode"] else "grouped"
        print(
            f"{r['kernel']:16} {r['dtype']:15} {path:8} {r['config']} "
            f"shared={r['shared_bytes'] / 1024:.0f} KiB pipelined={r['pipelined']}"
        )


if __name__ == "__main__":
    main()

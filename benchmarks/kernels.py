"""Benchmark mfprune's Triton MoE kernel against transformers' experts implementations on a GPU.

For each expert shape (Qwen3-30B-A3B: E=128, K=8, D=2048, I=768; Mixtral-8x7B: E=8, K=2,
D=4096, I=14336), unpruned and pruned to half the experts, and each token count (1 to 4096),
it times one experts forward (``experts(hidden_states, top_k_index, top_k_weights)``, the
transformers v5 contract) with each backend:

- ``mfprune_triton`` — this project's fused kernel (``mfprune_kernels.register()``);
- ``grouped_mm``, ``batched_mm``, ``eager`` — transformers' own implementations;
- ``dense`` — one ``torch.mm`` of the same FLOPs (``[T*K, D] @ [D, 3I]``), the ceiling.

It reports time, TFLOP/s (useful FLOPs ``6·T·K·D·I``, padding not counted) and the speed ratio
of the Triton kernel to ``grouped_mm`` (> 1 is faster). Routing is random (softmax top-k over
Gaussian scores), so every expert gets about ``T·K/E`` tokens. Weights are random; expert
modules are transformers' ``MixtralExperts`` (the Qwen3 experts module does the same math).
``batched_mm`` gathers one weight matrix per token-slot and is skipped where that would need
more than ``--batched-mm-gib`` GiB.

Needs a CUDA GPU; without one it says so and exits with status 2 (nothing is measured: the
Triton interpreter's timings mean nothing).

Run: ``.venv/bin/python benchmarks/kernels.py [--shapes qwen3-30b-a3b mixtral-8x7b]
[--tokens 1 16 256 4096] [--dtype bf16] [--json results.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch

SHAPES = {  # name: (E, K, D, I)
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b": (8, 2, 4096, 14336),
}
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BACKENDS = ["mfprune_triton", "grouped_mm", "batched_mm", "eager", "dense"]


@dataclass
class Row:
    shape: str
    experts: int
    top_k: int
    tokens: int
    ms: dict[str, float | None]  # backend -> median milliseconds (None: skipped)
    max_abs_diff: float  # Triton vs grouped_mm

    def tflops(self, backend: str, flops: float) -> float | None:
        ms = self.ms.get(backend)
        return None if ms is None else flops / (ms * 1e-3) / 1e12


def fail(message: str) -> None:
    """Exit with a message and status 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_environment() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        fail("TRITON_INTERPRET is set: interpreter timings mean nothing; unset it and use a GPU")
    if not torch.cuda.is_available():
        fail(
            "benchmarks/kernels.py needs a CUDA GPU and none is available "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False); nothing measured"
        )
    try:
        import triton  # noqa: F401
    except ImportError:
        fail("triton is not installed: pip install triton (Linux only)")


def make_experts(num_experts: int, top_k: int, hidden: int, inter: int, dtype: torch.dtype):
    """A transformers v5 ``MixtralExperts`` module on the GPU with random weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        hidden_act="silu",
    )
    with torch.device("cuda"):
        experts = MixtralExperts(config).to(dtype)
    torch.nn.init.normal_(experts.gate_up_proj, std=hidden**-0.5)
    torch.nn.init.normal_(experts.down_proj, std=inter**-0.5)
    return experts.requires_grad_(False)


def bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (CUDA-synchronised, L2 flushed between runs)."""
    from triton.testing import do_bench

    fn()  # autotuning and compilation happen here, outside the measurement
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def measure(
    experts: torch.nn.Module, num_tokens: int, *, backends: list[str], batched_mm_gib: float
) -> tuple[dict[str, float | None], float]:
    """Median ms of each backend at ``num_tokens`` tokens, and the largest |Triton − grouped_mm|."""
    num_experts, two_i, hidden = experts.gate_up_proj.shape
    top_k, inter, dtype = experts.config.num_experts_per_tok, two_i // 2, experts.down_proj.dtype
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=dtype, generator=gen)  # [T, D]
    scores = torch.randn(num_tokens, num_experts, device="cuda", generator=gen)  # [T, E]
    weights, index = scores.softmax(dim=-1).topk(top_k, dim=-1)  # [T, K]
    weights = weights.to(dtype)
    slots = num_tokens * top_k
    dense_a = torch.randn(slots, hidden, device="cuda", dtype=dtype, generator=gen)
    dense_b = torch.randn(hidden, 3 * inter, device="cuda", dtype=dtype, generator=gen)
    gathered_gib = slots * 3 * hidden * inter * dtype.itemsize / 2**30

    def forward(backend: str) -> torch.Tensor:
        experts.config._experts_implementation = backend
        return experts(x, index, weights)

    ms: dict[str, float | None] = {}
    for backend in backends:
        if backend == "batched_mm" and gathered_gib > batched_mm_gib:
            ms[backend] = None  # one gathered weight matrix per slot would not fit
            continue
        fn = (lambda: dense_a @ dense_b) if backend == "dense" else partial(forward, backend)
        try:
            ms[backend] = bench_ms(fn)
        except torch.OutOfMemoryError:
            ms[backend] = None
            torch.cuda.empty_cache()
    diff = float("nan")
    if "mfprune_triton" in backends and "grouped_mm" in backends:
        ours, theirs = forward("mfprune_triton").float(), forward("grouped_mm").float()
        diff = float((ours - theirs).abs().max())
    return ms, diff


def run_shape(
    name: str,
    num_experts: int,
    top_k: int,
    hidden: int,
    inter: int,
    *,
    tokens: list[int],
    dtype: torch.dtype,
    backends: list[str],
    batched_mm_gib: float,
) -> list[Row]:
    experts = make_experts(num_experts, top_k, hidden, inter, dtype)
    rows = []
    for num_tokens in tokens:
        ms, diff = measure(experts, num_tokens, backends=backends, batched_mm_gib=batched_mm_gib)
        rows.append(Row(name, num_experts, top_k, num_tokens, ms, diff))
        print_row(rows[-1], hidden, inter, backends)
    return rows


def flops_of(row: Row, hidden: int, inter: int) -> float:
    return 6.0 * row.tokens * row.top_k * hidden * inter


def print_header(backends: list[str]) -> None:
    cols = ["shape", "E", "T", "triton ms"] + [f"{b} TFLOP/s" for b in backends]
    cols += ["**speed-up vs grouped_mm**", "% of dense", "max abs diff vs grouped_mm"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * 3 + "--:|" * (len(cols) - 3))


def print_row(row: Row, hidden: int, inter: int, backends: list[str]) -> None:
    flops = flops_of(row, hidden, inter)

    def fmt(value: float | None, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    ours, grouped, dense = (row.ms.get(b) for b in ("mfprune_triton", "grouped_mm", "dense"))
    speedup = grouped / ours if ours and grouped else None
    of_dense = dense / ours if ours and dense else None
    cells = [row.shape, str(row.experts), str(row.tokens), fmt(ours, ".3f")]
    cells += [fmt(row.tflops(b, flops), ".3g") for b in backends]
    cells += [f"**{fmt(speedup, '.2f')}×**", fmt(of_dense, ".0%"), f"{row.max_abs_diff:.2g}"]
    print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=BACKENDS)
    ap.add_argument("--no-pruned", action="store_true", help="skip the half-experts variants")
    ap.add_argument("--batched-mm-gib", type=float, default=16.0)
    ap.add_argument("--json", metavar="PATH", help="also write the raw results here")
    args = ap.parse_args()
    check_environment()

    import triton

    import mfprune_kernels

    mfprune_kernels.register()
    dtype = DTYPES[args.dtype]
    props = torch.cuda.get_device_properties(0)
    print(
        f"Device: {props.name} ({props.total_memory / 2**30:.0f} GiB); torch {torch.__version__}, "
        f"triton {triton.__version__}, Python {platform.python_version()}; dtype {args.dtype}\n"
    )
    print_header(args.backends)
    results = []
    torch.set_grad_enabled(False)
    for name in args.shapes:
        num_experts, top_k, hidden, inter = SHAPES[name]
        counts = [num_experts] if args.no_pruned else [num_experts, num_experts // 2]
        for experts in counts:
            label = name if experts == num_experts else f"{name} (pruned {experts}/{num_experts})"
            rows = run_shape(
                label,
                experts,
                top_k,
                hidden,
                inter,
                tokens=args.tokens,
                dtype=dtype,
                backends=args.backends,
                batched_mm_gib=args.batched_mm_gib,
            )
            results += [{**asdict(r), "hidden": hidden, "inter": inter} for r in rows]
            torch.cuda.empty_cache()  # the expert weights of this shape are gone now
    if args.json:
        meta = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "dtype": args.dtype, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()

"""Pieces the benchmark scripts share: the machine they ran on, the synthetic Mixtral layout,
and the marked section of docs/benchmarks.md each script rewrites."""

from __future__ import annotations

import platform
import sys
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mixtral_layer_tensors(
    layer: int, *, hidden: int, intermediate: int, heads: int, kv_heads: int, experts: int
) -> list[tuple[str, tuple[int, ...]]]:
    """On-disk names and shapes of one Mixtral decoder layer (per-expert w1/w2/w3)."""
    d, i, kv = hidden, intermediate, hidden // heads * kv_heads
    p = f"model.layers.{layer}."
    out = [
        (p + "input_layernorm.weight", (d,)),
        (p + "self_attn.q_proj.weight", (d, d)),
        (p + "self_attn.k_proj.weight", (kv, d)),
        (p + "self_attn.v_proj.weight", (kv, d)),
        (p + "self_attn.o_proj.weight", (d, d)),
        (p + "post_attention_layernorm.weight", (d,)),
        (p + "block_sparse_moe.gate.weight", (experts, d)),
    ]
    for e in range(experts):
        q = f"{p}block_sparse_moe.experts.{e}."
        out += [(q + "w1.weight", (i, d)), (q + "w2.weight", (d, i)), (q + "w3.weight", (i, d))]
    return out


def replace_section(docs: Path, begin: str, end: str, text: str) -> None:
    """Replace what lies between the ``begin`` and ``end`` markers of ``docs`` with ``text``."""
    doc = docs.read_text()
    if begin not in doc or end not in doc:
        sys.exit(f"{docs} has no {begin} ... {end} markers")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    docs.write_text(f"{head}{begin}\n{text}\n{end}{tail}")

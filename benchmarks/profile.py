"""Benchmark `mfprune profile`: the hooks' overhead, and the memory of `--sequential`.

What it does, in one run:

1. **Overhead.** For each family in ``--families``, builds a mid-sized random model in memory
   (``from_config``), makes padded batches of random token ids (``--tokens`` real tokens in
   all), and times the decoder's forward over them with and without the profiling hooks
   attached, alternating for ``--repeats`` rounds. Reports the ratio of the medians.
   Target: <= 1.10x.
2. **Memory.** Writes a synthetic Mixtral-shaped checkpoint of about ``--size-gb`` GB straight
   to safetensors (random fp32 tensors under the real per-expert on-disk names
   ``block_sparse_moe.experts.{e}.w1/w2/w3``, sharded, with an index, a config and a tiny
   tokenizer), then runs ``mfprune profile --sequential`` on it in a child process and reads
   the child's peak RSS (``ru_maxrss`` from ``wait4``). For contrast it also runs the
   whole-model ``mfprune profile`` and a child that only imports what the profiler imports,
   and checks that both profiles hold the same stats. Target: sequential peak RSS < 35% of
   the checkpoint's size.
3. Prints a markdown report; ``--write-docs`` also puts it into docs/benchmarks.md.

Run: ``.venv/bin/python benchmarks/profile.py [--size-gb 2.5] [--repeats 5]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import (  # benchmarks/_common.py (scripts run from here)
    cpu_model,
    mixtral_layer_tensors,
    replace_section,
)

# Run as a script, this file would shadow the standard library's `profile` module (which
# cProfile, imported by torch, needs): take its folder off the path, put the repository on it.
HERE, REPO = Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from mfprune import tinymodels  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:profile:begin -->", "<!-- bench:profile:end -->"
OVERHEAD_TARGET = 1.10
RSS_TARGET = 0.35

# mid-sized models for the overhead: real shapes scaled down (head_dim 64, GQA 4:1)
OVERHEAD_MODELS: dict[str, dict[str, Any]] = {
    "mixtral": {  # 8 experts, top-2
        "hidden_size": 512,
        "intermediate_size": 1792,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    "qwen3_moe": {  # many small experts, top-8 (Qwen3-30B-A3B's routing)
        "hidden_size": 512,
        "moe_intermediate_size": 384,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "head_dim": 64,
    },
    "deepseek_v3": {  # sigmoid + bias + groups, shared expert, a dense first layer
        "hidden_size": 512,
        "intermediate_size": 1792,
        "moe_intermediate_size": 384,
        "n_routed_experts": 32,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "kv_lora_rank": 128,
        "q_lora_rank": 256,
        "qk_rope_head_dim": 32,
        "qk_nope_head_dim": 32,
        "v_head_dim": 64,
    },
}
COMMON = {
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
    "max_position_embeddings": 4096,
}

# the synthetic checkpoint of the memory benchmark: Mixtral-shaped, many thin layers (a layer
# is ~4% of the model, as in real MoE checkpoints: Qwen3-30B-A3B's is ~2%)
HIDDEN, INTERMEDIATE, VOCAB = 1024, 512, 32000
HEADS, KV_HEADS, EXPERTS, TOP_K = 8, 2, 16, 2
SHARDS = 4
DTYPE = torch.float32


# ------------------------------------------------------------------------------- overhead


def batches_of(tokens: int, *, vocab: int, seq_len: int, batch_size: int, seed: int) -> list:
    """Padded batches (ids [B, S], mask [B, S]) of random documents, ``tokens`` real in all."""
    from mfprune.profiling.data import TokenData

    gen = torch.Generator().manual_seed(seed)
    chunks, left = [], tokens
    while left > 0:
        n = min(left, int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=gen)))
        chunks.append(torch.randint(4, vocab, (n,), generator=gen, dtype=torch.int32))
        left -= n
    data = TokenData(chunks=chunks, documents=len(chunks), fingerprint="")
    return list(data.batches(batch_size=batch_size, pad_id=0))


def overhead(family: str, *, tokens: int, repeats: int, workdir: Path) -> dict[str, Any]:
    from mfprune.arch import spec_for_config
    from mfprune.arch.layout import resolve_layout
    from mfprune.checkpoint import open_checkpoint
    from mfprune.profiling.hooks import Recorder

    path = workdir / f"overhead-{family}"
    model = tinymodels.build_model(family, **{**COMMON, **OVERHEAD_MODELS[family]})
    tinymodels.save_checkpoint(model, path)
    ckpt = open_checkpoint(path)
    layout = resolve_layout(ckpt, spec_for_config(ckpt.config))
    decoder = model.base_model
    batches = batches_of(tokens, vocab=COMMON["vocab_size"], seq_len=512, batch_size=4, seed=0)
    recorder = Recorder(model, layout)

    def plain() -> None:
        for ids, mask in batches:
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)

    def hooked() -> None:
        with recorder.attached():
            for ids, mask in batches:
                recorder.set_mask(mask)
                decoder(input_ids=ids, attention_mask=mask, use_cache=False)

    times: dict[str, list[float]] = {"plain": [], "hooked": []}
    with torch.no_grad():
        plain(), hooked()  # warm-up: allocator, kernels, lazy Gram matrices
        for r in range(repeats):
            order = (("plain", plain), ("hooked", hooked))
            for name, fn in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    best = {k: min(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "family": family,
        "params": params,
        "tokens": sum(int(m.sum()) for _, m in batches),
        "padded": sum(m.numel() for _, m in batches),
        "plain_s": best["plain"],
        "hooked_s": best["hooked"],
        "ratio": best["hooked"] / best["plain"],  # best of N: the least disturbed rounds
        "ratio_median": median["hooked"] / median["plain"],
        "config": OVERHEAD_MODELS[family],
    }


# --------------------------------------------------------------------------------- memory


def layer_tensors(layer: int) -> list[tuple[str, tuple[int, ...]]]:
    return mixtral_layer_tensors(
        layer,
        hidden=HIDDEN,
        intermediate=INTERMEDIATE,
        heads=HEADS,
        kv_heads=KV_HEADS,
        experts=EXPERTS,
    )


def nbytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPE.itemsize


def layers_for(size_bytes: float) -> int:
    fixed = nbytes((VOCAB, HIDDEN)) * 2 + nbytes((HIDDEN,))
    per_layer = sum(nbytes(s) for _, s in layer_tensors(0))
    return max(1, math.ceil((size_bytes - fixed) / per_layer))


def build_checkpoint(root: Path, num_layers: int, seed: int = 0) -> dict[str, int]:
    """Write the synthetic checkpoint (and a tiny tokenizer); return its sizes."""
    from safetensors.torch import save_file

    names = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for layer in range(num_layers):
        names += layer_tensors(layer)
    names += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    total = sum(nbytes(s) for _, s in names)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(SHARDS)]
    offset = 0
    for name, shape in names:
        groups[min(SHARDS - 1, offset * SHARDS // total)].append((name, shape))
        offset += nbytes(shape)
    root.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map, largest = {}, 0
    for k, group in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{SHARDS:05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=DTYPE)
            else:  # init scale, so 24+ layers of residual stream stay finite; routers spread
                std = 1.0 if name.endswith("gate.weight") else 0.02
                tensors[name] = (torch.randn(shape, generator=gen) * std).to(DTYPE)
        save_file(tensors, str(root / file), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys((n for n, _ in group), file))
        largest = max(largest, (root / file).stat().st_size)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HIDDEN // HEADS,
        "num_local_experts": EXPERTS,
        "num_experts_per_tok": TOP_K,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tinymodels.save_tokenizer(root)
    files = [p for p in root.iterdir() if p.suffix == ".safetensors"]
    return {"bytes": sum(p.stat().st_size for p in files), "largest_shard": largest}


def write_data(path: Path, documents: int) -> Path:
    """Real English and Python text: the repository's docs and sources, one file per line."""
    texts = [p.read_text() for p in sorted((REPO / "docs").glob("*.md"))]
    texts += [p.read_text() for p in sorted((REPO / "mfprune").rglob("*.py"))]
    lines = [json.dumps({"text": t}) for t in texts[:documents] if t.strip()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_child(code: str) -> tuple[int, float]:
    """Peak RSS (bytes) and seconds of a fresh interpreter running ``code``.

    The child reads its own high-water mark (``VmHWM``) as it ends: ``ru_maxrss`` from
    ``wait4`` would not do, since Linux carries the parent's peak across ``fork`` + ``exec``.
    """
    import subprocess

    script = (
        "import sys\n"
        f"try:\n    exec({code!r})\n"
        "except SystemExit as e:\n    status = e.code or 0\nelse:\n    status = 0\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print('\\nVmHWM', int(hwm.split()[1]) * 1024)\n"
        "sys.exit(status)\n"
    )
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"child failed ({proc.returncode}): {code[:200]}\n{proc.stderr}")
    peak = [line for line in proc.stdout.splitlines() if line.startswith("VmHWM ")][-1]
    return int(peak.split()[1]), elapsed


def memory(size_gb: float, *, tokens: int, workdir: Path) -> dict[str, Any]:
    model = workdir / "synthetic"
    layers = layers_for(size_gb * 1e9)
    if not (model / "config.json").exists():
        sizes = build_checkpoint(model, layers)
    else:
        files = [p for p in model.iterdir() if p.suffix == ".safetensors"]
        sizes = {
            "bytes": sum(p.stat().st_size for p in files),
            "largest_shard": max(p.stat().st_size for p in files),
        }
    data = write_data(workdir / "data.jsonl", documents=200)
    result: dict[str, Any] = {"layers": layers, **sizes, "tokens": tokens}
    profile = "import sys; from mfprune.cli import app; sys.argv = ['mfprune', *{args!r}]; app()"
    common = ["profile", str(model), "--data", str(data), "--max-tokens", str(tokens)]
    common += ["--seq-len", "512", "--batch-size", "4", "--device", "cpu", "--format", "quiet"]
    seq_out, whole_out = workdir / "sequential.safetensors", workdir / "whole.safetensors"
    imports = (
        "import torch, transformers; from transformers import AutoModelForCausalLM; "
        "from transformers.models.mixtral import modeling_mixtral; "
        "import mfprune.cli, mfprune.profiling.run, mfprune.profiling.sequential"
    )
    result["imports_rss"], _ = run_child(imports)
    args = [*common, "--sequential", "--out", str(seq_out)]
    result["sequential_rss"], result["sequential_s"] = run_child(profile.format(args=args))
    args = [*common, "--out", str(whole_out)]
    result["whole_rss"], result["whole_s"] = run_child(profile.format(args=args))
    from mfprune.profiling import ProfileStats

    a, b = ProfileStats.load(seq_out), ProfileStats.load(whole_out)
    result["same_counts"] = bool(torch.equal(a.experts.count, b.experts.count))
    result["max_rel_diff"] = max(
        float(
            (
                (getattr(a.experts, k) - getattr(b.experts, k)).abs()
                / getattr(b.experts, k).abs().clamp_min(1e-12)
            ).max()
        )
        for k in ("soft", "ean", "reap_num")
    )
    result["profiled_tokens"] = a.meta.tokens
    return result


# --------------------------------------------------------------------------------- report


def machine() -> str:
    cpu = cpu_model()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}), "
        f"{mem:.1f} GiB RAM, Linux {platform.release()}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def report(args: argparse.Namespace, over: list[dict[str, Any]], mem: dict[str, Any] | None) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} by `benchmarks/profile.py "
        f"--size-gb {args.size_gb} --repeats {args.repeats} --tokens {args.tokens}"
        + (f" --threads {args.threads}" if args.threads else "")
        + "`.",
        "",
        f"**Machine**: {machine()}.",
        "",
    ]
    if over:
        lines += [
            "**Overhead of the hooks** (decoder forward over the same padded batches, with and "
            f"without the profiling hooks, {args.repeats} alternating rounds; times are the "
            "best round of each, the ratio of the medians is shown too):",
            "",
            "| model | params | real / padded tokens | plain | profiled | **ratio** (best) "
            "| ratio (medians) |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for r in over:
            c = r["config"]
            experts = c.get("num_local_experts") or c.get("num_experts") or c["n_routed_experts"]
            lines.append(
                f"| {r['family']} (E={experts}, K={c['num_experts_per_tok']}, "
                f"D={c['hidden_size']}) | {r['params'] / 1e6:.0f} M | "
                f"{r['tokens']:,} / {r['padded']:,} | {r['plain_s']:.2f} s | "
                f"{r['hooked_s']:.2f} s | **{r['ratio']:.2f}×** | {r['ratio_median']:.2f}× |"
            )
        lines.append("")
    if mem:
        size = mem["bytes"]
        lines += [
            f"**`--sequential` memory**: synthetic Mixtral-shaped checkpoint, {mem['layers']} "
            f"layers, hidden {HIDDEN}, {EXPERTS} experts x intermediate {INTERMEDIATE}, fp32, "
            f"per-expert on-disk names; {size / 1e9:.2f} GB in {SHARDS} shards; "
            f"{mem['profiled_tokens']:,} tokens (seq-len 512, batch 4).",
            "",
            "| process | peak RSS | share of checkpoint | time |",
            "|---|--:|--:|--:|",
            f"| imports only (torch, transformers, mfprune) | {mib(mem['imports_rss'])} | "
            f"{mem['imports_rss'] / size:.1%} | |",
            f"| `mfprune profile --sequential` | **{mib(mem['sequential_rss'])}** | "
            f"**{mem['sequential_rss'] / size:.1%}** | {mem['sequential_s']:.1f} s |",
            f"| `mfprune profile` (whole model) | {mib(mem['whole_rss'])} | "
            f"{mem['whole_rss'] / size:.1%} | {mem['whole_s']:.1f} s |",
            "",
            f"Both profiles agree: routed counts {'equal' if mem['same_counts'] else 'DIFFER'}, "
            f"largest relative difference of the float sums {mem['max_rel_diff']:.1e}.",
            "",
        ]
    verdicts = []
    for r in over:
        met = "met" if r["ratio"] <= OVERHEAD_TARGET else "missed"
        verdicts.append(f"{r['family']} {r['ratio']:.2f}× ({met})")
    target = [f"overhead ≤ {OVERHEAD_TARGET:.2f}× — " + "; ".join(verdicts)] if over else []
    if mem:
        share = mem["sequential_rss"] / mem["bytes"]
        met = "met" if share < RSS_TARGET else "missed"
        target.append(
            f"`--sequential` peak RSS < {RSS_TARGET:.0%} of the checkpoint — {share:.1%} ({met})"
        )
    lines.append("**Targets**: " + ". ".join(target) + ".")
    return "\n".join(lines)


def write_docs(text: str) -> None:
    replace_section(DOCS, BEGIN, END, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.5, help="synthetic checkpoint size")
    parser.add_argument("--repeats", type=int, default=7, help="alternating rounds (overhead)")
    parser.add_argument("--tokens", type=int, default=2048, help="real tokens per measurement")
    parser.add_argument("--families", nargs="*", default=list(OVERHEAD_MODELS))
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--threads", type=int, help="torch threads here and in the children (default: torch's)"
    )
    parser.add_argument("--workdir", type=Path, help="keep the checkpoints here (default: temp)")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mfprune-bench-profile-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        over = []
        for family in args.families:
            over.append(overhead(family, tokens=args.tokens, repeats=args.repeats, workdir=workdir))
            print(f"overhead {family}: {over[-1]['ratio']:.3f}x", file=sys.stderr)
        mem = (
            None if args.skip_memory else memory(args.size_gb, tokens=args.tokens, workdir=workdir)
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    text = report(args, over, mem)
    print(text)
    if args.write_docs:
        write_docs(text)


if __name__ == "__main__":
    main()

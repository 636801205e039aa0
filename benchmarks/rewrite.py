"""Benchmark `mfprune prune` against `cp -r` on a synthetic Mixtral-shaped checkpoint.

What it does, in one run:

1. writes a sharded Mixtral-shaped checkpoint of about ``--size-gb`` GB straight to safetensors
   (random bf16 tensors, real on-disk Mixtral names, index + config; no transformers model);
2. writes a plan keeping 4 of the 8 experts of every layer (a different 4 per layer);
3. times ``cp -r SRC DST`` and ``mfprune prune SRC --plan PLAN --out DST``, alternating, for
   ``--repeats`` rounds, with a cold page cache (``drop_caches``, needs root) and a warm one;
4. measures the prune's peak RSS above its RSS after imports, in a launcher process that
   resets the kernel's high-water mark (``/proc/self/clear_refs``) once mfprune is imported;
5. prints a markdown report (``--write-docs`` also puts it into docs/benchmarks.md).

Targets: prune time <= 1.5x cp time; peak RSS above baseline <= largest shard + 10%.

Run: ``make bench`` or ``.venv/bin/python benchmarks/rewrite.py [--size-gb 1.2] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch
from _common import mixtral_layer_tensors  # benchmarks/_common.py (scripts run from here)
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:rewrite:begin -->", "<!-- bench:rewrite:end -->"

# Mixtral-shaped, scaled down: 8 experts, top-2, GQA 32/8 heads; layers follow from --size-gb.
HIDDEN, INTERMEDIATE, VOCAB = 1024, 3584, 32000
HEADS, KV_HEADS, EXPERTS, TOP_K = 32, 8, 8, 2
SHARDS, KEEP = 5, 4
DTYPE = torch.bfloat16
RSS_TARGET = 1.10  # peak - baseline <= largest shard * this
TIME_TARGET = 1.5  # prune <= cp * this


# --------------------------------------------------------------------------- checkpoint


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


def build_checkpoint(root: Path, num_layers: int, seed: int = 0) -> list[int]:
    """Write the checkpoint; returns the shard file sizes."""
    names = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for layer in range(num_layers):
        names += layer_tensors(layer)
    names += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    total = sum(nbytes(s) for _, s in names)
    # shard k holds the tensors that start in the k-th fifth of the bytes: exactly SHARDS files
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(SHARDS)]
    offset = 0
    for name, shape in names:
        groups[min(SHARDS - 1, offset * SHARDS // total)].append((name, shape))
        offset += nbytes(shape)
    root.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map, sizes = {}, []
    for k, group in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{SHARDS:05d}.safetensors"
        tensors = {
            name: torch.randn(shape, generator=gen, dtype=torch.float32).to(DTYPE)
            if len(shape) > 1
            else torch.ones(shape, dtype=DTYPE)
            for name, shape in group
        }
        save_file(tensors, str(root / file), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys((n for n, _ in group), file))
        sizes.append((root / file).stat().st_size)
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
        "torch_dtype": "bfloat16",
    }
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return sizes


def write_plan(path: Path, num_layers: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    experts = {str(L): sorted(rng.sample(range(EXPERTS), KEEP)) for L in range(num_layers)}
    plan = {"format": "mfprune.plan/1", "experts": experts, "meta": {"criterion": "benchmark"}}
    path.write_text(json.dumps(plan, indent=1) + "\n")


# --------------------------------------------------------------------------- running


def mfprune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mfprune", *args]


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sync() -> float:
    t = time.perf_counter()
    os.sync()
    return time.perf_counter() - t


def drop_caches() -> bool:
    """Empty the page cache (root only); False when this machine does not allow it."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def warm_up(src: Path) -> None:
    for p in src.iterdir():
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


@dataclass
class Timings:
    run: list[float] = field(default_factory=list)  # the command alone
    durable: list[float] = field(default_factory=list)  # the command, then sync
    written: int = 0


def time_round(cmd: list[str], out: Path, cold: bool, t: Timings) -> None:
    if cold:
        drop_caches()
    else:
        sync()
    start = time.perf_counter()
    run(cmd)
    elapsed = time.perf_counter() - start
    t.run.append(elapsed)
    t.durable.append(elapsed + sync())
    t.written = dir_bytes(out)
    shutil.rmtree(out)
    sync()


def bench_times(src: Path, plan: Path, work: Path, mode: str, repeats: int) -> dict[str, Timings]:
    out = work / "out"
    cmds = {
        "cp": ["cp", "-r", str(src), str(out)],
        "prune": mfprune_cmd(
            "prune", str(src), "--plan", str(plan), "--out", str(out), "--format", "quiet"
        ),
    }
    times = {k: Timings() for k in cmds}
    if mode == "warm":
        warm_up(src)
    for r in range(repeats):
        order = list(cmds) if r % 2 == 0 else list(cmds)[::-1]  # alternate who goes first
        for k in order:
            time_round(cmds[k], out, mode == "cold", times[k])
            print(f"  {mode} round {r + 1}: {k:5s} {times[k].durable[-1]:6.2f} s", flush=True)
    return times


LAUNCHER = r"""
import json, sys
import mfprune.arch, mfprune.cli, mfprune.plan, mfprune.rewrite

def status():
    f = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(f[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

report, args = sys.argv[1], sys.argv[2:]
base = status()
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    reset = True
except OSError:
    reset = False
code = 0
try:
    mfprune.cli.app(args=args, prog_name="mfprune")
except SystemExit as exc:
    code = exc.code or 0
json.dump({"base": base, "end": status(), "hwm_reset": reset, "code": code}, open(report, "w"))
sys.exit(code)
"""


def bench_rss(src: Path, plan: Path, work: Path) -> dict[str, object]:
    out, report = work / "out", work / "rss.json"
    args = ["prune", str(src), "--plan", str(plan), "--out", str(out), "--format", "quiet"]
    cmd = [sys.executable, "-c", LAUNCHER, str(report), *args]
    gnu_time = shutil.which("time")
    if gnu_time:
        cmd = [gnu_time, "-v", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"prune under the RSS launcher failed:\n{proc.stderr}")
    shutil.rmtree(out)
    data = json.loads(report.read_text())
    result: dict[str, object] = {
        "baseline": data["base"]["VmRSS"],
        "hwm_at_baseline": data["base"]["VmHWM"],
        "peak": data["end"]["VmHWM"],
        "hwm_reset": data["hwm_reset"],
    }
    for line in proc.stderr.splitlines():
        if "Maximum resident set size" in line:
            result["time_v_maxrss"] = int(line.split(":")[1]) * 1024
    return result


# --------------------------------------------------------------------------- report


def machine() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": f"{mem / 2**30:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "cp": subprocess.run(["cp", "--version"], capture_output=True, text=True)
        .stdout.splitlines()[0]
        .strip(),
    }


def filesystem(path: Path) -> str:
    lines = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True).stdout
    fields = lines.splitlines()[-1].split()
    return f"{fields[1]} ({fields[0]})"


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def render(info: dict[str, object]) -> str:
    m: dict[str, str] = info["machine"]  # type: ignore[assignment]
    lines = [
        f"Measured {info['date']} by `benchmarks/rewrite.py --size-gb {info['size_gb']} "
        f"--repeats {info['repeats']}` (medians of {info['repeats']} alternating rounds).",
        "",
        "**Machine**: "
        f"{m['cpu']}, {m['cores']} cores, {m['ram']} RAM, Linux {m['kernel']}; "
        f"workdir on {info['fs']}; Python {m['python']}, torch {m['torch']}, "
        f"safetensors {m['safetensors']}, {m['cp']}.",
        "",
        f"**Checkpoint**: Mixtral-shaped, {info['layers']} layers, hidden {HIDDEN}, "
        f"intermediate {INTERMEDIATE}, {EXPERTS} experts, bf16; {mb(info['src_bytes'])} in "
        f"{SHARDS} shards (largest {mb(info['largest_shard'])}). "
        f"Plan: keep {KEEP} of {EXPERTS} experts per layer; output {mb(info['out_bytes'])}.",
        "",
        "| page cache | `cp -r` | `cp -r` + sync | `mfprune prune` | prune + sync "
        "| **prune / cp** (+ sync) | prune / cp (no sync) | write MB/s cp | write MB/s prune |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    verdicts = []
    for mode, t in info["times"].items():  # type: ignore[attr-defined]
        cp, pr = t["cp"], t["prune"]
        ratio = pr["durable"] / cp["durable"]
        lines.append(
            f"| {mode} | {cp['run']:.2f} s | {cp['durable']:.2f} s | {pr['run']:.2f} s "
            f"| {pr['durable']:.2f} s | **{ratio:.2f}×** | {pr['run'] / cp['run']:.2f}× "
            f"| {cp['written'] / cp['durable'] / 1e6:,.0f} "
            f"| {pr['written'] / pr['durable'] / 1e6:,.0f} |"
        )
        ok = "met" if ratio <= TIME_TARGET else "**missed**"
        verdicts.append(f"{mode} cache {ratio:.2f}× ({ok})")
    rss: dict[str, int] = info["rss"]  # type: ignore[assignment]
    delta, limit = rss["peak"] - rss["baseline"], info["largest_shard"] * RSS_TARGET
    lines += [
        "",
        "| peak RSS of the prune | |",
        "|---|--:|",
        f"| RSS after imports (baseline) | {rss['baseline'] / 2**20:,.1f} MiB |",
        f"| peak RSS while pruning (VmHWM) | {rss['peak'] / 2**20:,.1f} MiB |",
        f"| **peak − baseline** | **{delta / 2**20:,.1f} MiB** |",
        f"| largest shard + 10% (target) | {limit / 2**20:,.1f} MiB |",
    ]
    if "time_v_maxrss" in rss:
        lines.append(
            f"| whole process incl. imports (`time -v`) | {rss['time_v_maxrss'] / 2**20:,.1f} MiB |"
        )
    if not rss["hwm_reset"]:
        lines.append("| (VmHWM could not be reset: the peak includes import-time spikes) | |")
    rss_ok = "met" if delta <= limit else "**missed**"
    lines += [
        "",
        f"**Targets**: prune ≤ {TIME_TARGET}× cp (both + sync) — {'; '.join(verdicts)}. "
        f"Peak RSS above baseline ≤ largest shard + 10% — {delta / 2**20:,.1f} MiB vs "
        f"{limit / 2**20:,.1f} MiB ({rss_ok}).",
    ]
    return "\n".join(lines) + "\n"


def write_docs(section: str) -> None:
    block = f"{BEGIN}\n{section}{END}\n"
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        rest = rest.split(END, 1)[1].lstrip("\n")
        text = head + block + ("\n" + rest if rest else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.2, help="checkpoint size (GB, 1e9 B)")
    ap.add_argument("--workdir", type=Path, help="where to work (default: a temp dir in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir's checkpoint and plan")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per tool and cache mode")
    ap.add_argument(
        "--cache",
        choices=["both", "cold", "warm"],
        default="both",
        help="page cache state for the timings (cold needs root; falls back to warm)",
    )
    ap.add_argument("--write-docs", action="store_true", help=f"update {DOCS.relative_to(REPO)}")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mfprune-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    src, plan, stamp = work / "src", work / "plan.json", work / "src.json"
    layers = layers_for(args.size_gb * 1e9)
    try:
        if stamp.exists() and json.loads(stamp.read_text()).get("layers") == layers:
            print(f"reusing {src}")
        else:
            shutil.rmtree(src, ignore_errors=True)
            print(f"writing a {layers}-layer Mixtral-shaped checkpoint to {src} ...", flush=True)
            t = time.perf_counter()
            build_checkpoint(src, layers)
            stamp.write_text(json.dumps({"layers": layers}) + "\n")
            print(f"  {mb(dir_bytes(src))} in {time.perf_counter() - t:.1f} s")
        write_plan(plan, layers)
        run(mfprune_cmd("inspect", str(src), "--format", "json"))
        shard_sizes = [p.stat().st_size for p in src.glob("*.safetensors")]

        modes = ["cold", "warm"] if args.cache == "both" else [args.cache]
        if "cold" in modes and not drop_caches():
            print("cannot drop the page cache (not root?): warm-cache timings only")
            modes = ["warm"]
        times = {}
        for mode in modes:
            t = bench_times(src, plan, work, mode, args.repeats)
            times[mode] = {
                k: {
                    "run": statistics.median(v.run),
                    "durable": statistics.median(v.durable),
                    "written": v.written,
                }
                for k, v in t.items()
            }
        # the output once more, checked, for its size
        out = work / "out"
        run(mfprune_cmd("prune", str(src), "--plan", str(plan), "--out", str(out)))
        run(mfprune_cmd("inspect", str(out), "--format", "json"))
        out_bytes = dir_bytes(out)
        shutil.rmtree(out)
        print("measuring peak RSS ...", flush=True)
        rss = bench_rss(src, plan, work)

        info = {
            "date": time.strftime("%Y-%m-%d"),
            "size_gb": args.size_gb,
            "repeats": args.repeats,
            "machine": machine(),
            "fs": filesystem(work),
            "layers": layers,
            "src_bytes": dir_bytes(src),
            "out_bytes": out_bytes,
            "largest_shard": max(shard_sizes),
            "times": times,
            "rss": rss,
        }
        section = render(info)
        print()
        print(section)
        if args.write_docs:
            write_docs(section)
            print(f"updated {DOCS}")
    finally:
        shutil.rmtree(work / "out", ignore_errors=True)
        if not args.keep:
            if args.workdir:
                for p in (src, plan, stamp, work / "rss.json"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            else:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

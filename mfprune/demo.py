"""`make demo`: the main job end to end on the embedded default model (no hub, no GPU).

The default model is a small Qwen3-MoE trained by this project on four domains (code, docs,
quotes, dictionary; ``mfprune/default_model``). The demo takes one domain as the task and runs
the real commands, in this process:

1. ``mfprune profile default --data <task>.profile.jsonl``: how the task uses every expert;
2. heads: measures, with the pruned heads masked (``mfprune.heldout``), what keeping half the
   query heads as well would cost the task on its own profile texts, and prunes them only when
   that costs at most ``HEADS_TOLERANCE`` more loss;
3. ``mfprune prune default --profile ... --criterion soft --keep-ratio 0.5 --repair refit
   --data <task>.profile.jsonl``: half the experts of every layer, the kept experts refit on
   the task's profile texts (``mfprune.repair``: closed form, then the default refinement; the
   best method in ``benchmarks/specialize.py``), and, for comparison, the same plan with
   plain dropping (``--repair none``, the exact rewrite) into ``dropped/``;
4. ``mfprune bench <pruned> --baseline default --data <every domain>.eval.jsonl --limit N``:
   lm-eval perplexity on held-out texts of every domain, speed and size, both models; then
   ``mfprune bench dropped/`` (quality only);
5. ``mfprune show --html``: the expert-usage heatmap;

then prints one table: per domain, the loss (bits per byte) before, after dropping and after
dropping + refit, with their ratios, the task marked, plus size and speed. Everything lands
in the output folder (default ``demo-out``), with ``summary.json`` / ``summary.md``.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: prune heads too when that raises the task's loss by at most this share (on top of experts)
HEADS_TOLERANCE = 0.02
#: the criterion the demo ranks experts with (benchmarks/specialize.py: best here, with
#: frequency; REAP loses more on this model)
CRITERION = "soft"
METRIC = "bits_per_byte"
#: the repair the demo prunes with, and the calibration tokens it takes from the task's
#: profile texts (benchmarks/specialize.py: refit beats plain dropping on every domain)
REPAIR = "refit"
REPAIR_TOKENS = 16000


@dataclass
class DemoResult:
    out: Path
    task: str
    keep_ratio: float
    heads_pruned: bool
    heads_note: str
    repair: str = REPAIR
    # per domain: before / after (repaired) / ratio, and dropped / dropped_ratio (plain drop)
    domains: list[dict[str, Any]] = field(default_factory=list)
    size: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "keep_ratio": self.keep_ratio,
            "criterion": CRITERION,
            "repair": self.repair,
            "heads_pruned": self.heads_pruned,
            "heads_note": self.heads_note,
            "metric": METRIC,
            "domains": self.domains,
            "size": self.size,
            "speed": self.speed,
            "seconds": round(self.seconds, 1),
        }


def mfprune(*args: Any) -> None:
    """Run one `mfprune` command in this process (the real CLI), showing it first."""
    from mfprune.cli import app

    argv = [_short(a) for a in args]
    print(f"\n$ mfprune {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    code = app(argv, prog_name="mfprune", standalone_mode=False)
    if code not in (None, 0):
        raise SystemExit(f"mfprune {argv[0]} failed (exit {code})")


def _short(arg: Any) -> str:
    """Paths under the current folder as relative paths (shorter to read, same meaning)."""
    if isinstance(arg, Path) and arg.is_absolute():
        try:
            return str(arg.relative_to(Path.cwd()))
        except ValueError:
            pass
    return str(arg)


def run_demo(
    out: str | Path = "demo-out",
    *,
    task: str = "code",
    keep_ratio: float = 0.5,
    limit: int | None = 100,
    max_tokens: int | None = None,
    heads_texts: int = 50,
    speed: bool = True,
    repair: str = REPAIR,
    repair_tokens: int | None = REPAIR_TOKENS,
) -> DemoResult:
    """The demo's pipeline (module docstring); small budgets make it a quick test.

    Args:
        limit: eval texts per domain for the bench (None: all of them).
        max_tokens: profile at most this many tokens of the task's profile texts.
        heads_texts: profile texts the heads check is measured on.
        speed: also time prefill and decode.
        repair: how the pruned model is made ("refit" or "none"); with "refit" the plain drop
            is made and benched too, for the comparison.
        repair_tokens: calibrate the repair on at most this many profile tokens.
    """
    from mfprune.default_model import DEFAULT_DATA_DIR, DOMAINS

    if task not in DOMAINS:
        raise SystemExit(f"unknown task '{task}': one of {', '.join(DOMAINS)}")
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = out / f"{task}.stats.safetensors"
    pruned, plain = out / "pruned", out / "dropped"
    steps = 5
    step(1, steps, f"profile the default model on its '{task}' texts")
    budget = ["--max-tokens", max_tokens] if max_tokens else []
    mfprune(
        "profile", "default", "--data", DEFAULT_DATA_DIR / f"{task}.profile.jsonl",
        "--out", stats, "--seq-len", 512, *budget,
    )  # fmt: skip
    step(2, steps, "heads: would pruning half of them too keep the task's quality?")
    heads_pruned, heads_note = check_heads(stats, task, keep_ratio, heads_texts)
    print(heads_note, flush=True)
    how = f"{CRITERION}, repair: {repair}"
    step(3, steps, f"prune: keep {keep_ratio:.0%} of the experts of every layer ({how})")
    if repair != "none" and heads_pruned:  # the repair handles MLP experts only
        heads_pruned = False
        heads_note += "; the heads stay anyway: --repair handles experts only"
    heads = ["--heads-keep-ratio", 0.5] if heads_pruned else []
    plan = ["default", "--profile", stats, "--criterion", CRITERION, "--keep-ratio", keep_ratio]
    calibration = ["--data", DEFAULT_DATA_DIR / f"{task}.profile.jsonl"]
    calibration += ["--max-tokens", repair_tokens] if repair_tokens else []
    mfprune(
        "prune", *plan, *heads, "--out", pruned, "--overwrite",
        *(["--repair", repair, *calibration] if repair != "none" else []),
    )  # fmt: skip
    if repair != "none":
        print("\nthe same plan with plain dropping (the exact rewrite), for the comparison:")
        mfprune("prune", *plan, "--out", plain, "--overwrite", "--format", "quiet")
    print(
        "(the default model's data/, metrics.json, __init__.py and model card are not part of "
        "the pruned model: it gets its own README.md)"
    )
    texts = f"{limit} held-out texts" if limit else "the held-out texts"
    step(4, steps, f"bench: the original, then the pruned model, on {texts} of every domain")
    data = [a for d in DOMAINS for a in ("--data", DEFAULT_DATA_DIR / f"{d}.eval.jsonl")]
    mfprune(
        "bench", pruned, "--baseline", "default", *data,
        *(["--limit", limit] if limit else []), *([] if speed else ["--no-speed"]),
        "--json-out", out / "bench.json", "--format", "quiet",
    )  # fmt: skip
    if repair != "none":
        mfprune(
            "bench", plain, *data, *(["--limit", limit] if limit else []), "--no-speed",
            "--json-out", out / "bench-dropped.json", "--format", "quiet",
        )  # fmt: skip
    step(5, steps, "heatmap: which experts the task uses (× = dropped by the plan)")
    mfprune(
        "show", stats, "--plan", pruned / "mfprune_plan.json", "--html", out / "heatmap.html",
        "--format", "quiet",
    )  # fmt: skip
    result = summarise(out, task, keep_ratio, heads_pruned, heads_note, repair)
    result.seconds = time.perf_counter() - start
    (out / "summary.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", "utf-8")
    (out / "summary.md").write_text(markdown(result), "utf-8")
    return result


def step(i: int, n: int, what: str) -> None:
    print(f"\n[{i}/{n}] {what}", flush=True)


def check_heads(stats: Path, task: str, keep_ratio: float, texts: int) -> tuple[bool, str]:
    """Whether pruning half the query heads as well costs the task at most HEADS_TOLERANCE
    more loss, measured on its profile texts with experts and heads masked."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mfprune.arch import spec_for_config
    from mfprune.arch.layout import resolve_layout
    from mfprune.checkpoint import open_checkpoint
    from mfprune.default_model import DEFAULT_DATA_DIR, DEFAULT_MODEL_DIR
    from mfprune.heldout import HeldOut, dropped, heldout_loss, read_texts
    from mfprune.planner import plan_from_profile
    from mfprune.profiling import ProfileStats
    from mfprune.profiling.run import quiet_transformers

    ckpt = open_checkpoint(DEFAULT_MODEL_DIR)
    layout = resolve_layout(ckpt, spec_for_config(ckpt.config))
    if layout.heads is None or layout.spec.heads.unsupported:
        return False, "heads: this model's heads cannot be pruned; experts only"
    profile = ProfileStats.load(stats)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            DEFAULT_MODEL_DIR, local_files_only=True, use_safetensors=True
        ).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    data = HeldOut.load(tokenizer, read_texts(DEFAULT_DATA_DIR / f"{task}.profile.jsonl", texts))
    plan, _ = plan_from_profile(
        layout, profile, criterion=CRITERION, keep_ratio=keep_ratio, heads_keep_ratio=0.5
    )
    e = layout.experts
    experts = dropped({layer: plan.kept_experts(e, layer) for layer in e.layers}, e.num_experts)
    heads = dropped({layer: list(ids) for layer, ids in plan.heads.items()}, layout.heads.num_heads)
    with torch.inference_mode():
        base = heldout_loss(model, data)
        experts_only = heldout_loss(model, data, experts=experts)
        both = heldout_loss(model, data, experts=experts, heads=heads)
    extra = both / experts_only - 1
    kept = len(next(iter(plan.heads.values())))
    where = f"measured on {data.texts} {task} profile texts, pruned parts masked"
    if extra <= HEADS_TOLERANCE:
        return True, (
            f"heads: keeping {kept} of {layout.heads.num_heads} query heads per layer too adds "
            f"{extra:+.1%} to the {task} loss ({where}): within {HEADS_TOLERANCE:.0%}, so the "
            "heads are pruned as well"
        )
    return False, (
        f"heads: the experts alone raise the {task} loss ×{experts_only / base:.3f}; keeping "
        f"{kept} of {layout.heads.num_heads} query heads per layer as well would make it "
        f"×{both / base:.3f} ({extra:+.1%}; {where}). That is more than the "
        f"{HEADS_TOLERANCE:.0%} we accept: this small model uses all its heads, so they all stay"
    )


def summarise(
    out: Path, task: str, keep_ratio: float, heads_pruned: bool, heads_note: str, repair: str
) -> DemoResult:
    from mfprune.bench.quality import data_task_name
    from mfprune.default_model import DOMAINS

    bench = json.loads((out / "bench.json").read_text(encoding="utf-8"))
    base, model = bench["baseline"], bench["model"]
    plain = None
    if repair != "none":
        plain = json.loads((out / "bench-dropped.json").read_text(encoding="utf-8"))["model"]
    result = DemoResult(out, task, keep_ratio, heads_pruned, heads_note, repair)
    for domain in DOMAINS:
        key = f"{data_task_name(Path(f'{domain}.eval.jsonl'))}/{METRIC}"
        before, after = base["quality"][key]["value"], model["quality"][key]["value"]
        row = {
            "domain": domain,
            "task": domain == task,
            "before": before,
            "after": after,
            "ratio": after / before,
            "texts": model["quality"][key]["samples"],
        }
        if plain is not None:
            row["dropped"] = plain["quality"][key]["value"]
            row["dropped_ratio"] = row["dropped"] / before
        result.domains.append(row)
    result.size = {
        "params": (base["params"], model["params"]),
        "disk_bytes": (base["disk_bytes"], model["disk_bytes"]),
    }
    verdicts = {row["name"]: row.get("verdict") for row in bench["comparison"]}
    if model["speed"] and base["speed"]:
        for kind in ("prefill", "decode"):
            name = f"{kind}_tokens_per_s"
            verdict = verdicts.get(f"{kind} tokens/s")
            result.speed[kind] = (base["speed"][name], model["speed"][name], verdict)
    return result


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _verdict(row: dict[str, Any]) -> str:
    change = row["ratio"] - 1
    if row["task"]:
        return f"the task: {change:+.0%} loss"
    return f"{change:+.0%} loss"


def _repaired(result: DemoResult) -> bool:
    return bool(result.domains) and "dropped" in result.domains[0]


def columns(result: DemoResult) -> list[str]:
    if not _repaired(result):
        return ["before", "after", "ratio"]
    return ["before", "dropped", f"+ {result.repair}", "ratio dropped", f"ratio + {result.repair}"]


def rows(result: DemoResult) -> list[tuple[str, ...]]:
    """(what, *columns(result)) lines of the summary table."""
    both = _repaired(result)
    lines: list[tuple[str, ...]] = []
    for d in result.domains:
        name = f"{d['domain']} (task)" if d["task"] else d["domain"]
        if both:
            lines.append(
                (name, f"{d['before']:.3f}", f"{d['dropped']:.3f}", f"{d['after']:.3f}",
                 f"×{d['dropped_ratio']:.3f}", f"×{d['ratio']:.3f}")
            )  # fmt: skip
        else:
            lines.append((name, f"{d['before']:.3f}", f"{d['after']:.3f}", f"×{d['ratio']:.3f}"))
    (p0, p1), (b0, b1) = result.size["params"], result.size["disk_bytes"]
    others = [
        ("parameters", f"{p0 / 1e6:.2f} M", f"{p1 / 1e6:.2f} M", f"×{p1 / p0:.2f}"),
        ("checkpoint on disk", _mb(b0), _mb(b1), f"×{b1 / b0:.2f}"),
    ]
    for kind, (s0, s1, verdict) in result.speed.items():
        if verdict is None:  # a speed number without its noise verdict is not shown
            continue
        ratio = f"×{s1 / s0:.2f} {verdict}"
        others.append((f"{kind} (tokens/s)", f"{s0:,.0f}", f"{s1:,.0f}", ratio))
    for what, before, after, ratio in others:  # the same for both pruned models
        lines.append(
            (what, before, after, after, ratio, ratio) if both else (what, before, after, ratio)
        )
    return lines


def _title(result: DemoResult) -> str:
    heads = " and half the heads" if result.heads_pruned else ""
    return f"Pruned for {result.task}: {result.keep_ratio:.0%} of the experts kept{heads}"


def _legend(result: DemoResult) -> str:
    texts = result.domains[0]["texts"] if result.domains else "?"
    legend = (
        f"loss = lm-eval bits per byte on {texts} held-out texts per domain, lower is better; "
        f"ratio = after ÷ before; experts ranked by '{CRITERION}' on the {result.task} profile"
        + (
            "; speed: median of interleaved runs, 'within noise' when the runs' spreads overlap"
            if result.speed
            else ""
        )
    )
    if _repaired(result):
        legend += (
            f"; dropped = the plan's experts removed (the exact rewrite); + {result.repair} = "
            f"the same plan with `--repair {result.repair}` on the {result.task} profile texts; "
            "both have the same shapes, so size and speed are measured once"
        )
    return legend


def _gain(result: DemoResult) -> str:
    """One sentence: what the repair won over plain dropping on the task."""
    if not _repaired(result):
        return ""
    task = next(d for d in result.domains if d["task"])
    lost_drop, lost_repair = task["dropped_ratio"] - 1, task["ratio"] - 1
    share = 1 - lost_repair / lost_drop if lost_drop > 0 else 0.0
    if share <= 0:
        return (
            f"--repair {result.repair} did not help here: the task's loss is "
            f"×{task['ratio']:.3f} against ×{task['dropped_ratio']:.3f} with plain dropping "
            "(too few calibration tokens?)."
        )
    return (
        f"--repair {result.repair} takes the task's loss from ×{task['dropped_ratio']:.3f} "
        f"(plain dropping) to ×{task['ratio']:.3f}: {share:.0%} of what dropping lost is won "
        "back, at the same size."
    )


def markdown(result: DemoResult) -> str:
    head = columns(result)
    lines = [
        f"**{_title(result)}**",
        "",
        "| | " + " | ".join(head) + " |",
        "|---|" + "---:|" * len(head),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(result)]
    return (
        "\n".join([*lines, "", _legend(result) + ".", "", _gain(result), "", result.heads_note])
        + "\n"
    )


def print_table(result: DemoResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=_title(result), title_justify="left")
    table.add_column("loss per domain", justify="left")
    for column in columns(result):
        table.add_column(column, justify="right")
    lines = rows(result)
    n = len(result.domains)
    for i, row in enumerate(lines):
        if i == n:
            table.add_section()
        style = "bold" if i < n and result.domains[i]["task"] else None
        table.add_row(*row, style=style)
    console = Console(highlight=False)
    console.print()
    console.print(table)
    console.print(_legend(result) + ".")
    task = next(d for d in result.domains if d["task"])
    others = [d for d in result.domains if not d["task"]]
    mean_other = sum(d["ratio"] for d in others) / len(others)
    if task["ratio"] < mean_other:
        verdict = (
            f"The task loses least (loss ×{task['ratio']:.3f}; the other domains ×"
            f"{mean_other:.3f} on average): the experts kept are the ones it uses."
        )
    else:
        verdict = (
            f"The task lost as much as the others (×{task['ratio']:.3f} against ×"
            f"{mean_other:.3f}): its profile did not single out its experts."
        )
    size = result.size["params"][1] / result.size["params"][0]
    speed = result.speed.get("prefill")
    faster = (
        " Every token still runs its top-2 experts, so it is smaller more than faster."
        if speed is not None and speed[2] != "faster"
        else ""
    )
    if _gain(result):
        console.print(_gain(result))
    console.print(f"{verdict} The pruned model has ×{size:.2f} the parameters.{faster}")
    dropped = ", dropped/ (plain dropping)" if _repaired(result) else ""
    console.print(
        f"Files in {result.out}/: {task['domain']}.stats.safetensors (the profile), pruned/ "
        f"(the model){dropped}, bench.json, heatmap.html (open it in a browser), summary.md"
    )


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mfprune.demo", description=__doc__)
    parser.add_argument("out", nargs="?", default="demo-out", help="output folder")
    parser.add_argument("--task", default="code", help="code, docs, quotes or dictionary")
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--limit", type=int, default=100, help="eval texts per domain")
    parser.add_argument("--repair", default=REPAIR, help="refit (default) or none")
    args = parser.parse_args(argv)
    result = run_demo(
        args.out, task=args.task, keep_ratio=args.keep_ratio, limit=args.limit, repair=args.repair
    )
    print_table(result)
    print(f"demo done in {result.seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

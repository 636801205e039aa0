"""Benchmark: does pruning for one domain keep that domain and let the others go?

On the embedded default model (a Qwen3-MoE trained on four domains: code, docs, quotes,
dictionary), for every domain as the task:

1. profile the task once on its ``{domain}.profile.jsonl`` (``mfprune.profile_model``);
2. plan with every criterion (frequency, soft, ean, reap, random) at keep ratios 75% / 50% /
   25% of the experts in every layer (uniform budget), and with a global budget of 50% / 25%
   (soft and reap) (``mfprune.planner.plan_from_profile``, exactly what ``mfprune prune
   --profile`` plans);
3. measure the held-out loss of every domain on its ``{domain}.eval.jsonl`` with the dropped
   experts masked out of their routers (``mfprune.heldout`` / ``mfprune.oracle.masked_logits``:
   the test suite proves the masked original computes exactly what the rewritten checkpoint
   computes, so no checkpoint is written), as a ratio to the unpruned model's loss.

Profiles and plans are independent of the evaluation texts (profile and eval sets are
disjoint). Identical plans are evaluated once. The "wrong data" control is the same plan made
from another domain's profile (the mean over the three others). ``random`` does not look at
the profile: it is the mean over ``--seeds`` seeds.

Optional (``--merge``, a separate, clearly labelled row): instead of dropping, each dropped
expert is merged into the kept expert whose router row is closest (cosine), its neurons first
aligned to the kept expert's (Hungarian matching on the gate/up weights), the weights averaged
by the task's routed mass (``soft``); the checkpoint still shrinks to the kept experts.

Optional (``--refit``, another separate row): what ``mfprune prune --repair refit --data
{domain}.profile.jsonl`` does (``mfprune.repair.refit.refit_model``, called on an in-memory
copy whose dropped experts stay masked: the same weights the repaired checkpoint holds): the
kept experts' down projections are refit layer by layer (ridge least squares towards the
original weights) so that each pruned MoE block reproduces the unpruned block on the task's
profile texts. Same shapes, same shrinking; the eval texts are never seen. The wall time and
the peak memory (RSS rise) of every refit are recorded.

Run: ``.venv/bin/python benchmarks/specialize.py [--threads 2] [--merge] [--refit]
[--write-docs]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import cpu_model, replace_section  # benchmarks/_common.py (scripts run from here)

# benchmarks/profile.py would shadow the standard library's `profile` (which torch imports):
# take this folder off the path, put the repository on it.
HERE, REPO = Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:specialize:begin -->", "<!-- bench:specialize:end -->"
CRITERIA = ("frequency", "soft", "ean", "reap", "random")
KEEP = (0.75, 0.5, 0.25)
GLOBAL = (0.5, 0.25)
GLOBAL_CRITERIA = ("soft", "reap")
CLOSED_FORM = "soft + refit (closed form)"
GOALS = {(0.5, "uniform"): 1.05, (0.5, "global"): 1.03, (0.25, "uniform"): 1.20}
GOALS[(0.25, "global")] = 1.20

# the reference figures (an independently trained model of the same kind)
REFERENCE = [
    ("50%", "frequency", (1.107, 1.154, 1.072, 1.049)),
    ("50%", "soft", (1.106, 1.127, 1.071, 1.048)),
    ("50%", "REAP", (1.090, 1.092, 1.060, 1.055)),
    ("50%", "random", (1.358, 1.235, 1.367, 1.776)),
    ("50%, global budget", "soft", (1.018, 1.037, 1.015, 1.033)),
    ("25%", "soft", (1.384, 1.424, 1.323, 1.270)),
    ("25%", "random", (1.796, 2.127, 1.623, 1.869)),
    ("25%, global budget", "soft", (1.384, 1.424, 1.175, 1.234)),
]


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------- the runs


class Bench:
    """The model, the eval sets, and a cache of losses per set of dropped experts."""

    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mfprune.arch import spec_for_config
        from mfprune.arch.layout import resolve_layout
        from mfprune.checkpoint import open_checkpoint
        from mfprune.default_model import DEFAULT_DATA_DIR, DEFAULT_MODEL_DIR, DOMAINS
        from mfprune.heldout import HeldOut, read_texts

        self.args = args
        self.domains = DOMAINS
        self.data_dir = DEFAULT_DATA_DIR
        self.model_dir = DEFAULT_MODEL_DIR
        ckpt = open_checkpoint(DEFAULT_MODEL_DIR)
        self.layout = resolve_layout(ckpt, spec_for_config(ckpt.config))
        self.model = AutoModelForCausalLM.from_pretrained(
            DEFAULT_MODEL_DIR, local_files_only=True, use_safetensors=True
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
        self.eval = {
            d: HeldOut.load(
                self.tokenizer, read_texts(DEFAULT_DATA_DIR / f"{d}.eval.jsonl", args.eval_texts)
            )
            for d in DOMAINS
        }
        self.cache: dict[Any, dict[str, float]] = {}
        self.evaluations = 0
        self.eval_seconds = 0.0
        self.base = self.losses({})

    def losses(self, dropped: dict[int, list[int]], model: Any = None) -> dict[str, float]:
        """Loss per eval domain with ``dropped`` masked (cached unless ``model`` is given)."""
        from mfprune.heldout import heldout_loss

        key = tuple(sorted((k, tuple(v)) for k, v in dropped.items()))
        if model is None and key in self.cache:
            return self.cache[key]
        start = time.perf_counter()
        out = {
            d: heldout_loss(model or self.model, data, experts=dropped)
            for d, data in self.eval.items()
        }
        self.eval_seconds += time.perf_counter() - start
        self.evaluations += 1
        if model is None:
            self.cache[key] = out
        return out

    def ratios(self, losses: dict[str, float]) -> dict[str, float]:
        return {d: losses[d] / self.base[d] for d in self.domains}

    def dropped_of(self, plan: Any) -> dict[int, list[int]]:
        from mfprune.heldout import dropped

        e = self.layout.experts
        return dropped({layer: plan.kept_experts(e, layer) for layer in e.layers}, e.num_experts)


def profile_all(bench: Bench, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from mfprune.heldout import read_texts
    from mfprune.profiling import profile_model

    stats = {}
    for d in bench.domains:
        data = bench.data_dir / f"{d}.profile.jsonl"
        if args.profile_texts is not None:  # the first N texts, as a JSONL file of their own
            texts = read_texts(data, args.profile_texts)
            data = folder / f"{d}.profile.jsonl"
            data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), "utf-8")
        start = time.perf_counter()
        stats[d] = profile_model(bench.model_dir, data, seq_len=512, batch_size=16)
        log(
            f"profiled {d}: {stats[d].meta.tokens:,} tokens from {stats[d].meta.documents} "
            f"texts in {time.perf_counter() - start:.1f}s"
        )
    return stats


def plan(bench: Bench, stats: Any, criterion: str, budget: dict[str, float], seed: int = 0):
    from mfprune.planner import plan_from_profile

    the_plan, _ = plan_from_profile(
        bench.layout,
        stats,
        criterion=criterion,
        criterion_options={"seed": seed} if criterion == "random" else {},
        **budget,
    )
    return the_plan


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mfprune.repair import DEFAULT_STEPS

    start = time.perf_counter()
    bench = Bench(args)
    log(
        "unpruned loss: "
        + ", ".join(f"{d} {v:.4f} ({bench.eval[d].tokens:,} tokens)" for d, v in bench.base.items())
    )
    with tempfile.TemporaryDirectory() as tmp:
        stats = profile_all(bench, args, Path(tmp))
    rows: list[dict[str, Any]] = []  # one per (task, budget, criterion, profile source)

    def record(task: str, kind: str, keep: float, criterion: str, source: str, r: dict) -> None:
        rows.append(
            {
                "task": task,
                "budget": kind,
                "keep": keep,
                "criterion": criterion,
                "profile": source,
                "ratios": r,
            }
        )

    keeps = (0.5, 0.25) if args.repair_only else KEEP
    for keep in keeps:
        for seed in range(args.seeds):  # random: the same plans for every task
            p = plan(bench, stats[bench.domains[0]], "random", {"keep_ratio": keep}, seed)
            r = bench.ratios(bench.losses(bench.dropped_of(p)))
            for task in bench.domains:
                record(task, "uniform", keep, "random", f"seed {seed}", r)
        log(f"keep {keep:.0%}: random done ({bench.evaluations} evaluations so far)")
    budgets = [("uniform", k, {"keep_ratio": k}, CRITERIA[:-1]) for k in KEEP]
    budgets += [("global", g, {"global_budget": g}, GLOBAL_CRITERIA) for g in GLOBAL]
    if args.repair_only:  # the side-by-side of the repair methods only
        budgets = [("uniform", k, {"keep_ratio": k}, ("soft",)) for k in keeps]
    for kind, keep, budget, criteria in budgets:
        for criterion in criteria:
            for source in bench.domains:  # the plan from each profile, measured on every domain
                p = plan(bench, stats[source], criterion, budget)
                r = bench.ratios(bench.losses(bench.dropped_of(p)))
                for task in bench.domains:
                    record(task, kind, keep, criterion, source, r)
            log(
                f"{kind} {keep:.0%} {criterion}: done ({bench.evaluations} evaluations, "
                f"{time.perf_counter() - start:.0f}s)"
            )
    costs: list[dict[str, Any]] = []  # the refit's wall time and memory, per task and budget
    if args.refit:
        for keep in (0.5, 0.25):
            for task in bench.domains:
                p = plan(bench, stats[task], "soft", {"keep_ratio": keep})
                for steps, name in ((0, CLOSED_FORM), (DEFAULT_STEPS, "soft + refit")):
                    refit, cost = refit_kept(bench, task, p, steps=steps)
                    r = bench.ratios(bench.losses(bench.dropped_of(p), model=refit))
                    record(task, "uniform", keep, name, task, r)
                    costs.append({"task": task, "keep": keep, "steps": steps, **cost})
                    del refit
            log(f"refit {keep:.0%}: done ({time.perf_counter() - start:.0f}s)")
        with tempfile.TemporaryDirectory() as tmp:  # as a user runs it: `mfprune prune` twice
            processes = [cli_costs(stats["code"], "code", keep, Path(tmp)) for keep in (0.5, 0.25)]
        log(f"prune processes timed ({time.perf_counter() - start:.0f}s)")
    if args.merge:
        for keep in (0.5, 0.25):
            for task in bench.domains:
                p = plan(bench, stats[task], "soft", {"keep_ratio": keep})
                merged = merge_into_kept(bench, stats[task], p)
                r = bench.ratios(bench.losses(bench.dropped_of(p), model=merged))
                record(task, "uniform", keep, "soft + merge", task, r)
                del merged
            log(f"merge {keep:.0%}: done ({time.perf_counter() - start:.0f}s)")
    return {
        "base_loss": bench.base,
        "eval_tokens": {d: bench.eval[d].tokens for d in bench.domains},
        "eval_texts": {d: bench.eval[d].texts for d in bench.domains},
        "profile_tokens": {d: stats[d].meta.tokens for d in bench.domains},
        "profile_texts": {d: stats[d].meta.documents for d in bench.domains},
        "metrics_json_eval_loss": json.loads((bench.model_dir / "metrics.json").read_text()).get(
            "eval_loss"
        ),
        "model_sha256_head": _weights_id(bench.model_dir),
        "rows": rows,
        "refit_costs": costs,
        "prune_processes": processes if args.refit else [],
        "evaluations": bench.evaluations,
        "eval_seconds": round(bench.eval_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "machine": machine(),
        "settings": {
            "seeds": args.seeds,
            "merge": args.merge,
            "refit": args.refit,
            "repair_only": args.repair_only,
            "threads": torch.get_num_threads(),
        },
    }


def _weights_id(folder: Path) -> str:
    import hashlib

    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:16]


# --------------------------------------------------------------------------------- merging


def merge_into_kept(bench: Bench, stats: Any, the_plan: Any) -> Any:
    """A copy of the model whose kept experts absorbed the dropped ones (module docstring);
    the dropped ones stay in place, to be masked, so the result equals the merged-and-pruned
    checkpoint's."""
    import copy

    from scipy.optimize import linear_sum_assignment

    from mfprune.modules import find_routers, parent_of

    model = copy.deepcopy(bench.model)
    e = bench.layout.experts
    routers = find_routers(model, attention=False)
    with torch.no_grad():
        for row, layer in enumerate(e.layers):
            kept = list(the_plan.kept_experts(e, layer))
            gone = [i for i in range(e.num_experts) if i not in kept]
            name, router = routers[layer]
            experts = parent_of(model, name).experts
            gate_up, down = experts.gate_up_proj, experts.down_proj  # [E, 2I, H], [E, H, I]
            mass = stats.experts.soft[row].double().clamp(min=0)
            rows = torch.nn.functional.normalize(router.weight.double(), dim=1)
            target = {j: kept[int((rows[kept] @ rows[j]).argmax())] for j in gone}
            for k in kept:
                members = [k] + [j for j in gone if target[j] == k]
                weights = mass[members]
                if len(members) == 1 or float(weights.sum()) == 0:
                    continue
                weights = (weights / weights.sum()).to(gate_up.dtype)
                inter = down.shape[2]
                acc_gu = weights[0] * gate_up[k]
                acc_d = weights[0] * down[k]
                for w, j in zip(weights[1:], members[1:], strict=True):
                    # align j's neurons to k's: neuron n of k <-> perm[n] of j
                    feat_k = torch.cat([gate_up[k, :inter], gate_up[k, inter:]], dim=1)
                    feat_j = torch.cat([gate_up[j, :inter], gate_up[j, inter:]], dim=1)
                    sim = (
                        torch.nn.functional.normalize(feat_k, dim=1)
                        @ torch.nn.functional.normalize(feat_j, dim=1).T
                    )
                    _, perm = linear_sum_assignment(-sim.numpy())
                    perm_t = torch.as_tensor(perm)
                    gu_j = torch.cat([gate_up[j, :inter][perm_t], gate_up[j, inter:][perm_t]])
                    acc_gu += w * gu_j
                    acc_d += w * down[j][:, perm_t]
                gate_up[k] = acc_gu
                down[k] = acc_d
    return model


def refit_kept(bench: Bench, task: str, the_plan: Any, *, steps: int) -> tuple[Any, dict[str, Any]]:
    """A copy of the model whose kept experts are refit by ``mfprune.repair`` on the task's
    profile texts, batched as ``mfprune prune --repair refit`` batches them (``steps``: the
    refinement's steps per layer, 0 for the closed form only); and what the refit cost (wall
    time, tokens)."""
    import copy

    from mfprune.profiling.data import load_token_data
    from mfprune.profiling.run import _pad_id
    from mfprune.repair.refit import refit_model

    model = copy.deepcopy(bench.model)
    e = bench.layout.experts
    kept = {layer: list(the_plan.kept_experts(e, layer)) for layer in e.layers}
    from mfprune.heldout import read_texts

    with tempfile.TemporaryDirectory() as tmp:  # the profile texts (the first N with -p N)
        data = Path(tmp) / "profile.jsonl"
        texts = read_texts(bench.data_dir / f"{task}.profile.jsonl", bench.args.profile_texts)
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), "utf-8")
        # seq_len: what prune picks, min(2048, max_position_embeddings)
        tokens = load_token_data(data, bench.tokenizer, seq_len=512)
    batches = list(tokens.batches(batch_size=8, pad_id=_pad_id(bench.tokenizer)))
    start = time.perf_counter()
    refit_model(model, kept=kept, batches=batches, steps=steps)
    return model, {"seconds": round(time.perf_counter() - start, 2), "tokens": tokens.tokens}


_PEAK_SNIPPET = """
import sys
from mfprune.cli import app
try:
    app(sys.argv[1:], prog_name="mfprune", standalone_mode=False)
finally:  # the peak RSS of this process alone (VmHWM starts afresh at exec)
    with open("/proc/self/status") as f:
        peak = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(PEAK, "w") as f:
        f.write(peak)
"""


def cli_costs(stats: Any, task: str, keep: float, folder: Path) -> dict[str, Any]:
    """Wall time and peak RSS of ``mfprune prune default --profile ... --criterion soft`` as a
    process of its own, without and with ``--repair refit --data {task}.profile.jsonl``."""
    import subprocess

    from mfprune.default_model import DEFAULT_DATA_DIR

    stats_path = folder / f"{task}.stats.safetensors"
    stats.save(stats_path)
    out: dict[str, Any] = {"task": task, "keep": keep}
    for repair in ("none", "refit"):
        extra = ["--data", str(DEFAULT_DATA_DIR / f"{task}.profile.jsonl")]
        peak = folder / f"{task}-{keep}-{repair}.peak"
        argv = [
            sys.executable, "-c", _PEAK_SNIPPET.replace("PEAK", repr(str(peak))),
            "prune", "default", "--profile", str(stats_path),
            "--criterion", "soft", "--keep-ratio", str(keep), "--format", "quiet",
            "--out", str(folder / f"{task}-{keep}-{repair}"), "--repair", repair,
            *(extra if repair == "refit" else []),
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(REPO))
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, cwd=REPO, check=False)
        if done.returncode:
            sys.exit(f"mfprune prune --repair {repair} failed with exit {done.returncode}")
        out[repair] = {
            "seconds": round(time.perf_counter() - start, 2),
            "max_rss": int(peak.read_text()) * 1024,  # VmHWM is in kB
        }
    return out


def time_processes(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Only the prune processes (``--time-processes``): the code profile, then both runs."""
    from mfprune.default_model import DEFAULT_DATA_DIR, DEFAULT_MODEL_DIR
    from mfprune.profiling import profile_model

    stats = profile_model(
        DEFAULT_MODEL_DIR, DEFAULT_DATA_DIR / "code.profile.jsonl", seq_len=512, batch_size=16
    )
    with tempfile.TemporaryDirectory() as tmp:
        return [cli_costs(stats, "code", keep, Path(tmp)) for keep in (0.5, 0.25)]


# --------------------------------------------------------------------------------- report


def machine() -> str:
    cpu = cpu_model()
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}); "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )


def summarise(result: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
    """Per (budget, keep, criterion): own[task] (own profile), others[task] (mean ratio of the
    other domains under the task's profile), wrong[task] (the task's ratio under another
    domain's profile, mean of the three)."""
    domains = list(result["base_loss"])
    out: dict[tuple, dict[str, Any]] = {}
    groups: dict[tuple, list[dict]] = {}
    for row in result["rows"]:
        groups.setdefault((row["budget"], row["keep"], row["criterion"]), []).append(row)
    for key, rows in groups.items():
        own, others, wrong = {}, {}, {}
        for task in domains:
            mine = [r for r in rows if r["task"] == task]
            if key[2] == "random" or " + " in key[2]:
                own_rows = mine
            else:
                own_rows = [r for r in mine if r["profile"] == task]
                foreign = [r["ratios"][task] for r in mine if r["profile"] != task]
                wrong[task] = statistics.fmean(foreign) if foreign else None
            own[task] = statistics.fmean(r["ratios"][task] for r in own_rows)
            others[task] = statistics.fmean(
                r["ratios"][d] for r in own_rows for d in domains if d != task
            )
        out[key] = {"own": own, "others": others, "wrong": wrong}
    return out


def _cells(values: dict[str, float | None], domains: list[str]) -> str:
    nums = [values.get(d) for d in domains]
    cells = [f"{v:.3f}" if v is not None else "—" for v in nums]
    present = [v for v in nums if v is not None]
    worst = f"{max(present):.3f}" if present else "—"
    return " | ".join(cells) + f" | {worst} |"


def _label(budget: str, keep: float) -> str:
    return f"{keep:.0%}" + (", global budget" if budget == "global" else "")


def report(result: dict[str, Any]) -> str:
    domains = list(result["base_loss"])
    summary = summarise(result)
    order = sorted(
        summary,
        key=lambda k: (-k[1], k[0] == "global", _crit_order(k[2])),
    )
    head = "| keep | criterion | " + " | ".join(domains) + " | worst |"
    rule = "|---|---|" + "---:|" * (len(domains) + 1)
    lines = [
        f"Machine: {result['machine']}. Weights `model.safetensors` sha256 "
        f"{result['model_sha256_head']}…; {result['evaluations']} evaluations of the four eval "
        f"sets in {result['eval_seconds']:.0f} s, {result['seconds']:.0f} s in all.",
        "",
        "Unpruned held-out loss (nats per token; eval texts / tokens; profile texts / tokens): "
        + "; ".join(
            f"{d} {result['base_loss'][d]:.4f} ({result['eval_texts'][d]} / "
            f"{result['eval_tokens'][d]:,}; {result['profile_texts'][d]} / "
            f"{result['profile_tokens'][d]:,})"
            for d in domains
        )
        + ".",
        "",
        "**The task's own loss** after pruning ÷ unpruned (the plan made from the task's own "
        "profile; random: mean of "
        f"{result['settings']['seeds']} seeds). Goals: 50% ≤ 1.05 (uniform), ≤ 1.03 (global); "
        "25% ≤ 1.20.",
        "",
        head,
        rule,
    ]
    for key in order:
        lines.append(
            f"| {_label(key[0], key[1])} | {key[2]} | " + _cells(summary[key]["own"], domains)
        )
    lines += [
        "",
        "**Wrong data control**: the task's loss ratio when the plan comes from another domain's "
        "profile (mean over the three others), same criterion and budget.",
        "",
        head,
        rule,
    ]
    for key in order:
        if summary[key]["wrong"]:
            lines.append(
                f"| {_label(key[0], key[1])} | {key[2]} | " + _cells(summary[key]["wrong"], domains)
            )
    lines += [
        "",
        "**The other domains**: with the task's own profile, the mean loss ratio of the three "
        "other domains (column: the task).",
        "",
        head,
        rule,
    ]
    for key in order:
        lines.append(
            f"| {_label(key[0], key[1])} | {key[2]} | " + _cells(summary[key]["others"], domains)
        )
    for budget, keep, criterion in (("uniform", 0.5, "soft"), ("uniform", 0.25, "soft")):
        lines += [
            "",
            f"**Every profile × every domain**, {_label(budget, keep)}, {criterion}: loss ratio "
            "(row: the profile the plan came from; column: the domain measured).",
            "",
            "| profile | " + " | ".join(domains) + " |",
            "|---|" + "---:|" * len(domains),
        ]
        for source in domains:
            row = next(
                r
                for r in result["rows"]
                if (r["budget"], r["keep"], r["criterion"], r["profile"])
                == (budget, keep, criterion, source)
            )
            cells = [
                f"**{row['ratios'][d]:.3f}**" if d == source else f"{row['ratios'][d]:.3f}"
                for d in domains
            ]
            lines.append(f"| {source} | " + " | ".join(cells) + " |")
    lines += repair_text(result, summary, domains)
    lines += ["", goals_text(summary, domains)]
    return "\n".join(lines)


def repair_text(result: dict[str, Any], summary: dict[tuple, Any], domains: list[str]) -> list:
    """Drop vs refit vs merge vs random side by side, and what the refit costs."""
    lines = [
        "",
        "**Repair side by side** (uniform budget, the task's own profile; the task's loss "
        "ratio): dropping (soft), dropping + `--repair refit`, merging, random experts.",
        "",
        "| keep | method | " + " | ".join(domains) + " | worst |",
        "|---|---|" + "---:|" * (len(domains) + 1),
    ]
    names = {
        "random": "random (mean of seeds)",
        "soft": "drop (soft)",
        "soft + merge": "merge (soft)",
        CLOSED_FORM: "drop + refit, closed form only (soft; `--refit-steps 0`)",
        "soft + refit": "drop + refit (soft; the default, closed form + 300 steps)",
    }
    for keep in (0.5, 0.25):
        for criterion, label in names.items():
            key = ("uniform", keep, criterion)
            if key in summary:
                lines.append(f"| {keep:.0%} | {label} | " + _cells(summary[key]["own"], domains))
    costs = result.get("refit_costs") or []
    if costs:
        lines += [
            "",
            "Wall time of the refit (`mfprune.repair.refit.refit_model`, in the benchmark's "
            "process) on each task's profile tokens, closed form only and with the default "
            "refinement:",
            "",
            "| keep | refit | " + " | ".join(domains) + " |",
            "|---|---|" + "---:|" * len(domains),
        ]
        for keep in sorted({c["keep"] for c in costs}, reverse=True):
            for steps in sorted({c.get("steps", 0) for c in costs}):
                by_task = {
                    c["task"]: c for c in costs if c["keep"] == keep and c.get("steps", 0) == steps
                }
                cells = [
                    f"{by_task[d]['seconds']:.1f} s ({by_task[d]['tokens']:,} tokens)"
                    if d in by_task
                    else "—"
                    for d in domains
                ]
                what = "closed form" if steps == 0 else f"+ {steps} steps"
                lines.append(f"| {keep:.0%} | {what} | " + " | ".join(cells) + " |")
    processes = result.get("prune_processes") or []
    if processes:
        lines += [
            "",
            "What `--repair refit` adds to `mfprune prune default --profile code.stats "
            "--criterion soft --keep-ratio R` (each run a process of its own: wall time "
            "including Python start-up and imports, and the process's peak RSS):",
            "",
            "| keep | `--repair none` | `--repair refit --data code.profile.jsonl` | added |",
            "|---|---:|---:|---:|",
        ]
        for c in processes:
            a, b = c["none"], c["refit"]
            lines.append(
                f"| {c['keep']:.0%} | {a['seconds']:.1f} s, {a['max_rss'] / 2**20:.0f} MiB | "
                f"{b['seconds']:.1f} s, {b['max_rss'] / 2**20:.0f} MiB | "
                f"+{b['seconds'] - a['seconds']:.1f} s, "
                f"+{(b['max_rss'] - a['max_rss']) / 2**20:.0f} MiB |"
            )
    return lines


def _crit_order(name: str) -> int:
    names = [*CRITERIA, "soft + merge", CLOSED_FORM, "soft + refit"]
    return names.index(name) if name in names else len(names)


def goals_text(summary: dict[tuple, dict[str, Any]], domains: list[str]) -> str:
    lines = ["Goals (every domain as the task, its own profile):", ""]
    for (keep, kind), goal in GOALS.items():
        candidates = [
            (max(v["own"].values()), k[2])
            for k, v in summary.items()
            if k[0] == kind and k[1] == keep and k[2] != "random"
        ]
        if not candidates:
            continue
        worst, best_criterion = min(candidates)
        verdict = "met" if worst <= goal else "not met"
        lines.append(
            f"- {keep:.0%} kept, {kind} budget, goal ≤ {goal:.2f}: best criterion "
            f"{best_criterion}, worst domain {worst:.3f} — **{verdict}**"
        )
    return "\n".join(lines)


def write_docs(text: str, *, repair: bool = False) -> None:
    if repair:
        replace_section(DOCS, "<!-- bench:repair:begin -->", "<!-- bench:repair:end -->", text)
    else:
        replace_section(DOCS, BEGIN, END, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the random criterion")
    parser.add_argument("--eval-texts", type=int, default=None, help="eval texts per domain")
    parser.add_argument("--profile-texts", type=int, default=None, help="profile texts")
    parser.add_argument("--merge", action="store_true", help="also try merging (25%%, 50%%)")
    parser.add_argument("--refit", action="store_true", help="also try refitting (25%%, 50%%)")
    parser.add_argument(
        "--repair-only",
        action="store_true",
        help="only soft, random, and --merge/--refit, at 50%% and 25%% (its own docs section)",
    )
    parser.add_argument(
        "--time-processes",
        action="store_true",
        help="with --from-json: time the `mfprune prune` processes again",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    parser.add_argument("--from-json", type=Path, default=None, help="report saved results")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        if args.time_processes:  # time the prune processes again, keep the rest
            result["prune_processes"] = time_processes(args)
            if args.json:
                args.json.write_text(json.dumps(result, indent=1))
    else:
        result = run(args)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    text = report(result)
    print(text)
    if args.write_docs:
        write_docs(text, repair=result["settings"].get("repair_only", False))


if __name__ == "__main__":
    main()

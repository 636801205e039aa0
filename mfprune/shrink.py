"""run_shrink: the CI step. One typed TOML file drives profile → prune → bench → gate, and every
artifact lands in one output folder:

    OUT/stats.safetensors   the profile (also kept in the stats cache)
    OUT/plan.json           what each layer keeps, and how it was chosen
    OUT/model/              the pruned checkpoint
    OUT/bench.json          quality, speed and memory, pruned vs original, and the gate
    OUT/report.md           the same as tables, the plan per layer, an expert-usage heatmap
    OUT/shrink.json         the effective configuration and the outcome (what --format json prints)

Order of work, cheapest first: the config (every problem at once), the model and the budget
(a dry-run plan on placeholder scores, so an impossible budget fails before profiling), the
output folder, the bench inputs, the data (tokenized: its fingerprint keys the stats cache),
then the expensive stages. The folder is built beside OUT and renamed into place when complete;
a failed gate still leaves the complete folder (CI uploads it) — the caller turns the gate into
the exit code.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from mfprune.errors import MfpruneError
from mfprune.rewrite.card import CARD_FILE, add_quality

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Kernel = Literal["eager", "grouped_mm", "batched_mm", "mfprune_triton"]
BUDGET_KEYS = ("keep", "keep_ratio", "coverage", "global_budget", "keep_params")
STATS_FILE = "stats.safetensors"
PLAN_FILE = "plan.json"
MODEL_DIR = "model"
BENCH_FILE = "bench.json"
REPORT_FILE = "report.md"
SUMMARY_FILE = "shrink.json"


# ---------------------------------------------------------------------------- the config


@dataclass(frozen=True)
class ProfileConfig:
    data: Path  # calibration data: JSONL / text / folder (as `mfprune profile --data`)
    max_tokens: int | None = None
    batch_size: int = 8
    seq_len: int | None = None  # default: 2048, capped at the model's positions
    text_field: str | None = None
    dtype: Dtype = "auto"
    device: str = "auto"
    cache_dir: Path | None = None  # default: $MFPRUNE_CACHE or ~/.cache/mfprune/stats


@dataclass(frozen=True)
class PruneConfig:
    criterion: str = "reap"
    seed: int = 0  # of the random criterion
    keep: int | None = None
    keep_ratio: float | None = None
    coverage: float | None = None
    global_budget: float | None = None
    keep_params: float | None = None  # CartesianMoE: share of sub-expert parameters kept
    min_keep: int = 0
    heads_keep_ratio: float | None = None
    attention_keep_ratio: float | None = None
    verify: bool = False  # check the pruned logits equal the masked original's (small models)
    repair: str = "none"  # or "refit": kept experts refit on profile.data (mfprune.repair)
    refit_steps: int | None = None  # refit's refinement steps per layer (None: 300; 0: none)


@dataclass(frozen=True)
class BenchConfig:
    tasks: list[str] = field(default_factory=list)
    include_path: list[Path] = field(default_factory=list)
    data: list[Path] = field(default_factory=list)
    limit: float | None = None
    batch_size: int = 8
    num_fewshot: int | None = None
    device: str = "auto"
    dtype: Dtype = "auto"
    kernel: Kernel | None = None
    speed: bool = True
    prompt_len: int = 256
    new_tokens: int = 64
    speed_batch: int = 1
    repeats: int = 5


@dataclass(frozen=True)
class GateConfig:
    max_drop: str | float | None = None  # every metric: 0.02 or "2%"
    metrics: dict[str, str | float] = field(default_factory=dict)  # per metric (glob) overrides


@dataclass(frozen=True)
class ShrinkConfig:
    model: Path
    out: Path
    profile: ProfileConfig
    overwrite: bool = False
    prune: PruneConfig = field(default_factory=PruneConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def gate_rules(self) -> list[str]:
        rules = [] if self.gate.max_drop is None else [str(self.gate.max_drop)]
        return rules + [f"{k}={v}" for k, v in self.gate.metrics.items()]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ShrinkConfig:
    """Read ``path`` (relative paths in it are relative to its folder), apply ``overrides``
    (dotted keys such as ``prune.keep_ratio``; they win over the file: a budget override
    replaces the file's budget) and check everything; raise ConfigError listing every problem."""
    from mfprune.config import build, read_toml

    path = Path(path)
    raw = read_toml(path)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        *tables, name = key.split(".")
        table = raw
        for t in tables:
            table = table.setdefault(t, {}) if isinstance(table.get(t, {}), dict) else {}
        if name in BUDGET_KEYS:
            for other in BUDGET_KEYS:
                table.pop(other, None)
        table[name] = value
    if isinstance(raw.get("model"), str):  # "default": the embedded default model
        from mfprune.checkpoint import model_location

        raw["model"] = str(model_location(raw["model"]))
    base = path.resolve().parent
    return build(ShrinkConfig, raw, base_dir=base, source=str(path), check=_check)


def _check(config: ShrinkConfig) -> list[str]:
    """What the types cannot say: one budget, ranges, names, files that must exist. Values
    that already failed their type check are ``INVALID`` and skipped (reported once)."""
    from mfprune.bench import DropLimit
    from mfprune.config import valid
    from mfprune.errors import did_you_mean
    from mfprune.repair import METHODS
    from mfprune.scoring import CRITERIA

    problems: list[str] = []

    def given(section: Any, name: str) -> Any:
        """The value, or None when the section or the value is missing or invalid."""
        if not valid(section):
            return None
        value = getattr(section, name)
        return value if valid(value) else None

    p, b, g, prof = config.prune, config.bench, config.gate, config.profile
    if valid(p):
        budgets = [k for k in BUDGET_KEYS if getattr(p, k) is not None]
        if len(budgets) != 1:
            listed = ", ".join(f"prune.{k}" for k in budgets) or "none"
            problems.append(
                "give exactly one budget of prune.keep, prune.keep_ratio, prune.coverage, "
                f"prune.global_budget, prune.keep_params (given: {listed})"
            )
    for name in (*BUDGET_KEYS[1:], "heads_keep_ratio", "attention_keep_ratio"):
        value = given(p, name)
        if value is not None and not 0 < value <= 1:
            problems.append(f"'prune.{name}' must be in (0, 1], got {value}")
    counts = [(p, "prune", "keep")]
    counts += [(prof, "profile", n) for n in ("max_tokens", "batch_size", "seq_len")]
    counts += [
        (b, "bench", n)
        for n in ("batch_size", "prompt_len", "new_tokens", "speed_batch", "repeats")
    ]
    for section, table, name in counts:
        value = given(section, name)
        if value is not None and value < 1:
            problems.append(f"'{table}.{name}' must be at least 1, got {value}")
    min_keep = given(p, "min_keep")
    if min_keep is not None and min_keep < 0:
        problems.append(f"'prune.min_keep' must be 0 or more, got {min_keep}")
    limit = given(b, "limit")
    if limit is not None and not limit > 0:
        problems.append(f"'bench.limit' must be positive, got {limit}")
    repair = given(p, "repair")
    if repair is not None and repair not in METHODS:
        problems.append(
            f"unknown repair method '{repair}' in 'prune.repair'"
            f"{did_you_mean(repair, METHODS)} (available: {', '.join(METHODS)})"
        )
    if repair not in (None, "none") and given(p, "verify"):
        problems.append("'prune.verify' checks exact rewrites: not with 'prune.repair'")
    steps = given(p, "refit_steps")
    if steps is not None and steps < 0:
        problems.append(f"'prune.refit_steps' must be 0 or more, got {steps}")
    if steps is not None and repair != "refit":
        problems.append("'prune.refit_steps' is only read with prune.repair = \"refit\"")
    criterion = given(p, "criterion")
    if criterion is not None and criterion not in CRITERIA:
        problems.append(
            f"unknown criterion '{criterion}' in 'prune.criterion'"
            f"{did_you_mean(criterion, CRITERIA)} (available: {', '.join(sorted(CRITERIA))})"
        )
    if valid(config.model) and not (config.model / "config.json").is_file():
        problems.append(f"'model': {config.model} is not a model folder (no config.json)")
    data = given(prof, "data")
    if data is not None and not data.exists():
        problems.append(f"'profile.data': {data} does not exist")
    for i, path in enumerate(given(b, "data") or ()):
        if valid(path) and not path.is_file():
            problems.append(f"'bench.data[{i}]': {path} is not a file")
    for i, path in enumerate(given(b, "include_path") or ()):
        if valid(path) and not path.is_dir():
            problems.append(f"'bench.include_path[{i}]': {path} is not a folder")
    rules = [("gate.max_drop", given(g, "max_drop"))]
    rules += [(f"gate.metrics.{k}", v) for k, v in (given(g, "metrics") or {}).items()]
    for where, rule in rules:
        if rule is None or not valid(rule):
            continue
        try:
            DropLimit.parse(str(rule))
        except MfpruneError:
            problems.append(
                f"'{where}' must be an absolute drop like 0.02 or a share like \"2%\", got {rule!r}"
            )
    if any(r for _, r in rules) and not (given(b, "tasks") or given(b, "data")):
        problems.append("the gate needs quality numbers: set bench.tasks and/or bench.data")
    return problems


# ---------------------------------------------------------------------------- the run


@dataclass
class ShrinkOutcome:
    config: ShrinkConfig
    out: Path
    stats_cached: bool  # True: the profile came from the cache (profiling was skipped)
    cache_path: Path
    plan: Any  # PrunePlan
    layers: list[Any]  # planner.LayerReport per MoE layer
    rewrite: Any  # RewriteResult
    bench: Any  # BenchReport
    seconds: dict[str, float]
    replaced: str | None = None  # the earlier mfprune output that overwrite replaced

    def to_dict(self) -> dict[str, Any]:
        from mfprune import __version__

        gate = self.bench.gate
        return {
            "format": "mfprune.shrink/1",
            "mfprune_version": __version__,
            "out": str(self.out),
            "artifacts": {
                "stats": str(self.out / STATS_FILE),
                "plan": str(self.out / PLAN_FILE),
                "model": str(self.out / MODEL_DIR),
                "bench": str(self.out / BENCH_FILE),
                "report": str(self.out / REPORT_FILE),
            },
            "stats_cached": self.stats_cached,
            "stats_cache": str(self.cache_path),
            "size": {
                "source_bytes": self.rewrite.source_bytes,
                "out_bytes": self.rewrite.out_bytes,
                "ratio": self.rewrite.out_bytes / max(self.rewrite.source_bytes, 1),
            },
            "gate": None if gate is None else {"passed": gate.passed, "summary": gate.summary()},
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "config": self.config.to_dict(),
        }


def default_cache_dir() -> Path:
    if os.environ.get("MFPRUNE_CACHE"):
        return Path(os.environ["MFPRUNE_CACHE"]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mfprune" / "stats"


def run_shrink(
    config: ShrinkConfig,
    *,
    config_path: str | Path | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> ShrinkOutcome:
    """Profile (or reuse cached stats), prune, bench against the original, write the folder.

    ``config_path``: the file ``config`` was read from (the output may not touch it). The
    gate's verdict is in ``outcome.bench.gate``; raising on it is the caller's call.
    """
    from mfprune.arch import spec_for_config
    from mfprune.arch.layout import resolve_layout
    from mfprune.bench import QualitySpec, SpeedSpec, parse_gate, run_bench
    from mfprune.bench.quality import as_limit, set_offline
    from mfprune.bench.run import resolve_kernel
    from mfprune.checkpoint import open_checkpoint
    from mfprune.io.outputs import Input, claim_file, claim_folder, staged_folder
    from mfprune.profiling import profile_model
    from mfprune.profiling.data import MIN_TOKENS, load_token_data
    from mfprune.profiling.run import load_tokenizer, resolve_device, resolve_seq_len
    from mfprune.prune import Budget, prune_model

    set_offline()
    say = on_stage or (lambda _line: None)
    seconds: dict[str, float] = {}
    p, b = config.prune, config.bench
    ckpt = open_checkpoint(config.model)
    layout = resolve_layout(ckpt, spec_for_config(ckpt.config))
    budget = Budget(
        keep=p.keep,
        keep_ratio=p.keep_ratio,
        coverage=p.coverage,
        global_budget=p.global_budget,
        keep_params=p.keep_params,
        min_keep=p.min_keep,
        attention_keep_ratio=p.attention_keep_ratio,
        heads_keep_ratio=p.heads_keep_ratio,
    )
    _dry_run_budget(layout, budget)
    inputs = [Input(ckpt.root, "the source model"), Input(config.profile.data, "the data")]
    inputs += Input.of(config_path, "the config file")
    inputs += [Input(p, "a bench data file") for p in b.data]
    inputs += [Input(p, "a bench task folder") for p in b.include_path]
    target = claim_folder(config.out, inputs=inputs, overwrite=config.overwrite)
    out = target.path
    with target.held():  # released however the run ends
        resolve_kernel(b.kernel, resolve_device(b.device))
        gate = parse_gate(config.gate_rules())
        quality = QualitySpec(
            tasks=tuple(b.tasks),
            include_paths=tuple(b.include_path),
            data=tuple(b.data),
            limit=as_limit(b.limit),
            batch_size=b.batch_size,
            num_fewshot=b.num_fewshot,
        )
        _check_tasks_up_front(quality, gate)

        # ---- the stats: from the cache when this model has been profiled on this data
        start = time.perf_counter()
        tokens = load_token_data(
            config.profile.data,
            load_tokenizer(ckpt.root),
            seq_len=resolve_seq_len(ckpt.config, config.profile.seq_len),
            max_tokens=config.profile.max_tokens,
            text_field=config.profile.text_field,
            min_tokens=MIN_TOKENS,
        )
        model_fp = ckpt.fingerprint()
        cache_dir = config.profile.cache_dir or default_cache_dir()
        cache_path = cache_dir / f"{model_fp[:24]}-{tokens.fingerprint[:24]}.safetensors"
        stats = _cached_stats(cache_path, model_fp, tokens.fingerprint)
        cached = stats is not None
        cache_target = None
        if not cached:  # the cache may not lie in the model, the data, the config or OUT
            cache_target = claim_file(
                cache_path,
                inputs=[*inputs, Input(out, "the output folder")],
                flag="profile.cache_dir",
                example="stats.safetensors",
            )
        if cached:
            say(f"profile: skipped — reusing cached stats {cache_path} (same model, same data)")
        else:
            say(f"profile: {tokens.tokens:,} tokens of {config.profile.data}")
            stats = profile_model(
                ckpt.root,
                config.profile.data,
                max_tokens=config.profile.max_tokens,
                batch_size=config.profile.batch_size,
                seq_len=config.profile.seq_len,
                dtype=config.profile.dtype,
                device=config.profile.device,
                text_field=config.profile.text_field,
            )
            stats.save(cache_target)
        seconds["profile"] = time.perf_counter() - start

        with staged_folder(target) as tmp:
            shutil.copyfile(cache_path, tmp / STATS_FILE)
            say(f"prune: {p.criterion}, {_budget_text(budget)}")
            start = time.perf_counter()
            outcome = prune_model(
                ckpt.root,
                tmp / MODEL_DIR,
                profile=tmp / STATS_FILE,
                criterion=p.criterion,
                criterion_options={"seed": p.seed} if p.criterion == "random" else {},
                budget=budget,
                verify=p.verify,
                repair=p.repair,
                data=config.profile.data if p.repair != "none" else None,
                max_tokens=config.profile.max_tokens,
                refit_steps=p.refit_steps,
            )
            outcome.plan.save(tmp / PLAN_FILE)
            seconds["prune"] = time.perf_counter() - start
            start = time.perf_counter()
            report = run_bench(
                tmp / MODEL_DIR,
                baseline=ckpt.root,
                quality=quality,
                speed=SpeedSpec(
                    prompt_len=b.prompt_len,
                    new_tokens=b.new_tokens,
                    batch_size=b.speed_batch,
                    repeats=b.repeats,
                )
                if b.speed
                else None,
                device=b.device,
                dtype=b.dtype,
                kernel=b.kernel,
                gate=gate,
                on_stage=lambda line: say(f"bench: {line}"),
            )
            seconds["bench"] = time.perf_counter() - start
            record_quality(tmp / MODEL_DIR / CARD_FILE, report)
            report.model.path = str(out / MODEL_DIR)  # not the temp folder it was benched in
            result = ShrinkOutcome(
                config=config,
                out=out,
                stats_cached=cached,
                cache_path=cache_path,
                plan=outcome.plan,
                layers=outcome.layers,
                rewrite=replace(outcome.rewrite, out=out / MODEL_DIR),
                bench=report,
                seconds=seconds,
                replaced=target.replaced,
            )
            (tmp / BENCH_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", "utf-8")
            (tmp / REPORT_FILE).write_text(render_report(result, stats), encoding="utf-8")
            (tmp / SUMMARY_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n", "utf-8")
        return result


def _cached_stats(path: Path, model_fp: str, data_fp: str) -> Any:
    """The cached stats at ``path`` if they are of this model and data, else None (a corrupted
    or foreign cache entry is profiled again and overwritten)."""
    from mfprune.errors import StatsError
    from mfprune.profiling import ProfileStats

    if not path.is_file():
        return None
    try:
        stats = ProfileStats.load(path)
    except StatsError:
        return None
    meta = stats.meta
    if meta.model_fingerprint != model_fp or meta.data_fingerprint != data_fp:
        return None
    return stats


def _check_tasks_up_front(quality: Any, gate: Any) -> None:
    """Unknown task names, bad bench data and gate metrics that no task reports fail here,
    before the profile and the prune, not after them."""
    import tempfile

    from mfprune.bench.quality import expected_metric_keys, prepare_tasks
    from mfprune.bench.report import check_gate_names

    if quality.empty:
        return
    with tempfile.TemporaryDirectory(prefix="mfprune-tasks-") as work:
        keys = expected_metric_keys(prepare_tasks(quality, Path(work)))
    if gate and keys is not None:
        check_gate_names(gate, keys, where="gate")


def _dry_run_budget(layout: Any, budget: Any) -> None:
    """Plan on placeholder scores: an infeasible budget (below top-k, group sizes, heads per KV
    group, ...) fails here, before the data is profiled."""
    import torch

    from mfprune.planner import make_plan

    def placeholder(rows: int, cols: int) -> torch.Tensor:
        return torch.arange(rows * cols, dtype=torch.float64).reshape(rows, cols) + 1

    e, a, h = layout.experts, layout.attention_experts, layout.heads
    make_plan(
        layout,
        expert_scores=placeholder(len(e.layers), e.num_experts),
        keep=budget.keep,
        keep_ratio=budget.keep_ratio,
        coverage=budget.coverage,
        global_budget=budget.global_budget,
        keep_params=budget.keep_params,
        min_keep=budget.min_keep,
        attention_scores=placeholder(len(a.layers), a.num_experts)
        if a is not None and budget.attention_keep_ratio
        else None,
        attention_keep_ratio=budget.attention_keep_ratio,
        head_scores=placeholder(layout.num_layers, h.num_heads)
        if h is not None and budget.heads_keep_ratio
        else None,
        heads_keep_ratio=budget.heads_keep_ratio,
    )


def _budget_text(budget: Any) -> str:
    return ", ".join(f"{k} {v}" for k, v in budget.__dict__.items() if v not in (None, 0))


def record_quality(card: Path, report: Any) -> None:
    """The bench's quality rows into the pruned model's card (mfprune.rewrite.card)."""
    rows = [
        (r.name, f"{r.model:.4g}", "—" if r.baseline is None else f"{r.baseline:.4g}",
         "—" if r.ratio is None else f"×{r.ratio:.3f}")
        for r in report.rows()
        if r.kind == "quality" and r.model is not None
    ]  # fmt: skip
    settings = report.settings
    on = ", ".join([*settings.get("tasks", []), *(Path(d).name for d in settings.get("data", []))])
    caption = f"lm-eval on {on or 'the configured tasks'}" + (
        f", {settings['limit']} documents per task" if settings.get("limit") else ""
    )
    if report.gate is not None:
        caption += f"; {report.gate.summary()}"
    add_quality(card, rows, caption + " (`mfprune shrink`, bench.json beside this folder).")


# ---------------------------------------------------------------------------- report.md

_SHADES = " ▁▂▃▄▅▆▇█"


def render_report(result: ShrinkOutcome, stats: Any) -> str:
    """report.md: the verdict, the bench table, the plan per layer and a usage heatmap."""
    c = result.config
    rw = result.rewrite
    gate = result.bench.gate
    lines = [
        f"# mfprune shrink: {c.model.name}",
        "",
        f"- model: `{c.model}`",
        f"- pruned: `{result.out / MODEL_DIR}` — {_mb(rw.out_bytes)} of {_mb(rw.source_bytes)} "
        f"({rw.out_bytes / max(rw.source_bytes, 1):.1%})",
        f"- criterion: {c.prune.criterion}; budget: "
        + ", ".join(f"{k} {v}" for k, v in asdict(c.prune).items() if k in BUDGET_KEYS and v),
        f"- calibration: {stats.meta.tokens:,} tokens from `{c.profile.data}`"
        + (" (cached stats: profiling skipped)" if result.stats_cached else ""),
        f"- repair: {c.prune.repair}"
        + (
            " (kept experts refit on the calibration data"
            + (", closed form only)" if c.prune.refit_steps == 0 else ")")
            if c.prune.repair == "refit"
            else " (exact rewrite)"
        ),
    ]
    if gate is not None:
        mark = "PASSED" if gate.passed else "FAILED"
        lines.append(f"- gate: **{mark}** — {gate.summary()}")
    lines += ["", "## Pruned vs original", "", result.bench.markdown()]
    if result.layers:
        lines += [
            "## Plan",
            "",
            "| layer | kept | dropped | routed mass kept |",
            "|---:|---|---|---:|",
        ]
        for layer in result.layers:
            lines.append(
                f"| {layer.layer} | {_ids(layer.kept)} | {_ids(layer.dropped)} | "
                f"{layer.mass_kept:.1%} |"
            )
        lines += ["", "## Expert usage", "", _heatmap(result, stats), ""]
    return "\n".join(lines)


def _heatmap(result: ShrinkOutcome, stats: Any) -> str:
    """One row per MoE layer, one cell per expert: its share of the layer's routing weight
    (soft frequency), ' ' none … '█' the layer's busiest; '^' under each kept expert."""
    e = stats.experts
    kept = {layer.layer: set(layer.kept) for layer in result.layers}
    width = len(str(max(e.layers)))
    out = [
        "```",
        f"{'':>{width}}  soft-frequency share per expert (' ' none … '█' busiest); ^ = kept",
    ]
    for row, layer in enumerate(e.layers):
        soft = e.soft[row].double()
        top = float(soft.max()) or 1.0
        cells = "".join(_SHADES[round(float(v) / top * (len(_SHADES) - 1))] for v in soft)
        marks = "".join("^" if i in kept.get(layer, ()) else " " for i in range(len(soft)))
        out += [f"{layer:>{width}}  {cells}", f"{'':>{width}}  {marks.rstrip()}"]
    out.append("```")
    return "\n".join(out)


def _ids(ids: tuple[int, ...]) -> str:
    return " ".join(map(str, ids)) if len(ids) <= 32 else f"{len(ids)} experts"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"

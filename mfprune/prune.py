"""prune_model: the `mfprune prune` job — a plan (given, or made from a profile), then the
rewrite (or only the plan, with ``plan_only``), then optionally the exactness check.

With ``repair="refit"`` (``mfprune.repair``) the kept experts' down projections are refit on
``data`` first, and the rewrite streams the repaired tensors in their place; everything else
is the exact rewrite."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mfprune.arch import ArchSpec, spec_for_config
from mfprune.arch.layout import ModelLayout, resolve_layout
from mfprune.checkpoint import open_checkpoint
from mfprune.errors import MfpruneError, PlanError, StatsError
from mfprune.io.outputs import Input, OutputTarget, claim_file, claim_folder, write_file
from mfprune.plan import PrunePlan
from mfprune.repair import RepairResult, check_method, repaired_tensors
from mfprune.rewrite import RewriteResult, rewrite_checkpoint
from mfprune.rewrite.mtp import check_drop

if TYPE_CHECKING:  # the planner needs torch: a prune with a given plan never imports it
    from mfprune.planner import LayerReport


@dataclass(frozen=True)
class Budget:
    """How much to keep (exactly one of keep / keep_ratio / coverage / global_budget /
    keep_params)."""

    keep: int | None = None
    keep_ratio: float | None = None
    coverage: float | None = None
    global_budget: float | None = None
    keep_params: float | None = None  # CartesianMoE: a share of the sub-experts' parameters
    min_keep: int = 0
    attention_keep_ratio: float | None = None
    heads_keep_ratio: float | None = None

    def given(self) -> list[str]:
        """The options set, as flags (``--keep-ratio``), for messages."""
        return [
            "--" + k.replace("_", "-")
            for k, v in self.__dict__.items()
            if v is not None and not (k == "min_keep" and v == 0)
        ]

    def check(self, layout: ModelLayout) -> None:
        """Refuse values no budget can use, before any work: ratios outside (0, 1], and
        attention-expert or head ratios on a model that has none."""
        problems = []
        names = ("keep_ratio", "coverage", "global_budget", "keep_params", "attention_keep_ratio")
        for name in names:
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                problems.append(f"--{name.replace('_', '-')} must be in (0, 1], got {value}")
        if self.heads_keep_ratio is not None and not 0 < self.heads_keep_ratio <= 1:
            problems.append(
                f"--heads-keep-ratio must be in (0, 1], got {self.heads_keep_ratio} "
                "(leave it out to keep every head)"
            )
        if self.keep is not None and self.keep < 1:
            problems.append(f"--keep must be at least 1, got {self.keep}")
        if self.min_keep < 0:
            problems.append(f"--min-keep must be 0 or more, got {self.min_keep}")
        if self.attention_keep_ratio is not None and layout.attention_experts is None:
            problems.append(
                f"--attention-keep-ratio: {layout.family} has no attention experts "
                "(only JetMoE-style models do)"
            )
        if problems:
            raise PlanError(problems, hint="see `mfprune prune --help`")


@dataclass(frozen=True)
class PruneOutcome:
    plan: PrunePlan
    out: Path
    layers: list[LayerReport] = field(default_factory=list)  # from a profile only
    rewrite: RewriteResult | None = None  # None with plan_only
    verify: Any = None  # mfprune.verify.VerifyResult when asked
    repair: RepairResult | None = None  # with a repair method other than "none"


def prune_model(
    model: str | Path,
    out: str | Path | None,
    *,
    plan: str | Path | PrunePlan | None = None,
    profile: str | Path | None = None,
    criterion: str | None = None,
    criterion_options: dict[str, Any] | None = None,
    budget: Budget = Budget(),
    spec: ArchSpec | None = None,
    plan_only: bool = False,
    plan_out: str | Path | None = None,
    allow_uneven: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    verify: bool = False,
    drop_mtp: bool = False,
    repair: str = "none",
    data: str | Path | None = None,
    max_tokens: int | None = None,
    refit_steps: int | None = None,
    sequential: bool = False,
    on_repair_start: Callable[[int], None] | None = None,
    on_repair_batch: Callable[[int], None] | None = None,
) -> PruneOutcome:
    """Plan (from ``plan``, or ranked from ``profile`` with ``criterion``, default reap, under
    ``budget``) and rewrite ``model`` into ``out``; with ``plan_only``, write only the plan, to
    the file ``plan_out`` (``out`` is then not used: no folder is created, replaced or deleted).
    Every input and option is checked, and the output claimed, before the profile is read or a
    byte is written.

    ``repair``/``data``/``max_tokens``: the repair method and its calibration data (at most
    ``max_tokens`` tokens of it); ``refit_steps``: the refinement's steps per layer after the
    closed form (``mfprune.repair``: default 300, 0 for the closed form only);
    ``sequential``: one decoder layer in memory at a time; ``on_repair_start`` gets the token
    passes the repair will make, ``on_repair_batch`` each batch's tokens (progress)."""
    check_method(repair, data)
    if refit_steps is not None and repair != "refit":
        raise PlanError(
            "--refit-steps is only read by --repair refit", hint="add --repair refit --data TASK"
        )
    if refit_steps is not None and refit_steps < 0:
        raise PlanError(
            f"--refit-steps must be 0 or more, not {refit_steps}",
            hint="0 keeps the closed-form refit only; the default is 300",
        )
    if sequential and repair == "none":
        raise PlanError(
            "--sequential is for --repair refit: a plain prune streams tensors and never loads "
            "the model",
            hint="drop --sequential, or add --repair refit --data TASK",
        )
    if repair != "none" and (plan_only or verify):
        raise PlanError(
            f"--repair {repair} changes weights: "
            + ("--plan-only writes no weights" if plan_only else "--verify checks exact rewrites"),
            hint="drop " + ("--plan-only" if plan_only else "--verify") + " or --repair",
        )
    _check_outputs(out, plan_only=plan_only, plan_out=plan_out, overwrite=overwrite)
    if (plan is None) == (profile is None):
        raise PlanError(
            "give either --plan PLAN or --profile STATS",
            hint="make a profile with `mfprune profile MODEL --data DATA --out STATS`",
        )
    if plan is not None:
        ignored = budget.given() + (["--criterion"] if criterion is not None else [])
        if ignored:
            raise PlanError(
                f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored with "
                "--plan (the plan already says what each layer keeps)",
                hint="drop them, or rank a profile instead: --profile STATS",
            )
    ckpt = open_checkpoint(model)
    spec = spec or spec_for_config(ckpt.config)
    layout = resolve_layout(ckpt, spec)
    budget.check(layout)
    if drop_mtp:
        check_drop(PrunePlan(), layout)  # a model without MTP layers: refused up front
    inputs = [Input(ckpt.root, "the source model")]
    inputs += Input.of(profile, "the stats file")
    if not isinstance(plan, PrunePlan):
        inputs += Input.of(plan, "the plan file")
    inputs += Input.of(data, "the repair data")
    if plan_only:
        target = claim_file(
            plan_out, inputs=inputs, flag="--plan-out", example="plan.json",
            replaceable=_is_plan_file, kind_name="an mfprune plan",
        )  # fmt: skip
    else:
        target = claim_folder(out, inputs=inputs, overwrite=overwrite)
    repair_options = {
        "method": repair,
        "data": data,
        "max_tokens": max_tokens,
        "sequential": sequential,
        **({} if refit_steps is None else {"steps": refit_steps}),
        "on_start": on_repair_start,
        "on_batch": on_repair_batch,
    }
    with target.held():
        return _prune(
            ckpt, spec, layout, target, plan=plan, profile=profile,
            criterion=criterion or "reap", criterion_options=criterion_options, budget=budget,
            plan_only=plan_only, allow_uneven=allow_uneven, max_shard_bytes=max_shard_bytes,
            verify=verify, drop_mtp=drop_mtp, repair=repair_options,
        )  # fmt: skip


def _check_outputs(
    out: str | Path | None, *, plan_only: bool, plan_out: str | Path | None, overwrite: bool
) -> None:
    """--plan-only writes one file, --plan-out; a model is written to --out: never both."""
    if plan_only:
        if out is not None or overwrite:
            used = "--out" if out is not None else "--overwrite"
            raise PlanError(
                f"--plan-only writes no model: {used} is not used with it",
                hint="drop it; the plan goes to --plan-out, the model comes with "
                "`mfprune prune MODEL --plan PLAN.json --out DIR`",
            )
        if plan_out is None:
            raise PlanError(
                "--plan-only needs --plan-out PLAN.json: the file to write the plan to",
                hint="then prune with it: `mfprune prune MODEL --plan PLAN.json --out DIR`",
            )
        return
    if plan_out is not None:
        raise PlanError(
            "--plan-out goes with --plan-only (a pruned model holds its plan: "
            "OUT/mfprune_plan.json)",
            hint="add --plan-only to write only the plan",
        )
    if out is None:
        raise PlanError(
            "missing option '--out' / '-o'",
            hint="name the output folder; see `mfprune prune --help`",
        )


def _is_plan_file(path: Path) -> bool:
    """A file ``--plan-only`` may replace: a plan mfprune wrote."""
    try:
        PrunePlan.load(path)
    except MfpruneError:
        return False
    return True


def _prune(
    ckpt: Any,
    spec: ArchSpec,
    layout: ModelLayout,
    target: OutputTarget,
    *,
    plan: str | Path | PrunePlan | None,
    profile: str | Path | None,
    criterion: str,
    criterion_options: dict[str, Any] | None,
    budget: Budget,
    plan_only: bool,
    allow_uneven: bool,
    max_shard_bytes: int | None,
    verify: bool,
    drop_mtp: bool,
    repair: dict[str, Any],
) -> PruneOutcome:
    layers: list[LayerReport] = []
    if profile is not None:
        from mfprune.planner import plan_from_profile
        from mfprune.profiling import ProfileStats

        stats = ProfileStats.load(profile)
        if stats.meta.model_fingerprint != ckpt.fingerprint():
            raise StatsError(
                f"{profile} was profiled on another model (fingerprint "
                f"{stats.meta.model_fingerprint[:12]}…, this model {ckpt.fingerprint()[:12]}…)",
                hint="profile this model: `mfprune profile MODEL --data DATA --out STATS`",
            )
        if budget == Budget(min_keep=budget.min_keep):
            raise PlanError(
                "--profile needs a budget: --keep N, --keep-ratio R, --coverage C, "
                "--global-budget R or --keep-params R (and optionally --heads-keep-ratio / "
                "--attention-keep-ratio)",
                hint="e.g. --keep-ratio 0.5",
            )
        uneven_budget = budget.global_budget is not None or budget.keep_params is not None
        allow_uneven = allow_uneven or uneven_budget
        the_plan, layers = plan_from_profile(
            layout,
            stats,
            criterion=criterion,
            criterion_options=criterion_options,
            **budget.__dict__,
        )
    else:
        the_plan = plan if isinstance(plan, PrunePlan) else PrunePlan.load(plan)  # type: ignore[arg-type]
        _check_plan_model(the_plan, ckpt, plan)
    if plan_only:
        the_plan.validate(layout, allow_uneven=allow_uneven)
        if drop_mtp:
            check_drop(the_plan, layout)
        else:
            the_plan = the_plan.with_mtp(layout)
        the_plan = the_plan.with_dead_sub_experts(layout)
        write_file(target, the_plan.to_json() + "\n")
        return PruneOutcome(plan=the_plan, out=target.path, layers=layers)
    repairing: Any = contextlib.nullcontext(None)
    if repair["method"] != "none":
        the_plan.validate(layout, allow_uneven=allow_uneven)  # before the repair's work
        repairing = repaired_tensors(ckpt, layout, the_plan, **repair)
    with repairing as repaired:
        result = rewrite_checkpoint(
            ckpt.root,
            the_plan,
            target,
            spec=spec,
            max_shard_bytes=max_shard_bytes,
            allow_uneven=allow_uneven,
            drop_mtp=drop_mtp,
            replacements=repaired.tensors if repaired else None,
            provenance={"repair": repaired.to_dict()} if repaired else None,
        )
    the_plan = the_plan.with_dead_sub_experts(layout)
    check = None
    if verify:
        from mfprune.verify import verify_rewrite

        check = verify_rewrite(ckpt.root, result.out, spec=spec)
        if not check.exact:
            raise MfpruneError(
                f"the pruned model's logits differ from the masked original by "
                f"{check.max_abs_diff:.3g}",
                hint="this is a bug in mfprune or in the adapter: please report it",
            )
    return PruneOutcome(
        plan=the_plan, out=result.out, layers=layers, rewrite=result, verify=check, repair=repaired
    )


def _check_plan_model(plan: PrunePlan, ckpt: Any, where: Any) -> None:
    """A plan ranked from another model's profile names that model: refuse it."""
    stats = plan.meta.get("stats") if isinstance(plan.meta, dict) else None
    named = stats.get("model_fingerprint") if isinstance(stats, dict) else None
    if isinstance(named, str) and named != ckpt.fingerprint():
        raise PlanError(
            f"the plan {where if not isinstance(where, PrunePlan) else ''} was made from a "
            f"profile of another model (fingerprint {named[:12]}…, this model "
            f"{ckpt.fingerprint()[:12]}…)",
            hint="make a plan for this model, or delete meta.stats from the plan to apply it "
            "anyway",
        )

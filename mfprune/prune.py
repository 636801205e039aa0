"""prune_model: the `mfprune prune` job — a plan (given, or made from a profile), then the
rewrite (or only the plan, with ``plan_only``), then optionally the exactness check."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mfprune.arch import ArchSpec, spec_for_config
from mfprune.arch.layout import resolve_layout
from mfprune.checkpoint import open_checkpoint
from mfprune.errors import MfpruneError, PlanError, StatsError
from mfprune.plan import PrunePlan
from mfprune.planner import LayerReport, plan_from_profile
from mfprune.rewrite import RewriteResult, rewrite_checkpoint
from mfprune.rewrite.output import check_output, staged_output

PLAN_ONLY_FILE = "plan.json"


@dataclass(frozen=True)
class Budget:
    """How much to keep (exactly one of keep / keep_ratio / coverage / global_budget)."""

    keep: int | None = None
    keep_ratio: float | None = None
    coverage: float | None = None
    global_budget: float | None = None
    min_keep: int = 0
    attention_keep_ratio: float | None = None
    heads_keep_ratio: float | None = None


@dataclass(frozen=True)
class PruneOutcome:
    plan: PrunePlan
    out: Path
    layers: list[LayerReport] = field(default_factory=list)  # from a profile only
    rewrite: RewriteResult | None = None  # None with plan_only
    verify: Any = None  # mfprune.verify.VerifyResult when asked


def prune_model(
    model: str | Path,
    out: str | Path,
    *,
    plan: str | Path | PrunePlan | None = None,
    profile: str | Path | None = None,
    criterion: str = "reap",
    criterion_options: dict[str, Any] | None = None,
    budget: Budget = Budget(),
    spec: ArchSpec | None = None,
    plan_only: bool = False,
    allow_uneven: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    verify: bool = False,
) -> PruneOutcome:
    if (plan is None) == (profile is None):
        raise PlanError(
            "give either --plan PLAN or --profile STATS",
            hint="make a profile with `mfprune profile MODEL --data DATA --out STATS`",
        )
    ckpt = open_checkpoint(model)
    spec = spec or spec_for_config(ckpt.config)
    layout = resolve_layout(ckpt, spec)
    layers: list[LayerReport] = []
    if profile is not None:
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
                "--profile needs a budget: --keep N, --keep-ratio R, --coverage C or "
                "--global-budget R (and optionally --heads-keep-ratio / --attention-keep-ratio)",
                hint="e.g. --keep-ratio 0.5",
            )
        allow_uneven = allow_uneven or budget.global_budget is not None
        the_plan, layers = plan_from_profile(
            layout,
            stats,
            criterion=criterion,
            criterion_options=criterion_options,
            **budget.__dict__,
        )
    else:
        the_plan = plan if isinstance(plan, PrunePlan) else PrunePlan.load(plan)  # type: ignore[arg-type]
    if plan_only:
        the_plan.validate(layout, allow_uneven=allow_uneven)
        out_dir = check_output(Path(out), source=ckpt.root, overwrite=overwrite)
        with staged_output(out_dir) as tmp:
            the_plan.save(tmp / PLAN_ONLY_FILE)
        return PruneOutcome(plan=the_plan, out=out_dir, layers=layers)
    result = rewrite_checkpoint(
        ckpt.root,
        the_plan,
        out,
        spec=spec,
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
        allow_uneven=allow_uneven,
    )
    check = None
    if verify:
        from mfprune.verify import verify_rewrite

        check = verify_rewrite(ckpt.root, result.out)
        if not check.exact:
            raise MfpruneError(
                f"the pruned model's logits differ from the masked original by "
                f"{check.max_abs_diff:.3g}",
                hint="this is a bug in mfprune or in the adapter: please report it",
            )
    return PruneOutcome(plan=the_plan, out=result.out, layers=layers, rewrite=result, verify=check)

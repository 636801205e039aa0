"""Criteria and budgets: scores from usage sums, and plans that honour every constraint."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mfprune.arch import spec_for_config
from mfprune.arch.layout import resolve_layout
from mfprune.checkpoint import open_checkpoint
from mfprune.errors import MfpruneError, PlanError
from mfprune.planner import make_plan, minimum_keep, plan_experts, plan_experts_global
from mfprune.scoring import CRITERIA, get_criterion


def layout_of(path):
    ckpt = open_checkpoint(path)
    return resolve_layout(ckpt, spec_for_config(ckpt.config))


def sums(count, soft, ean, reap_num):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return SimpleNamespace(count=t(count), soft=t(soft), ean=t(ean), reap_num=t(reap_num))


def test_builtin_criteria_follow_their_definitions():
    s = sums([[4, 0, 2]], [[2.0, 0.0, 1.5]], [[8.0, 0.0, 10.0]], [[3.0, 0.0, 6.0]])
    assert get_criterion("frequency")(s).tolist() == [[4, 0, 2]]
    assert get_criterion("soft")(s).tolist() == [[2.0, 0.0, 1.5]]
    assert get_criterion("ean")(s).tolist() == [[8.0, 0.0, 10.0]]
    assert get_criterion("reap")(s).tolist() == [[0.75, 0.0, 3.0]]  # never routed: 0
    a, b = get_criterion("random")(s, seed=1), get_criterion("random")(s, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, get_criterion("random")(s, seed=2))
    assert set(CRITERIA) >= {"frequency", "soft", "ean", "reap", "random"}


def test_wrong_criterion_name_or_option_suggests_the_right_one():
    with pytest.raises(MfpruneError, match="did you mean 'reap'"):
        get_criterion("rep")
    with pytest.raises(MfpruneError, match="did you mean 'seed'"):
        get_criterion("random")(sums([[1]], [[1]], [[1]], [[1]]), sed=3)


def test_keep_ratio_keeps_the_best_experts_in_every_layer(tiny_checkpoint):
    layout = layout_of(tiny_checkpoint("mixtral"))
    scores = torch.tensor([[8, 7, 6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.float64)
    plan = make_plan(layout, expert_scores=scores, keep_ratio=0.5)
    assert plan.experts == {0: (0, 1, 2, 3), 1: (4, 5, 6, 7)}


def test_group_limited_router_drops_equally_per_group(tiny_checkpoint):
    layout = layout_of(tiny_checkpoint("deepseek_v3")).experts  # 8 experts, 2 groups, top-2 sum
    assert minimum_keep(layout) == 4
    scores = torch.tensor([[9, 8, 7, 6, 0, 0, 1, 2]] * 2, dtype=torch.float64)
    kept = plan_experts(layout, scores, keep=4)
    assert kept == {1: (0, 1, 6, 7), 2: (0, 1, 6, 7)}  # not the four best overall
    with pytest.raises(PlanError, match="below the minimum of 4"):
        plan_experts(layout, scores, keep=2)
    with pytest.raises(PlanError, match="multiple of n_group = 2"):
        plan_experts(layout, scores, keep=5)


def test_coverage_picks_the_smallest_uniform_count(tiny_checkpoint):
    layout = layout_of(tiny_checkpoint("mixtral")).experts
    scores = torch.tensor(
        [[50, 30, 10, 5, 3, 1, 1, 0], [25, 25, 25, 25, 0, 0, 0, 0]], dtype=torch.float64
    )
    kept = plan_experts(layout, scores, coverage=0.9)  # layer 0 needs 3, layer 1 needs 4
    assert {len(v) for v in kept.values()} == {4}
    assert kept[1] == (0, 1, 2, 3)


def test_infeasible_budgets_fail_with_numbers(tiny_checkpoint):
    layout = layout_of(tiny_checkpoint("mixtral")).experts
    scores = torch.ones(2, 8)
    with pytest.raises(PlanError, match="keeping 1 of 8 experts is below the minimum of 2"):
        plan_experts(layout, scores, keep=1)
    with pytest.raises(PlanError, match="below the minimum of 6"):
        plan_experts(layout, scores, keep_ratio=0.5, min_keep=6)
    with pytest.raises(PlanError, match="exactly one budget"):
        plan_experts(layout, scores, keep=4, keep_ratio=0.5)
    with pytest.raises(PlanError, match="2 MoE layers x 8"):
        plan_experts(layout, torch.ones(3, 8), keep=4)


def test_heads_keep_kv_groups_equal(tiny_checkpoint):
    layout = layout_of(tiny_checkpoint("qwen3_moe"))  # 4 heads over 2 KV heads
    scores = torch.tensor([[1.0, 5.0, 3.0, 2.0], [9.0, 8.0, 7.0, 6.0]])
    plan = make_plan(layout, head_scores=scores, heads_keep_ratio=0.5)
    assert plan.heads == {0: (1, 2), 1: (0, 2)}
    mla = layout_of(tiny_checkpoint("deepseek_v3"))  # one query head per KV head
    scores = torch.tensor([[1.0, 5.0, 3.0, 2.0]] * 3)
    assert make_plan(mla, head_scores=scores, heads_keep_ratio=0.5).heads[0] == (1, 2)
    with pytest.raises(PlanError, match="OLMoE"):
        make_plan(layout_of(tiny_checkpoint("olmoe")), head_scores=scores, heads_keep_ratio=0.5)


def test_global_budget_spends_where_layer_shares_are_high(tiny_checkpoint):
    layout = layout_of(tiny_checkpoint("mixtral")).experts  # 2 layers x 8, top-2
    # layer 0: mass on two experts; layer 1: spread evenly -> layer 1 needs more experts
    scores = torch.tensor(
        [[100, 90, 1, 1, 1, 1, 1, 1], [10, 10, 10, 10, 10, 10, 10, 10]], dtype=torch.float64
    )
    kept = plan_experts_global(layout, scores, ratio=0.5)  # 8 of 16 in all
    assert sum(len(v) for v in kept.values()) == 8
    assert kept[0] == (0, 1) and len(kept[1]) == 6
    with pytest.raises(PlanError, match="below the 2 per layer x 2 layers"):
        plan_experts_global(layout, scores, ratio=0.1)


def test_global_budget_keeps_groups_equal(tiny_checkpoint):
    layout = layout_of(tiny_checkpoint("deepseek_v3")).experts  # 2 groups of 4, floor 4
    scores = torch.tensor(
        [[9, 9, 9, 9, 9, 9, 9, 9], [50, 1, 1, 1, 50, 1, 1, 1]], dtype=torch.float64
    )
    kept = plan_experts_global(layout, scores, ratio=0.75)  # 12 of 16
    assert len(kept[1]) == 8 and len(kept[2]) == 4
    for ids in kept.values():
        assert sum(i < 4 for i in ids) == sum(i >= 4 for i in ids)


def test_make_plan_with_global_budget_allows_uneven_counts(tiny_checkpoint):
    layout = layout_of(tiny_checkpoint("mixtral"))
    scores = torch.tensor([[100, 90, 1, 1, 1, 1, 1, 1], [10] * 8], dtype=torch.float64)
    plan = make_plan(layout, expert_scores=scores, global_budget=0.5)
    assert plan.is_uneven(layout)
    with pytest.raises(PlanError, match="one budget"):
        make_plan(layout, expert_scores=scores, global_budget=0.5, keep=4)

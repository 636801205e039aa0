"""CartesianMoE (seeds/002, mfprune.seedmodels.cartesian): routed experts are products of
sub-experts from two sets, so dropping experts frees a sub-expert only when no kept expert
uses it. Pruning is exact, kept sub-experts keep their bytes under their new numbers, the
plan says which sub-experts die, and a budget can be stated in parameters freed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from checks import assert_exact, removed
from safetensors import safe_open

from mfprune import PrunePlan, rewrite_checkpoint
from mfprune.arch import load_spec_file, parse_spec, spec_for_config
from mfprune.arch.layout import resolve_layout
from mfprune.checkpoint import open_checkpoint
from mfprune.cli import run
from mfprune.errors import ArchError, MfpruneError, ModelError, PlanError
from mfprune.inspect import inspect_model
from mfprune.modelcode import use_model_code
from mfprune.planner import plan_experts_by_params
from mfprune.seedmodels import MODEL_CODE, adapter_path, build_seed_checkpoint
from mfprune.tinymodels import TINY_CORPUS

FAMILY = "cartesian_moe"
# 2 x 4 sub-experts: expert e = (e // 4, e % 4). Layer 0 keeps the experts of set-0 sub-expert
# 1 only (sub-expert 0 of set 0 dies, 1 becomes 0); layer 1 keeps experts that still use every
# sub-expert of both sets (nothing dies).
KEPT = {0: [4, 5, 6, 7], 1: [0, 2, 5, 7]}
SUB = re.compile(r"^(model\.layers\.(\d+)\.moe\.experts\.sets\.(\d+)\.)(\d+)(\..*)$")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return build_seed_checkpoint(FAMILY, tmp_path_factory.mktemp("cartesian") / "model")


@pytest.fixture(scope="module")
def spec():
    return load_spec_file(adapter_path(FAMILY))


def _bytes(info) -> torch.Tensor:
    with safe_open(info.file, "pt") as f:
        return f.get_tensor(info.name).contiguous().view(torch.uint8)


def _origin(name: str, cfg: dict, kept: dict[int, list[int]]) -> str:
    """The source name of output tensor ``name``: a sub-expert renumbered back through the
    kept experts' original table (row-major grid), anything else the same name."""
    m = SUB.match(name)
    if not m or int(m.group(2)) not in kept:
        return name
    layer, s, new = int(m.group(2)), int(m.group(3)), int(m.group(4))
    n2 = cfg["num_sub_experts"][1]
    used = sorted({(e // n2, e % n2)[s] for e in kept[layer]})
    return f"{m.group(1)}{used[new]}{m.group(5)}"


def test_pruning_is_exact_and_frees_only_unused_sub_experts(source, spec, tmp_path):
    out = tmp_path / "pruned"
    result = rewrite_checkpoint(source, PrunePlan(experts=KEPT), out, spec=spec)
    with use_model_code(class_path=MODEL_CODE[FAMILY]):
        assert_exact(source, out, experts=removed(KEPT, 8), spec=spec)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_local_experts"] == 4
    assert cfg["sub_expert_counts"] == {"0": [1, 4], "1": [2, 4]}
    assert cfg["sub_expert_table"] == {
        "0": [[0, 0], [0, 1], [0, 2], [0, 3]],
        "1": [[0, 0], [0, 2], [1, 1], [1, 3]],
    }
    plan = PrunePlan.load(out / "mfprune_plan.json")
    assert plan.meta["dead_sub_experts"] == {"0": [[0], []], "1": [[], []]}
    # every output tensor is its source's bytes: kept sub-experts under their new numbers,
    # routers the kept rows
    src, dst = open_checkpoint(source), open_checkpoint(out)
    source_cfg = json.loads((source / "config.json").read_text())
    subs = 0
    for name, info in dst.tensors.items():
        origin = src.tensors[_origin(name, source_cfg, KEPT)]
        if name.endswith("moe.router.weight"):
            layer = int(name.split(".")[2])
            full = _bytes(origin).view(origin.shape[0], -1)
            assert torch.equal(_bytes(info).view(len(KEPT[layer]), -1), full[KEPT[layer]])
            continue
        assert (origin.dtype, origin.shape) == (info.dtype, info.shape), name
        assert torch.equal(_bytes(origin), _bytes(info)), f"{name} != {origin.name}"
        subs += bool(SUB.match(name))
    assert subs == (1 + 4 + 2 + 4) * 3  # sub-experts alive x 3 tensors each
    assert not any(n.startswith("model.layers.0.moe.experts.sets.0.1.") for n in dst.tensors)
    # what was freed: 4 router rows per layer and one sub-expert (3 tensors of 32 x 64)
    freed = 2 * 4 * 64 + 3 * 32 * 64
    assert result.source_bytes - result.out_bytes == pytest.approx(freed * 4, abs=4096)


def test_a_pruned_model_prunes_again_through_its_table(source, spec, tmp_path):
    once = tmp_path / "once"
    rewrite_checkpoint(source, PrunePlan(experts=KEPT), once, spec=spec)
    # layer 1 now has table [[0,0],[0,2],[1,1],[1,3]]: keeping new experts 0 and 1 (both of
    # set-0 sub-expert 0) frees set-0 sub-expert 1 and set-1 sub-experts 1 and 3
    again = {0: [0, 1], 1: [0, 1]}
    twice = tmp_path / "twice"
    rewrite_checkpoint(once, PrunePlan(experts=again), twice, spec=spec)
    with use_model_code(class_path=MODEL_CODE[FAMILY]):
        assert_exact(once, twice, experts=removed(again, 4), spec=spec)
    plan = PrunePlan.load(twice / "mfprune_plan.json")
    assert plan.meta["dead_sub_experts"] == {"0": [[], [2, 3]], "1": [[1], [1, 3]]}
    cfg = json.loads((twice / "config.json").read_text())
    assert cfg["sub_expert_table"] == {"0": [[0, 0], [0, 1]], "1": [[0, 0], [0, 1]]}


def test_inspect_counts_sub_experts_as_the_experts_weights(source, spec):
    cfg = json.loads((source / "config.json").read_text())
    report = inspect_model(source, spec=spec)
    d, i = cfg["hidden_size"], cfg["sub_expert_intermediate_size"]
    layers, sets = cfg["num_hidden_layers"], cfg["num_sub_experts"]
    assert report.params["routed_experts"] == layers * sum(sets) * 3 * d * i
    assert "set 0: down_proj.weight" in report.expert_tensors
    assert "product of one sub-expert from each of 2 sets (2 x 4" in report.experts.routing


def _scores(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_a_parameter_budget_frees_the_sub_experts_that_cost_least(source, spec):
    layout = resolve_layout(open_checkpoint(source), spec).experts
    # experts 4..7 (all of set-0 sub-expert 1) barely matter in layer 0; in layer 1 the
    # experts of set-1 sub-expert 3 (experts 3 and 7) matter least
    scores = _scores([5, 5, 5, 5, 0.1, 0.1, 0.1, 0.1], [4, 4, 4, 0.2, 4, 4, 4, 0.1])
    kept = plan_experts_by_params(layout, scores, ratio=5 / 6)  # free one sub-expert of 6
    assert kept == {0: (0, 1, 2, 3), 1: (0, 1, 2, 4, 5, 6)}
    for layer, ids in kept.items():
        sub = layout.sub_experts[layer]
        assert sub.held_params(ids) <= 5 / 6 * sub.held_params(range(8))
    # half the parameters: layer 0 can only go on by dropping set-1 sub-experts, one expert
    # each, down to 2 experts (top-2)
    assert len(plan_experts_by_params(layout, scores, ratio=0.5)[0]) == 2
    with pytest.raises(PlanError, match=r"fewer than 2 experts .* least it can keep here is 50%"):
        plan_experts_by_params(layout, scores, ratio=0.3)


def test_a_parameter_budget_is_refused_where_experts_share_nothing(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint("mixtral"))
    mixtral = resolve_layout(ckpt, spec_for_config(ckpt.config))
    with pytest.raises(PlanError, match="use --keep-ratio"):
        plan_experts_by_params(mixtral.experts, torch.ones(2, 8), ratio=0.5)


def test_refit_is_refused_for_shared_sub_experts(source, spec, tmp_path):
    from mfprune.repair import repaired_tensors

    data = tmp_path / "task.jsonl"
    data.write_text(json.dumps({"text": TINY_CORPUS[0]}) + "\n")
    ckpt = open_checkpoint(source)
    layout = resolve_layout(ckpt, spec)
    with (
        pytest.raises(MfpruneError, match="products of sub-experts"),
        repaired_tensors(ckpt, layout, PrunePlan(experts=KEPT), method="refit", data=data),
    ):
        pass


TABLES = {"0": [[0, 0]] * 8, "1": [[0, 0]] * 8}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"sub_expert_table": {**TABLES, "0": [[0, 0]] * 3}}, "table has 3 experts but its router"),
        ({"sub_expert_table": {"1": [[0, 0]] * 8}}, "no valid table for layer 0"),
        ({"num_sub_experts": [2, 3]}, "table has 6 experts but its router has 8 rows"),
        ({"num_sub_experts": [2]}, "is not 2 sub-expert counts"),
        (
            {"sub_expert_table": TABLES, "sub_expert_counts": {"0": [2, 5], "1": [2, 4]}},
            r"sub-expert tensor .*sets\.1\.4\.gate_proj\.weight is missing",
        ),
        (
            {"sub_expert_table": TABLES, "sub_expert_counts": {"0": [2, 3], "1": [2, 4]}},
            r"sets\.1\.3\..* exists but set 1 of layer 0 has 3",
        ),
        (
            {"sub_expert_table": {**TABLES, "0": [[0, 4]] * 8}},
            r"expert 0's sub-experts \[0, 4\] do not fit the set sizes \[2, 4\]",
        ),
    ],
)
def test_a_config_that_does_not_match_the_sub_experts_is_refused(
    edit, message, source, spec, tmp_path
):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(source, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(ModelError, match=message):
        resolve_layout(open_checkpoint(model), spec)


@pytest.mark.parametrize(
    ("sub_experts", "message"),
    [
        ({"sets": [["m.layers.{layer}.a.{expert}.w"]]}, "at least two sets"),
        (
            {"sets": [["m.layers.{layer}.a.{expert}.w", "m.layers.{layer}.b.{expert}.w"], []]},
            "share one prefix",
        ),
        ({"sets": [["m.layers.{layer}.a.w"], ["m.layers.{layer}.b.{expert}.w"]]}, "no {expert}"),
        ({"sets": [["m.layers.{layer}.a.{expert}.w"]] * 2}, "two sets share the prefix"),
    ],
)
def test_bad_sub_expert_tables_in_an_adapter_are_named(sub_experts, message):
    keys = {"counts_key": "n", "table_key": "t", "layer_counts_key": "c"}
    data = {
        "family": "x",
        "experts": {
            "count_keys": ["e"],
            "router": "m.layers.{layer}.router.weight",
            "sub_experts": {**keys, **sub_experts},
        },
    }
    with pytest.raises(ArchError, match=re.escape(message)):
        parse_spec(data, source="x.toml")


def test_cli_plan_lists_the_freed_sub_experts_and_keep_params_verifies(source, tmp_path, capsys):
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TINY_CORPUS))
    args = ["--arch", str(adapter_path(FAMILY)), "--model-code", MODEL_CODE[FAMILY]]
    stats = tmp_path / "stats.safetensors"
    assert run(["profile", str(source), "--data", str(data), "--out", str(stats), *args]) == 0
    plan = tmp_path / "plan.json"
    budget = ["--profile", str(stats), "--keep-params", "0.5"]
    code = run(["prune", str(source), *budget, "--plan-only", "--plan-out", str(plan), *args])
    assert code == 0
    assert "sub-experts freed" in capsys.readouterr().out
    written = PrunePlan.load(plan)
    assert written.meta["budget"] == {"keep_params": 0.5}
    dead = written.meta["dead_sub_experts"]
    # half the sub-expert parameters: 3 of each layer's 6 (equal-sized) sub-experts die
    assert all(sum(len(ids) for ids in per_set) == 3 for per_set in dead.values())
    out = tmp_path / "pruned"
    code = run(["prune", str(source), *budget, "--out", str(out), "--verify", *args])
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert {layer: sum(c) for layer, c in cfg["sub_expert_counts"].items()} == {"0": 3, "1": 3}


def test_a_tensor_beside_the_sub_experts_stops_the_rewrite(source, spec, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(source, model)
    weights = load_file(model / "model.safetensors")
    weights["model.layers.0.moe.experts.sets.0.scale"] = torch.ones(8)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "pruned"
    with pytest.raises(ModelError, match=r"look per-expert .*sets\.0\.scale"):
        rewrite_checkpoint(model, PrunePlan(experts=KEPT), out, spec=spec)
    assert not out.exists()

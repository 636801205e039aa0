"""`mfprune prune --profile`: profile -> rank -> plan -> rewrite, end to end through the CLI,
and the rewritten model still equals the masked original."""

from __future__ import annotations

import json

import pytest
from checks import assert_exact, removed
from typer.testing import CliRunner

import mfprune
from mfprune.cli import app
from mfprune.plan import PrunePlan

TEXTS = [
    "def add(a, b): return a + b",
    "The quick brown fox jumps over the lazy dog.",
    "import os\nprint(os.getcwd())",
    "A stitch in time saves nine; the early bird catches the worm.",
    "for i in range(10): total += i * i",
    "Dictionary: a book listing the words of a language with their meanings.",
] * 3


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + result.stderr
    return result


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


@pytest.fixture(scope="module")
def stats_of(model_dir, task, tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            out = tmp_path_factory.mktemp("stats") / f"{family}.safetensors"
            run("profile", model_dir(family), "--data", task, "--out", out, "--format", "quiet")
            cache[family] = out
        return cache[family]

    return get


@pytest.mark.parametrize(
    ("family", "criterion", "extra"),
    [
        ("mixtral", "reap", ["--keep-ratio", "0.5"]),
        ("qwen3_moe", "soft", ["--keep", "4", "--heads-keep-ratio", "0.5"]),
        ("deepseek_v3", "ean", ["--keep-ratio", "0.5"]),
        ("jetmoe", "frequency", ["--keep", "3", "--attention-keep-ratio", "0.75"]),
        ("olmoe", "random", ["--coverage", "0.6", "--seed", "3"]),
        # newer families: group-limited sigmoid + bias with shared experts; a hybrid whose heads
        # live in its attention layers only; Mamba layers with a period-offset MoE rule
        ("glm4_moe", "reap", ["--keep-ratio", "0.5", "--heads-keep-ratio", "0.5"]),
        ("qwen3_next", "reap", ["--keep", "4", "--heads-keep-ratio", "0.5"]),
        ("jamba", "soft", ["--keep-ratio", "0.5", "--heads-keep-ratio", "0.5"]),
        # composite: vision tower + MoE language model under text_config; --verify loads both
        ("qwen3_vl_moe", "reap", ["--keep-ratio", "0.5", "--heads-keep-ratio", "0.5", "--verify"]),
    ],
)
def test_profile_then_prune_is_exact(family, criterion, extra, model_dir, stats_of, tmp_path):
    source = model_dir(family)
    out = tmp_path / "pruned"
    run("prune", source, "--profile", stats_of(family), "--criterion", criterion, *extra,
        "--out", out)  # fmt: skip
    plan = PrunePlan.load(out / "mfprune_plan.json")
    assert plan.meta["criterion"] == criterion
    assert plan.meta["stats"]["tokens"] > 0
    E = 4 if family == "jetmoe" else 8
    H = 4
    assert_exact(
        source,
        out,
        experts=removed({k: list(v) for k, v in plan.experts.items()}, E),
        attention_experts=removed({k: list(v) for k, v in plan.attention_experts.items()}, E)
        or None,
        heads=removed({k: list(v) for k, v in plan.heads.items()}, H) or None,
    )


def test_plan_only_writes_a_plan_and_reports_mass(model_dir, stats_of, tmp_path):
    out = tmp_path / "plan-only" / "plan.json"
    args = ["--keep-ratio", "0.5", "--plan-only", "--plan-out", out, "--format", "json"]
    result = run("prune", model_dir("mixtral"), "--profile", stats_of("mixtral"), *args)
    assert sorted(p.name for p in out.parent.iterdir()) == ["plan.json"]
    data = json.loads(result.stdout)
    assert data["plan_out"] == str(out)
    assert [len(layer["kept"]) for layer in data["layers"]] == [4, 4]
    assert all(0.5 <= layer["mass_kept"] <= 1.0 for layer in data["layers"])
    plan = json.loads(out.read_text())
    assert plan["meta"]["budget"] == {"keep_ratio": 0.5}


def test_global_budget_prunes_unevenly_and_verifies(model_dir, stats_of, tmp_path):
    out = tmp_path / "global"
    args = ["--global-budget", "0.5", "--criterion", "soft", "--verify", "--out", out]
    result = run("prune", model_dir("mixtral"), "--profile", stats_of("mixtral"), *args)
    assert "verified" in result.stdout
    plan = PrunePlan.load(out / "mfprune_plan.json")
    counts = [len(ids) for ids in plan.experts.values()]
    assert sum(counts) == 8 and min(counts) >= 2  # half of 2 x 8, at least top-k per layer
    config = json.loads((out / "config.json").read_text())
    if len(set(counts)) > 1:
        assert config["mfprune_expert_counts"] == {str(k): len(v) for k, v in plan.experts.items()}
    else:
        assert "mfprune_expert_counts" not in config and config["num_local_experts"] == counts[0]
    assert mfprune.load_pretrained(out) is not None


def test_profile_of_another_model_is_refused(model_dir, stats_of, tmp_path):
    result = run("prune", model_dir("qwen3_moe"), "--profile", stats_of("mixtral"),
                 "--keep-ratio", "0.5", "--out", tmp_path / "o", ok=False)  # fmt: skip
    assert result.exit_code == 2
    assert "profiled on another model" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "needs a budget"),
        (["--keep-ratio", "0.5", "--criterion", "rep"], "did you mean 'reap'"),
        (["--keep", "1"], "below the minimum of 2"),
        (["--keep", "4", "--keep-ratio", "0.5"], "exactly one budget"),
    ],
)
def test_bad_budgets_fail_before_writing(args, message, model_dir, stats_of, tmp_path):
    result = run("prune", model_dir("mixtral"), "--profile", stats_of("mixtral"), *args,
                 "--out", tmp_path / "o", ok=False)  # fmt: skip
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_plan_and_profile_together_are_refused(model_dir, stats_of, tmp_path):
    plan = tmp_path / "p.json"
    PrunePlan(experts={0: (0, 1, 2, 3), 1: (0, 1, 2, 3)}).save(plan)
    result = run("prune", model_dir("mixtral"), "--profile", stats_of("mixtral"), "--plan", plan,
                 "--out", tmp_path / "o", ok=False)  # fmt: skip
    assert "either --plan PLAN or --profile STATS" in result.stderr

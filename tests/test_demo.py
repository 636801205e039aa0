"""The embedded default model in use: its name `default` works wherever a model is taken, the
demo's pipeline runs end to end on it (small budgets), and pruning with the task's own profile
keeps the task far better than random pruning (issue 5's quality test)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mfprune.cli import app
from mfprune.default_model import DEFAULT_DATA_DIR, DEFAULT_MODEL_DIR, DOMAINS


def run(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------- the name


def test_default_names_the_embedded_model(tmp_path, monkeypatch):
    from mfprune.checkpoint import model_location, open_checkpoint

    assert model_location("default") == DEFAULT_MODEL_DIR
    assert model_location("./default") == Path("default")  # a folder called default
    assert model_location(Path("default")) == Path("default")  # a Path is always a path
    assert open_checkpoint("default").root == DEFAULT_MODEL_DIR

    result = run("inspect", "default", "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["path"] == str(DEFAULT_MODEL_DIR)

    monkeypatch.chdir(tmp_path)  # ./default is a folder here, and there is none
    result = run("inspect", "./default")
    assert result.exit_code == 2
    assert "default does not exist" in result.stderr


def test_default_in_profile_prune_bench_and_config(tmp_path):
    stats, out = tmp_path / "stats.safetensors", tmp_path / "pruned"
    data = DEFAULT_DATA_DIR / "quotes.profile.jsonl"
    result = run("profile", "default", "--data", data, "--out", stats, "--max-tokens", 300)
    assert result.exit_code == 0, result.output
    result = run("prune", "default", "--profile", stats, "--keep", 8, "--out", out,
                 "--format", "quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 8

    # bench --baseline default: refused for a gate without quality, after the name resolved
    result = run("bench", out, "--baseline", "default", "--max-drop", "1%")
    assert result.exit_code == 2 and "no quality task" in result.stderr

    from mfprune.shrink import load_config

    config = tmp_path / "shrink.toml"
    config.write_text(
        f'model = "default"\nout = "o"\n[profile]\ndata = "{data}"\n[prune]\nkeep_ratio = 0.5\n'
    )
    assert load_config(config).model == DEFAULT_MODEL_DIR
    assert load_config(config, {"model": str(out)}).model == out


# ---------------------------------------------------------------------------- the demo


def test_demo_pipeline_end_to_end(tmp_path, capsys):
    from mfprune.demo import print_table, run_demo

    out = tmp_path / "demo"
    result = run_demo(
        out, task="quotes", max_tokens=600, limit=2, heads_texts=3, speed=False, repair_tokens=600
    )
    for name in ("quotes.stats.safetensors", "bench.json", "heatmap.html", "summary.json",
                 "summary.md", "pruned/config.json", "pruned/model.safetensors",
                 "dropped/model.safetensors", "bench-dropped.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert "<svg" in (out / "heatmap.html").read_text()
    pruned = json.loads((out / "pruned" / "config.json").read_text())
    assert pruned["num_local_experts"] == 8
    assert [d["domain"] for d in result.domains] == list(DOMAINS)
    assert [d["domain"] for d in result.domains if d["task"]] == ["quotes"]
    for d in result.domains:
        assert d["texts"] == 2
        assert 0 < d["before"] < 10 and 0 < d["after"] < 10
        assert d["ratio"] == pytest.approx(d["after"] / d["before"])
        assert d["dropped_ratio"] == pytest.approx(d["dropped"] / d["before"])
        assert d["dropped"] != d["after"]  # two different models were benched
    repair = json.loads((out / "pruned" / "mfprune_provenance.json").read_text())["repair"]
    assert repair["method"] == "refit" and repair["tokens"] == 600
    assert "repair" not in json.loads((out / "dropped" / "mfprune_provenance.json").read_text())
    (p0, p1), (b0, b1) = result.size["params"], result.size["disk_bytes"]
    assert p1 < 0.7 * p0 and b1 < 0.7 * b0
    assert result.heads_note.startswith("heads:")
    assert result.heads_pruned == ("num_attention_heads" in _changes(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "quotes" and len(summary["domains"]) == 4
    assert summary["repair"] == "refit"
    capsys.readouterr()
    print_table(result)
    table = capsys.readouterr().out
    assert "quotes (task)" in table and "parameters" in table
    assert "ratio dropped" in table and "ratio + refit" in table
    assert "won back" in table or "did not help" in table


def _changes(out: Path) -> dict:
    return json.loads((out / "pruned" / "mfprune_provenance.json").read_text())["config_changes"]


# ---------------------------------------------------------------------------- quality


@pytest.fixture(scope="module")
def default_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR, local_files_only=True)
    return model.eval(), tokenizer


def test_own_profile_keeps_the_task_far_better_than_random(default_model, tmp_path):
    """Half the experts, chosen from the code profile, against random halves (3 seeds): the
    code loss, measured on held-out code with the dropped experts masked (exact: the oracle
    equals the rewrite), rises clearly less than for any random half."""
    import torch

    from mfprune.arch import spec_for_config
    from mfprune.arch.layout import resolve_layout
    from mfprune.checkpoint import open_checkpoint
    from mfprune.heldout import HeldOut, dropped, heldout_loss, read_texts
    from mfprune.planner import plan_from_profile
    from mfprune.profiling import profile_model

    model, tokenizer = default_model
    ckpt = open_checkpoint(DEFAULT_MODEL_DIR)
    layout = resolve_layout(ckpt, spec_for_config(ckpt.config))
    stats = profile_model(
        DEFAULT_MODEL_DIR, DEFAULT_DATA_DIR / "code.profile.jsonl", max_tokens=12000
    )
    code = HeldOut.load(tokenizer, read_texts(DEFAULT_DATA_DIR / "code.eval.jsonl", 24))

    def loss(criterion: str, seed: int = 0) -> float:
        options = {"seed": seed} if criterion == "random" else {}
        plan, _ = plan_from_profile(
            layout, stats, criterion=criterion, criterion_options=options, keep_ratio=0.5
        )
        e = layout.experts
        drop = dropped({layer: plan.kept_experts(e, layer) for layer in e.layers}, e.num_experts)
        return heldout_loss(model, code, experts=drop)

    with torch.inference_mode():
        base = heldout_loss(model, code)
        own = loss("soft")
        random = [loss("random", seed) for seed in range(3)]
    numbers = (base, own, random)
    assert base < own < min(random), numbers
    # the shipped model (balanced routing) measured ×1.26 for its own profile, ×1.38..1.46 for
    # random halves: the own profile's rise must stay well below random's average rise
    assert own - base < 0.75 * (statistics.fmean(random) - base), numbers

"""`mfprune shrink --config`: the typed config (every problem at once, in words), flags over
the file, and the CI step end to end on a tiny model — then again from the stats cache, and
once more with a gate that fails (exit 4, artifacts still written)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import mfprune.profiling
from mfprune import load_pretrained, tinymodels
from mfprune.cli import app
from mfprune.errors import ConfigError
from mfprune.plan import PrunePlan
from mfprune.profiling import ProfileStats
from mfprune.shrink import load_config

FAMILY = "qwen3_moe"
INIT = {"initializer_range": 0.2}  # experts matter to the logits (see test_bench.py)


def run(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def write(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


@pytest.fixture(scope="module", autouse=True)
def hf_home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        yield


# ---------------------------------------------------------------------------- the config


def problems_of(tmp_path: Path, text: str, **overrides: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "shrink.toml", text), overrides)
    return info.value.problems


def test_every_config_problem_is_reported_at_once(tmp_path):
    problems = problems_of(
        tmp_path,
        """
        model = "missing-model"
        keep_ratio = 0.5
        colour = "blue"

        [profile]
        data = 3
        batchsize = 4
        dtype = "fp16"

        [prune]
        criterion = "rep"
        keep = 2
        coverage = 1.5

        [bench]
        kernel = "triton"
        repeats = 0

        [gate]
        max_drop = "two percent"
        """,
    )
    assert problems == [
        "unknown key 'keep_ratio' — did you mean 'prune.keep_ratio'?",
        "unknown key 'colour'",
        "missing key 'out'",
        "unknown key 'profile.batchsize' — did you mean 'profile.batch_size'?",
        "'profile.data' must be a path (string), got 3 (an integer)",
        "'profile.dtype' must be one of auto, float32, bfloat16, float16, got 'fp16'",
        "'bench.kernel' must be one of eager, grouped_mm, batched_mm, mfprune_triton, got "
        "'triton' — did you mean 'mfprune_triton'?",
        "give exactly one budget of prune.keep, prune.keep_ratio, prune.coverage, "
        "prune.global_budget, prune.keep_params (given: prune.keep, prune.coverage)",
        "'prune.coverage' must be in (0, 1], got 1.5",
        "'bench.repeats' must be at least 1, got 0",
        "unknown criterion 'rep' in 'prune.criterion' — did you mean 'reap'? "
        "(available: ean, frequency, random, reap, soft)",
        f"'model': {tmp_path / 'missing-model'} is not a model folder (no config.json)",
        "'gate.max_drop' must be an absolute drop like 0.02 or a share like \"2%\", got "
        "'two percent'",
        "the gate needs quality numbers: set bench.tasks and/or bench.data",
    ]


def test_config_errors_through_the_cli(tmp_path):
    config = write(tmp_path / "bad.toml", 'model = "m"\nout = "o"\n[profile]\ndata = "d"\n[prun]')
    result = run("shrink", "--config", config)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {config}: 4 problems: unknown key 'prun' — did you ")
    broken = write(tmp_path / "broken.toml", 'model = "m"\nout = [')
    result = run("shrink", "--config", broken)
    assert result.exit_code == 2 and "is not valid TOML" in result.stderr
    result = run("shrink", "--config", tmp_path / "none.toml")
    assert result.exit_code == 2 and "none.toml does not exist" in result.stderr


def test_paths_are_relative_to_the_file_and_flags_win(model_dir, tmp_path):
    model = model_dir(FAMILY, **INIT)
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf" / "data.jsonl", '{"text": "x"}')
    text = f"""
        model = "{model}"
        out = "out"
        [profile]
        data = "data.jsonl"
        [prune]
        keep = 4
        [bench]
        data = "data.jsonl"
        [gate]
        max_drop = 0.1
        metrics = {{ "acc" = "5%" }}
        """
    path = write(tmp_path / "conf" / "shrink.toml", text)
    config = load_config(path)
    assert config.out == tmp_path / "conf" / "out"
    assert config.profile.data == tmp_path / "conf" / "data.jsonl"
    assert config.bench.data == [tmp_path / "conf" / "data.jsonl"]  # one path: a list of one
    assert config.gate_rules() == ["0.1", "acc=5%"]
    config = load_config(path, {"out": "/elsewhere", "prune.keep_ratio": 0.25, "bench.limit": 3})
    assert config.out == Path("/elsewhere")
    assert (config.prune.keep, config.prune.keep_ratio) == (None, 0.25)  # the budget replaced
    assert config.bench.limit == 3.0


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def setup(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shrink")
    texts = list(tinymodels.TINY_CORPUS) * 3
    write(root / "calib.jsonl", "\n".join(json.dumps({"text": t}) for t in texts))
    write(root / "heldout.jsonl", "\n".join(json.dumps({"text": t}) for t in texts[:6]))
    config = write(
        root / "shrink.toml",
        f"""
        model = "{model_dir(FAMILY, **INIT)}"
        out = "out"

        [profile]
        data = "calib.jsonl"
        cache_dir = "cache"

        [prune]
        criterion = "reap"
        keep_ratio = 0.5

        [bench]
        data = ["heldout.jsonl"]
        batch_size = 4
        prompt_len = 12
        new_tokens = 3
        repeats = 1

        [gate]
        max_drop = "50%"
        """,
    )
    return {"root": root, "config": config}


@pytest.fixture(scope="module")
def first(setup) -> Any:
    return run("shrink", "--config", setup["config"], "--format", "json")


@pytest.fixture(scope="module")
def rerun(setup, first) -> Any:
    """The same job again (same model, same data): the profile must come from the cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mfprune.profiling, "profile_model", _must_not_profile)
        return run("shrink", "--config", setup["config"], "--overwrite")


def _must_not_profile(*_args: Any, **_kwargs: Any) -> None:
    raise AssertionError("profiled again although the stats are cached")


def test_shrink_writes_every_artifact(setup, first):
    assert first.exit_code == 0, first.output + first.stderr
    out = setup["root"] / "out"
    summary = json.loads(first.stdout)
    assert summary == json.loads((out / "shrink.json").read_text())
    assert summary["stats_cached"] is False and summary["gate"]["passed"] is True
    assert sorted(p.name for p in out.iterdir()) == [
        "bench.json", "model", "plan.json", "report.md", "shrink.json", "stats.safetensors",
    ]  # fmt: skip
    stats = ProfileStats.load(out / "stats.safetensors")
    assert stats.meta.tokens > 0
    assert Path(summary["stats_cache"]).parent == setup["root"] / "cache"
    plan = PrunePlan.load(out / "plan.json")
    assert {len(ids) for ids in plan.experts.values()} == {4}
    assert plan.meta["criterion"] == "reap"
    model = load_pretrained(out / "model")
    assert model.config.num_experts == 4
    bench = json.loads((out / "bench.json").read_text())
    assert bench["model"]["path"] == str(out / "model")  # not the temp folder it was built in
    assert bench["gate"]["passed"] and bench["model"]["params"] < bench["baseline"]["params"]
    report = (out / "report.md").read_text()
    for part in ("gate: **PASSED**", "| data_heldout/bits_per_byte |", "## Plan", "^ = kept"):
        assert part in report
    card = (out / "model" / "README.md").read_text()
    ratio = next(r for r in bench["comparison"] if r["name"] == "data_heldout/bits_per_byte")
    assert (
        f"| data_heldout/bits_per_byte | {ratio['model']:.4g} | {ratio['baseline']:.4g} |" in card
    )
    assert "Not measured yet" not in card and "quality gate passed" in card
    assert "- criterion: `reap`" in card and "task data fingerprint" in card


def test_rerun_skips_the_profile(setup, first, rerun):
    assert rerun.exit_code == 0, rerun.output + rerun.stderr
    assert "profile: skipped — reusing cached stats" in rerun.stderr
    assert "(profile skipped: cached stats)" in rerun.stdout
    assert f"overwrite: replaced {setup['root'] / 'out'} (an mfprune output with shrink.json" in (
        rerun.stderr
    )
    summary = json.loads((setup["root"] / "out" / "shrink.json").read_text())
    assert summary["stats_cached"] is True
    before = json.loads(first.stdout)
    assert summary["stats_cache"] == before["stats_cache"]


def test_failed_gate_exits_4_and_keeps_the_artifacts(setup, rerun):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mfprune.profiling, "profile_model", _must_not_profile)
        result = run(
            "shrink", "--config", setup["config"], "--out", setup["root"] / "strict",
            "--keep-ratio", "0.25", "--max-drop", "1%",
        )  # fmt: skip
    assert result.exit_code == 4, result.output + result.stderr
    assert "error: quality gate failed: data_heldout/" in result.stderr
    out = setup["root"] / "strict"
    assert (out / "model" / "config.json").is_file()
    bench = json.loads((out / "bench.json").read_text())
    assert not bench["gate"]["passed"] and bench["gate"]["failed"]
    assert "gate: **FAILED**" in (out / "report.md").read_text()
    plan = PrunePlan.load(out / "plan.json")
    assert {len(ids) for ids in plan.experts.values()} == {2}


def test_repair_refit_through_the_config(setup, rerun, tmp_path):
    """prune.repair (here from --repair): the kept experts are refit on profile.data, the
    report and the provenance say so, and the output still loads at the plain prune's size."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mfprune.profiling, "profile_model", _must_not_profile)
        result = run(
            "shrink", "--config", setup["config"], "--out", tmp_path / "refit", "--repair", "refit",
        )  # fmt: skip
    assert result.exit_code == 0, result.output + result.stderr
    out = tmp_path / "refit"
    assert "- repair: refit" in (out / "report.md").read_text()
    record = json.loads((out / "model" / "mfprune_provenance.json").read_text())["repair"]
    assert record["method"] == "refit" and record["tokens"] > 0 and record["steps"] == 300
    assert record["data"] == str(setup["root"] / "calib.jsonl")
    assert load_pretrained(out / "model").config.num_experts == 4


def test_bad_repair_in_the_config(tmp_path):
    problems = problems_of(
        tmp_path,
        """
        model = "m"
        out = "o"
        [profile]
        data = "d"
        [prune]
        keep = 2
        repair = "refix"
        verify = true
        """,
    )
    assert "unknown repair method 'refix' in 'prune.repair' — did you mean 'refit'? " in (
        " ".join(problems) + " "
    )
    assert "'prune.verify' checks exact rewrites: not with 'prune.repair'" in problems


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('repair = "refit"\n        refit_steps = -1', "'prune.refit_steps' must be 0 or more"),
        ("refit_steps = 10", "'prune.refit_steps' is only read with prune.repair"),
    ],
)
def test_bad_refit_steps_in_the_config(tmp_path, lines, message):
    config = f"""
        model = "m"
        out = "o"
        [profile]
        data = "d"
        [prune]
        keep = 2
        {lines}
        """
    problems = problems_of(tmp_path, config)
    assert any(message in p for p in problems), problems


def test_output_folder_is_checked_before_profiling(setup, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mfprune.profiling, "profile_model", _must_not_profile)
        result = run("shrink", "--config", setup["config"], "--out", busy)
        assert result.exit_code == 2 and "exists and is not empty" in result.stderr
        result = run("shrink", "--config", setup["config"], "--out", busy, "--keep", "1")
        assert result.exit_code == 2 and "top-k" in result.stderr.lower()

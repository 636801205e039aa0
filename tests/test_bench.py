"""`mfprune bench`: the numbers equal lm-eval's own, the gate passes an exact rewrite and fails a
random prune of most experts (exit 4, naming the metric), the data-to-task path, the gate rules,
and bad input before any model is loaded.

lm-eval runs take seconds even on a tiny model, so each is done once per module (fixtures)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mfprune import rewrite_checkpoint, tinymodels
from mfprune.bench import DropLimit, GateRule, Metric, check_gate, parse_gate
from mfprune.bench.quality import data_task_name, read_data_records, write_data_task
from mfprune.bench.run import resolve_kernel
from mfprune.cli import app
from mfprune.errors import DataError, MfpruneError
from mfprune.plan import PrunePlan

FAMILY = "qwen3_moe"
# routers and weights drawn at 0.2 instead of 0.02, so experts matter to the logits: dropping
# 6 of 8 at random moves perplexity by percents, not parts per million
INIT = {"initializer_range": 0.2}
MC = [
    {
        "question": "The router sends every token to",
        "choices": ["the experts", "a cat"],
        "answer": 0,
    },
    {"question": "def add(a, b):", "choices": ["return a + b", "the mixture"], "answer": 0},
    {"question": "for i in range(10):", "choices": ["experts", "print(i * i)"], "answer": 1},
    {"question": "Pruning removes", "choices": ["the experts", "def add"], "answer": "the experts"},
]


def run(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module", autouse=True)
def hf_home(tmp_path_factory):
    """lm-eval and datasets write caches under HF_HOME: keep them in a temp folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Held-out data (perplexity and multiple choice) and a local task folder using it."""
    root = tmp_path_factory.mktemp("bench-data")
    ppl = root / "heldout.jsonl"
    ppl.write_text("".join(json.dumps({"text": t}) + "\n" for t in tinymodels.TINY_CORPUS))
    mc = root / "quiz.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in MC[:3]))
    tasks = root / "tasks"
    tasks.mkdir()
    common = {"dataset_path": "json", "test_split": "test"}
    (tasks / "local_ppl.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "local_ppl",
                **common,
                "dataset_kwargs": {
                    "data_files": {"test": str(ppl)},
                    "cache_dir": str(root / "cache"),
                },
                "output_type": "loglikelihood_rolling",
                "doc_to_text": "",
                "doc_to_target": "{{text}}",
                "metric_list": [{"metric": m} for m in ("word_perplexity", "bits_per_byte")],
            }
        )
    )
    (tasks / "local_mc.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "local_mc",
                **common,
                "dataset_kwargs": {"data_files": {"test": str(mc)}, "cache_dir": str(root / "c")},
                "output_type": "multiple_choice",
                "doc_to_text": "{{question}}",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{answer}}",
                "metric_list": [{"metric": "acc"}],
            }
        )
    )
    return {"ppl": ppl, "mc": mc, "tasks": tasks}


@pytest.fixture(scope="module")
def models(model_dir, tmp_path_factory) -> dict[str, Path]:
    """The original, an exact rewrite of it (every expert kept), a random prune to 2 of 8."""
    original = model_dir(FAMILY, **INIT)
    root = tmp_path_factory.mktemp("bench-models")
    rewrite_checkpoint(original, PrunePlan(), root / "exact")
    rng = random.Random(0)
    drastic = PrunePlan(experts={layer: tuple(sorted(rng.sample(range(8), 2))) for layer in (0, 1)})
    rewrite_checkpoint(original, drastic, root / "random")
    return {"original": original, "exact": root / "exact", "random": root / "random"}


@pytest.fixture(scope="module")
def exact_bench(models, files, tmp_path_factory) -> tuple[Any, dict[str, Any]]:
    """The exact rewrite vs the original, through the CLI: local tasks, speed, a zero gate."""
    out = tmp_path_factory.mktemp("exact-bench") / "bench.json"
    result = run(
        "bench", models["exact"], "--baseline", models["original"],
        "--tasks", "local_ppl,local_mc", "--include-path", files["tasks"],
        "--batch-size", 4, "--prompt-len", 12, "--new-tokens", 3, "--repeats", 1,
        "--max-drop", "0", "--json-out", out, "--format", "json",
    )  # fmt: skip
    return result, json.loads(out.read_text())


@pytest.fixture(scope="module")
def direct(models, files) -> dict[str, Any]:
    """lm-eval on its own (it loads the checkpoint from disk itself): the reference numbers."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={models['original']},dtype=float32",
        tasks=["local_ppl", "local_mc"],
        task_manager=TaskManager(include_path=str(files["tasks"]), include_defaults=False),
        batch_size=4,
        device="cpu",
    )
    return results["results"]


# ---------------------------------------------------------------------------- end to end


def test_bench_gives_lm_evals_own_numbers(exact_bench, direct):
    result, report = exact_bench
    assert result.exit_code == 0, result.output + result.stderr
    expected = {
        "local_ppl/word_perplexity": direct["local_ppl"]["word_perplexity,none"],
        "local_ppl/bits_per_byte": direct["local_ppl"]["bits_per_byte,none"],
        "local_mc/acc": direct["local_mc"]["acc,none"],
    }
    for role in ("baseline", "model"):  # the exact rewrite computes what the original does
        quality = report[role]["quality"]
        assert set(quality) >= set(expected)
        for key, value in expected.items():
            assert quality[key]["value"] == pytest.approx(value, rel=1e-9), (role, key)
    assert report["model"]["quality"]["local_mc/acc"]["samples"] == 3


def test_gate_passes_an_exact_rewrite(exact_bench):
    result, report = exact_bench
    assert json.loads(result.stdout) == report  # --format json prints what --json-out writes
    gate = report["gate"]
    assert gate["passed"] and gate["rules"] == ["0"] and not gate["failed"]
    assert {c["metric"] for c in gate["checks"]} == set(report["model"]["quality"])
    assert all(c["drop"] == 0 for c in gate["checks"])


def test_report_has_speed_memory_and_sizes(exact_bench):
    report = exact_bench[1]
    for role in ("model", "baseline"):
        speed = report[role]["speed"]
        assert speed["prompt_len"] == 12 and speed["new_tokens"] == 3
        assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0
        assert speed["memory_method"] == "cpu_weights_plus_kv_cache" and speed["interleaved"]
        assert len(speed["decode"]["samples"]) == 1
        assert report[role]["params"] > 0 and report[role]["disk_bytes"] > 0
    rows = {r["name"]: r for r in report["comparison"]}
    assert rows["parameters"]["ratio"] == 1.0
    assert rows["local_ppl/word_perplexity"]["higher_is_better"] is False
    assert report["format"] == "mfprune.bench/1" and report["versions"]["lm_eval"]


def test_gate_fails_a_random_prune_of_most_experts(models, files):
    result = run(
        "bench", models["random"], "--baseline", models["original"],
        "--data", files["ppl"], "--data", files["mc"], "--no-speed", "--markdown",
        "--max-drop", "2%", "--max-drop", "data_quiz/*=1",
    )  # fmt: skip
    assert result.exit_code == 4, result.output + result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: quality gate failed: data_heldout/word_perplexity dropped")
    table = result.stdout
    assert "| metric | model | baseline | ratio | gate |" in table
    failed = [line for line in table.splitlines() if "FAIL" in line]
    assert failed and all(line.startswith("| **data_heldout/") for line in failed)
    assert "| data_quiz/acc | " in table  # data_quiz/*=1 allows any drop there


# ---------------------------------------------------------------------------- the gate rules


def metric(task: str, name: str, value: float, higher: bool) -> Metric:
    return Metric(task, name, "none", value, None, higher, 10)


def test_drop_limits_parse():
    assert DropLimit.parse("0.02") == DropLimit(0.02, relative=False)
    assert DropLimit.parse(" 2% ") == DropLimit(0.02, relative=True)
    assert DropLimit.parse("2%").allowed(-50.0) == pytest.approx(1.0)
    for bad in ("", "x", "-1", "nan", "2%%"):
        with pytest.raises(MfpruneError, match="cannot read --max-drop"):
            DropLimit.parse(bad)
    with pytest.raises(MfpruneError, match="no metric before '='"):
        GateRule.parse("=0.1")


def test_gate_is_direction_aware_and_last_rule_wins():
    base = [metric("t", "acc", 0.50, True), metric("t", "word_perplexity", 100.0, False)]
    better_ppl_worse_acc = [
        metric("t", "acc", 0.47, True),
        metric("t", "word_perplexity", 90, False),
    ]
    gate = check_gate(parse_gate(["0.02"]), better_ppl_worse_acc, base)
    assert [c.metric for c in gate.failed] == ["t/acc"]
    assert gate.summary().startswith("quality gate failed: t/acc dropped 0.03 > 0.02")
    worse_ppl = [metric("t", "acc", 0.5, True), metric("t", "word_perplexity", 103.0, False)]
    assert [c.metric for c in check_gate(parse_gate(["2%"]), worse_ppl, base).failed] == [
        "t/word_perplexity"
    ]
    relaxed = check_gate(parse_gate(["2%", "t/word_*=5%"]), worse_ppl, base)
    assert relaxed.passed and relaxed.checks[1].rule == "t/word_*=5%"
    unmatched = check_gate(parse_gate(["0.1", "accc=0"]), base, base)
    assert not unmatched.passed and "did you mean 'acc'" in unmatched.summary()


# ---------------------------------------------------------------------------- --data -> a task


def test_data_becomes_a_task_with_absolute_paths(files, tmp_path):
    name, kind = write_data_task(files["mc"], tmp_path)
    assert (name, kind) == ("data_quiz", "multiple_choice")
    config = yaml.safe_load((tmp_path / "data_quiz.yaml").read_text())
    data_file = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert data_file.is_absolute() and data_file.parent == tmp_path.resolve()
    records = [json.loads(line) for line in data_file.read_text().splitlines()]
    assert [r["answer"] for r in records] == [0, 0, 1]
    assert read_data_records(files["ppl"])[0] == "perplexity"
    assert data_task_name(Path("my held-out.v2.jsonl")) == "data_my_held_out"


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"text": "a"}, {"question": "q", "choices": ["a", "b"], "answer": 0}], ":2 is a multi"),
        ([{"prompt": "x"}], "neither 'text' nor 'choices' \\+ 'answer' \\(fields: prompt\\)"),
        ([{"choices": ["a", "b"], "answer": 2}], "'answer' must be an index 0..1"),
        ([{"choices": ["a", "b"], "answer": "c"}], "or one of the choices, got 'c'"),
        ([{"choices": ["a"], "answer": 0}], "'choices' must be a list of 2 or more"),
        ([{"text": ""}], "'text' must be a non-empty string"),
        ([], "holds no records"),
    ],
)
def test_bad_data_is_refused_with_its_line(tmp_path, records, message):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=message):
        read_data_records(path)


# ---------------------------------------------------------------------------- bad input


def test_bad_input_fails_before_loading(models, files, tmp_path):
    def error(*args: Any) -> str:
        result = run("bench", models["original"], *args)
        assert result.exit_code == 2, result.output + result.stderr
        return result.stderr

    assert "--max-drop compares with a baseline" in error("--data", files["ppl"], "--max-drop", 1)
    assert "no quality task was given" in error("--baseline", models["exact"], "--max-drop", "1")
    assert "cannot read --max-drop '2 %%'" in error(
        "--baseline", models["exact"], "--data", files["ppl"], "--max-drop", "2 %%"
    )
    assert "is not a folder" in error("--include-path", tmp_path / "nope", "--tasks", "x")
    assert "--data" in error("--data", tmp_path / "missing.jsonl")
    assert "--markdown and --format json" in error("--markdown", "--format", "json")


def test_kernel_names(monkeypatch):
    import torch

    cpu = torch.device("cpu")
    assert resolve_kernel("grouped_mm", cpu) == "grouped_mm"
    assert resolve_kernel(None, cpu) is None
    with pytest.raises(MfpruneError, match="did you mean 'mfprune_triton'"):
        resolve_kernel("mfprune_trition", cpu)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(MfpruneError, match="runs on CUDA devices only"):
        resolve_kernel("mfprune_triton", cpu)


def test_bench_runs_the_triton_kernel(models):
    """--kernel mfprune_triton registers mfprune's kernel and the model runs on it (on CPU under
    the Triton interpreter, which conftest turns on when there is no GPU)."""
    import os

    import torch

    from mfprune.bench import SpeedSpec, run_bench

    if not (os.environ.get("TRITON_INTERPRET") or torch.cuda.is_available()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    report = run_bench(
        models["exact"], speed=SpeedSpec(prompt_len=8, new_tokens=1, repeats=1),
        kernel="mfprune_triton", device="cuda" if torch.cuda.is_available() else "cpu",
    )  # fmt: skip
    assert report.model.experts_implementation == "mfprune_triton"
    assert report.model.speed is not None and report.model.speed.decode_tokens_per_s > 0

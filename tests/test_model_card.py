"""The pruned model's own files: a model card of its own (not the source's), only the files
that are part of a model, and provenance that keeps the whole chain across repeated prunes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mfprune import PrunePlan, rewrite_checkpoint
from mfprune.checkpoint import open_checkpoint
from mfprune.prune import Budget, prune_model

FAMILY = "qwen3_moe"
SOURCE_CARD = "# Tiny source\n\nThis model has 8 experts and 1.2 M parameters.\n"


@pytest.fixture
def source(model_dir, tmp_path) -> Path:
    """A model folder as people ship them: a card, metrics, notebook code, a license."""
    root = tmp_path / "source"
    shutil.copytree(model_dir(FAMILY), root)
    (root / "README.md").write_text(SOURCE_CARD)
    (root / "metrics.json").write_text('{"loss": 1.0}')
    (root / "__init__.py").write_text("")
    (root / "LICENSE").write_text("Apache-2.0\n")
    (root / "generation_config.json").write_text('{"max_new_tokens": 8}')
    (root / "modeling_tiny.py").write_text("# remote code\n")
    return root


def layers(path: Path) -> list[int]:
    return sorted({int(n.split(".")[2]) for n in open_checkpoint(path).tensors if ".experts." in n})


def test_own_card_and_only_model_files(source, tmp_path):
    plan = PrunePlan(experts={layer: (0, 2, 4, 6) for layer in layers(source)})
    result = rewrite_checkpoint(source, plan, tmp_path / "out")
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"LICENSE", "generation_config.json", "modeling_tiny.py"} <= names
    assert not {"metrics.json", "__init__.py"} & names
    assert sorted(result.skipped_files) == ["__init__.py", "metrics.json"]  # README: replaced
    card = (out / "README.md").read_text()
    assert SOURCE_CARD not in card and "8 experts and 1.2 M" not in card
    assert f"pruned by mfprune 0.1.0 from `{source}`" in card
    assert "| 0 | 4 of 8: 0 2 4 6 |" in card
    assert "`num_experts 8→4`" in card or "`num_local_experts 8→4`" in card
    assert "A plan given by hand" in card and "Not measured yet" in card


def test_the_cli_warns_about_what_it_left_behind(source, tmp_path):
    from typer.testing import CliRunner

    from mfprune.cli import app

    plan = tmp_path / "plan.json"
    PrunePlan(experts={layer: (0, 1, 2, 3) for layer in layers(source)}).save(plan)
    args = ["prune", str(source), "--plan", str(plan), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "warning: not carried over: __init__.py, metrics.json (" in result.stderr


def test_provenance_keeps_the_whole_chain(source, tmp_path):
    first, second, third = tmp_path / "p1", tmp_path / "p2", tmp_path / "p3"
    ls = layers(source)
    rewrite_checkpoint(source, PrunePlan(experts=dict.fromkeys(ls, (1, 3, 5, 7, 0, 2))), first)
    rewrite_checkpoint(first, PrunePlan(experts=dict.fromkeys(ls, (0, 1, 2, 3))), second)
    rewrite_checkpoint(second, PrunePlan(experts=dict.fromkeys(ls, (2, 3))), third)
    prov = json.loads((third / "mfprune_provenance.json").read_text())
    assert prov["source"]["path"] == str(second)
    assert [step["source"]["path"] for step in prov["history"]] == [str(source), str(first)]
    assert prov["history"][0]["source"]["fingerprint"] == open_checkpoint(source).fingerprint()
    assert [step["config_changes"] for step in prov["history"]][1]
    card = (third / "README.md").read_text()
    chain = card.split("## Pruned from", 1)[1]
    assert chain.index(str(source)) < chain.index(str(first)) < chain.index(str(second))
    assert "4. this model" in chain and card.startswith("---\n")
    assert f'pruned_from: "{source}"' in card  # the original, not the last parent


def test_a_damaged_provenance_fails_closed(source, tmp_path):
    first = tmp_path / "p1"
    ls = layers(source)
    rewrite_checkpoint(source, PrunePlan(experts=dict.fromkeys(ls, (0, 1, 2, 3))), first)
    (first / "mfprune_provenance.json").write_text("{not json")
    from mfprune.errors import ModelError

    with pytest.raises(ModelError, match="is not readable JSON"):
        rewrite_checkpoint(first, PrunePlan(experts=dict.fromkeys(ls, (0, 1))), tmp_path / "p2")
    assert not (tmp_path / "p2").exists()


def test_card_of_a_profiled_plan_names_criterion_budget_and_data(model_dir, tmp_path):
    from mfprune import tinymodels
    from mfprune.profiling import profile_model

    source = model_dir(FAMILY)
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in tinymodels.TINY_CORPUS))
    stats = profile_model(source, data)
    stats.save(tmp_path / "s.safetensors")
    outcome = prune_model(
        source, tmp_path / "out", profile=tmp_path / "s.safetensors", criterion="frequency",
        budget=Budget(keep_ratio=0.5),
    )  # fmt: skip
    card = (outcome.out / "README.md").read_text()
    assert "- criterion: `frequency`" in card and "- budget: `keep_ratio` = 0.5" in card
    assert f"task data fingerprint: `{stats.meta.data_fingerprint[:16]}…`" in card


def test_a_repaired_model_says_its_experts_were_refit(source, tmp_path):
    from mfprune.arch import spec_for_config
    from mfprune.arch.layout import resolve_layout
    from mfprune.rewrite.card import model_card

    out = tmp_path / "p"
    rewrite_checkpoint(source, PrunePlan(experts=dict.fromkeys(layers(source), (0, 1, 2, 3))), out)
    record = json.loads((out / "mfprune_provenance.json").read_text())
    ckpt = open_checkpoint(source)
    layout = resolve_layout(ckpt, spec_for_config(ckpt.config))
    plan = PrunePlan.load(out / "mfprune_plan.json")
    assert "repaired on the task" not in model_card(provenance=record, plan=plan, layout=layout)
    card = model_card(
        provenance={**record, "repair": {"method": "refit"}}, plan=plan, layout=layout
    )
    assert "repaired on the task's data" in card and "differ from the source's" in card

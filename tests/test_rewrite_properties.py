"""What the rewrite promises beyond exact logits: dtypes and bytes kept, unknown tensors and
side files carried over, bounded shards, determinism, a user's own adapter."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from checks import assert_exact, assert_tensors_are_slices, config_diff, removed
from safetensors.torch import load_file, save_file

from mfprune import PrunePlan, inspect_model, rewrite_checkpoint
from mfprune.arch import load_spec_file
from mfprune.checkpoint import open_checkpoint

MIXTRAL_KEPT = {0: [0, 2, 5, 7], 1: [1, 3, 4, 6]}


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_bf16_sharded_checkpoint_stays_bf16_and_exact(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("mixtral", dtype=torch.bfloat16, max_shard_size="40KB")
    src = open_checkpoint(source)
    assert len(src.shards) > 3 and src.index is not None
    out = tmp_path / "pruned"
    result = rewrite_checkpoint(
        source, PrunePlan(experts=MIXTRAL_KEPT), out, max_shard_bytes=40_000
    )
    dst = open_checkpoint(out)
    assert result.shards > 1 and dst.index is not None
    assert {t.dtype for t in dst.tensors.values()} == {"BF16"}
    assert all(s.file_size <= 40_000 + 4096 or len(s.tensors) == 1 for s in dst.shards)
    assert_tensors_are_slices(source, out, experts=MIXTRAL_KEPT)
    assert_exact(source, out, experts=removed(MIXTRAL_KEPT, 8))


def test_unknown_tensors_and_side_files_are_carried_over(tiny_checkpoint, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(tiny_checkpoint("mixtral"), source)
    # an MTP-like tensor the adapter does not know, in its own shard, listed in an index
    extra = {"model.mtp.0.proj.weight": torch.randn(8, 64)}
    save_file(extra, source / "model-extra.safetensors", metadata={"format": "pt"})
    shutil.move(source / "model.safetensors", source / "model-main.safetensors")
    weight_map = {k: "model-main.safetensors" for k in load_file(source / "model-main.safetensors")}
    weight_map.update({k: "model-extra.safetensors" for k in extra})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    (source / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (source / "chat_template.jinja").write_text("{{ messages }}")
    before = tree_digest(source)

    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts=MIXTRAL_KEPT), out)

    assert tree_digest(source) == before  # the source is never modified
    got = open_checkpoint(out).tensors["model.mtp.0.proj.weight"]
    with open(got.file, "rb") as f:
        f.seek(got.start)
        assert f.read(got.nbytes) == extra["model.mtp.0.proj.weight"].numpy().tobytes()
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    provenance = json.loads((out / "mfprune_provenance.json").read_text())
    assert provenance["source"]["fingerprint"] == open_checkpoint(source).fingerprint()
    assert provenance["config_changes"] == {"num_local_experts": [8, 4]}
    assert_exact(source, out, experts=removed(MIXTRAL_KEPT, 8), allow_unexpected=True)


def test_rewrite_is_deterministic(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("qwen2_moe")
    plan = PrunePlan(experts={0: [0, 1, 2, 7], 1: [3, 4, 5, 6]}, heads={0: [0, 1], 1: [2, 3]})
    a, b = tmp_path / "a", tmp_path / "b"
    rewrite_checkpoint(source, plan, a)
    rewrite_checkpoint(source, plan, b)
    assert tree_digest(a) == tree_digest(b)


def test_overwrite_replaces_output_and_keeps_source(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("olmoe")
    before = tree_digest(source)
    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts={0: [0, 1, 2, 3], 1: [3, 4, 5, 6]}), out)
    (out / "stale.txt").write_text("old run")
    result = rewrite_checkpoint(
        source, PrunePlan(experts={0: [0, 1, 2], 1: [3, 4, 5]}), out, overwrite=True
    )
    assert result.replaced is not None and str(out) in result.replaced
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert tree_digest(source) == before
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # no temp folder left


def test_user_adapter_for_an_unknown_model_type(tiny_checkpoint, tmp_path):
    """A family transformers (and mfprune) does not know: the user's TOML adapter drives it."""
    source = tmp_path / "custom"
    shutil.copytree(tiny_checkpoint("mixtral"), source)
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = "my_cartesian_moe"
    config["n_experts_custom"] = config.pop("num_local_experts")
    (source / "config.json").write_text(json.dumps(config))
    adapter = tmp_path / "my_moe.toml"
    adapter.write_text(
        """
family = "my_cartesian_moe"
model_types = ["my_cartesian_moe"]

[experts]
count_keys = ["n_experts_custom"]
router = "model.layers.{layer}.block_sparse_moe.gate.weight"
per_expert = [
  "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
  "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight",
  "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
]
"""
    )
    spec = load_spec_file(adapter)
    report = inspect_model(source, spec=spec)
    assert report.family == "my_cartesian_moe" and report.experts.experts_per_layer == 8
    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts=MIXTRAL_KEPT), out, spec=spec)
    assert config_diff(source, out) == {"n_experts_custom": (8, 4)}
    # the same tensors as a mixtral rewrite: restore the stock keys and check exactness
    config = json.loads((out / "config.json").read_text())
    config["model_type"] = "mixtral"
    config["num_local_experts"] = config.pop("n_experts_custom")
    (out / "config.json").write_text(json.dumps(config))
    assert_exact(tiny_checkpoint("mixtral"), out, experts=removed(MIXTRAL_KEPT, 8))


def test_inspect_reports_layout_and_parameter_split(tiny_checkpoint):
    report = inspect_model(tiny_checkpoint("deepseek_v3"))
    assert report.family == "deepseek_v3"
    assert report.experts.layers == [1, 2]  # first_k_dense_replace = 1
    assert (report.experts.n_group, report.experts.topk_group) == (2, 1)
    assert report.heads == 4 and report.head_pruning == "supported"
    p = report.params
    assert p["routed_experts"] == 2 * 8 * 3 * 32 * 64  # 2 layers x 8 experts x gate/up/down
    assert p["routers"] == 2 * (8 * 64 + 8)  # weight + e_score_correction_bias
    assert p["shared_experts"] == 2 * 3 * 32 * 64
    assert sum(p.values()) == sum(t.numel for t in open_checkpoint(report.path).tensors.values())
    assert inspect_model(tiny_checkpoint("olmoe")).head_pruning.startswith("OLMoE")
    jet = inspect_model(tiny_checkpoint("jetmoe"))
    assert jet.attention_experts is not None and jet.attention_experts.experts_per_layer == 4
    assert jet.params["attention_experts"] > 0

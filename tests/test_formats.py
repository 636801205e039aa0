"""Released checkpoint formats: every tensor of a kept expert follows it (renumbered, bytes
identical), nothing of a dropped expert stays, stacked tensors are sliced whatever they hold,
and a per-expert tensor that no rule covers stops the rewrite before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from checks import assert_exact, assert_experts_follow, assert_stacked_sliced, removed
from formats import (
    PACKED_FORMATS,
    experts_and_attention,
    experts_only,
    write_fp8,
    write_mxfp4,
    write_packed,
)
from safetensors.torch import load_file, save_file

from mfprune import PrunePlan, rewrite_checkpoint
from mfprune.errors import ModelError
from mfprune.inspect import inspect_model

V3_KEPT = {1: [0, 2, 5, 7], 2: [1, 3, 4, 6]}  # 2 groups of 4: keep 2 per group


@pytest.fixture(scope="module")
def fp8_v3(tiny_checkpoint, tmp_path_factory):
    """DeepSeek-V3 with FP8 8x8-block experts and attention projections."""
    out = tmp_path_factory.mktemp("fp8") / "model"
    return write_fp8(tiny_checkpoint("deepseek_v3"), out, block=8, select=experts_and_attention)


def test_fp8_block_scales_follow_their_experts_and_logits_are_exact(fp8_v3, tmp_path):
    source = fp8_v3
    tensors = load_file(source / "model.safetensors")
    scale = "model.layers.1.mlp.experts.{}.down_proj.weight_scale_inv"
    assert not torch.equal(tensors[scale.format(2)], tensors[scale.format(0)])  # not vacuous
    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts=V3_KEPT), out)
    # 4 kept experts x 3 projections x (weight, weight_scale_inv) x 2 layers
    assert assert_experts_follow(source, out, kept=V3_KEPT) == 4 * 3 * 2 * 2
    pruned = load_file(out / "model.safetensors")
    assert torch.equal(pruned[scale.format(1)], tensors[scale.format(2)])  # expert 2 is now 1
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [8, 8]
    assert_exact(source, out, experts=removed(V3_KEPT, 8))  # transformers dequantizes on CPU


def _with_extra(source, tmp_path, extra: dict[str, torch.Tensor]):
    import shutil

    out = tmp_path / "src"
    shutil.copytree(source, out)
    tensors = load_file(out / "model.safetensors")
    save_file({**tensors, **extra}, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    "name, shape",
    [
        ("model.layers.1.mlp.experts.global_scale", [1]),  # expert module, no expert axis
        ("model.layers.1.mlp.gate.bias", [8]),  # router module, not in the adapter
        ("model.layers.1.mlp.expert_bias", [8]),  # MoE block, leading axis = experts
        ("model.layers.1.self_attn.experts.3.scale", [4]),  # an expert's name elsewhere
    ],
)
def test_an_uncovered_per_expert_tensor_stops_the_rewrite(name, shape, tiny_checkpoint, tmp_path):
    source = _with_extra(tiny_checkpoint("deepseek_v3"), tmp_path, {name: torch.ones(shape)})
    out = tmp_path / "pruned"
    with pytest.raises(ModelError, match=rf"no adapter rule covers them: {name} \{shape}"):
        rewrite_checkpoint(source, PrunePlan(experts=V3_KEPT), out)
    assert not out.exists()
    assert not any(p.name.startswith(".pruned") for p in tmp_path.iterdir())


def test_uncovered_tensors_of_an_unpruned_layer_are_copied(tiny_checkpoint, tmp_path):
    name = "model.layers.2.mlp.experts.global_scale"
    source = _with_extra(tiny_checkpoint("deepseek_v3"), tmp_path, {name: torch.ones(1)})
    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts={1: V3_KEPT[1]}), out, allow_uneven=True)
    assert torch.equal(load_file(out / "model.safetensors")[name], torch.ones(1))


def test_unlisted_stacked_tensors_with_an_expert_axis_are_sliced(tiny_checkpoint, tmp_path):
    kept = {0: [0, 1, 2, 7], 1: [2, 3, 5, 6]}
    zeros = {
        f"model.layers.{L}.mlp.experts.gate_up_proj_zero_point": torch.arange(8 * 3).reshape(8, 3)
        for L in (0, 1)
    }
    source = _with_extra(tiny_checkpoint("gpt_oss"), tmp_path, zeros)
    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts=kept), out)
    assert_stacked_sliced(
        source, out, kept=kept, names=["model.layers.{layer}.mlp.experts.gate_up_proj_zero_point"]
    )


# ------------------------------------------------------------------ formats, one by one

QWEN_KEPT = {0: [1, 2, 3, 4, 5], 1: [0, 2, 4, 6, 7]}


@pytest.mark.parametrize("fmt", sorted(PACKED_FORMATS))
def test_packed_formats_follow_their_experts(fmt, tiny_checkpoint, tmp_path):
    source = write_packed(tiny_checkpoint("qwen3_moe"), tmp_path / "src", fmt)
    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts=QWEN_KEPT), out)
    per_module = len(PACKED_FORMATS[fmt][0])
    assert assert_experts_follow(source, out, kept=QWEN_KEPT) == 5 * 3 * per_module * 2
    before = json.loads((source / "config.json").read_text())["quantization_config"]
    after = json.loads((out / "config.json").read_text())
    assert after["quantization_config"] == before
    assert after["num_local_experts"] == 5
    assert inspect_model(out).weight_format.name == inspect_model(source).weight_format.name


def test_mxfp4_blocks_and_scales_are_sliced_and_logits_are_exact(tiny_checkpoint, tmp_path):
    source = write_mxfp4(tiny_checkpoint("gpt_oss"), tmp_path / "src")
    kept = {0: [0, 1, 2, 7], 1: [2, 3, 5, 6]}
    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts=kept), out)
    names = [
        f"model.layers.{{layer}}.mlp.experts.{p}_{part}"
        for p in ("gate_up_proj", "down_proj")
        for part in ("blocks", "scales", "bias")
    ]
    assert_stacked_sliced(
        source, out, kept=kept, names=[*names, "model.layers.{layer}.mlp.router.bias"]
    )
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"]
        == "mxfp4"
    )
    assert_exact(source, out, experts=removed(kept, 8))  # transformers dequantizes on CPU


def test_quantization_config_module_names_are_renumbered(tiny_checkpoint, tmp_path):
    ignored = {
        "model.layers.1.mlp.experts.2.up_proj",  # kept: becomes expert 1
        "model.layers.1.mlp.experts.3.down_proj",  # dropped
        "model.layers.0.mlp.experts.3.down_proj",  # kept in layer 0: becomes expert 2
    }
    source = write_packed(
        tiny_checkpoint("qwen3_moe"),
        tmp_path / "src",
        "compressed-tensors",
        select=lambda n, t: experts_only(n, t) and n.removesuffix(".weight") not in ignored,
        ignore=["lm_head", "re:.*mlp.gate$", *sorted(ignored)],
    )
    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts=QWEN_KEPT), out)
    assert_experts_follow(source, out, kept=QWEN_KEPT)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == [
        "lm_head",
        "re:.*mlp.gate$",
        "model.layers.0.mlp.experts.2.down_proj",
        "model.layers.1.mlp.experts.1.up_proj",
    ]
    tensors = load_file(out / "model.safetensors")
    assert "model.layers.1.mlp.experts.1.up_proj.weight" in tensors  # the unquantized one


def test_a_pattern_naming_a_pruned_expert_is_refused(tiny_checkpoint, tmp_path):
    source = write_packed(
        tiny_checkpoint("qwen3_moe"),
        tmp_path / "src",
        "gptq",
        dynamic={r"-:model\.layers\.1\.mlp\.experts\.3\..*": {}},
    )
    out = tmp_path / "pruned"
    with pytest.raises(ModelError, match=r"quantization_config.dynamic .* names expert 3"):
        rewrite_checkpoint(source, PrunePlan(experts=QWEN_KEPT), out)
    assert not out.exists()
    # the same pattern on a layer the plan keeps whole is carried over
    rewrite_checkpoint(source, PrunePlan(experts={0: QWEN_KEPT[0]}), out, allow_uneven=True)


def test_fp8_heads_are_sliced_with_their_block_scales_when_blocks_align(fp8_v3, tmp_path):
    heads = {1: [0, 2, 3], 2: [0, 1, 3], 0: [1, 2, 3]}
    out = tmp_path / "pruned"
    rewrite_checkpoint(fp8_v3, PrunePlan(heads=heads, experts=V3_KEPT), out)
    tensors = load_file(out / "model.safetensors")
    # kv_b_proj: 4 heads x (8 nope + 16 v) rows, 8-row blocks: 3 heads keep 9 of 12 scale rows
    assert tensors["model.layers.1.self_attn.kv_b_proj.weight_scale_inv"].shape[0] == 9
    assert_exact(fp8_v3, out, heads=removed(heads, 4), experts=removed(V3_KEPT, 8))


def test_fp8_heads_that_split_a_block_are_refused_with_the_numbers(tiny_checkpoint, tmp_path):
    source = write_fp8(
        tiny_checkpoint("deepseek_v3"), tmp_path / "src", block=16, select=experts_and_attention
    )
    out = tmp_path / "pruned"
    with pytest.raises(ModelError, match=r"kv_b_proj.weight has 24 elements per head .* 16 wide"):
        rewrite_checkpoint(source, PrunePlan(heads={0: [0, 1, 2], 1: [0, 1, 2], 2: [0, 1, 2]}), out)
    assert not out.exists()


def test_packed_attention_weights_refuse_head_pruning(tiny_checkpoint, tmp_path):
    source = write_packed(
        tiny_checkpoint("qwen3_moe"), tmp_path / "src", "awq", select=experts_and_attention
    )
    out = tmp_path / "pruned"
    with pytest.raises(ModelError, match=r"cannot slice model.layers.0.self_attn.q_proj: it is"):
        rewrite_checkpoint(source, PrunePlan(heads={0: [1, 3], 1: [1, 3]}), out)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda s, o: write_fp8(s("deepseek_v3"), o, block=8), "fp8-block"),
        (lambda s, o: write_mxfp4(s("gpt_oss"), o), "mxfp4"),
        (lambda s, o: write_packed(s("qwen3_moe"), o, "compressed-tensors"), "compressed-tensors"),
        (
            lambda s, o: write_packed(s("qwen3_moe"), o, "compressed-tensors-fp8"),
            "compressed-tensors",
        ),
        (lambda s, o: write_packed(s("qwen3_moe"), o, "gptq"), "gptq"),
        (lambda s, o: write_packed(s("qwen3_moe"), o, "awq"), "awq"),
        (lambda s, o: s("mixtral"), "unquantized"),
    ],
)
def test_inspect_reports_the_format(make, expected, tiny_checkpoint, tmp_path):
    report = inspect_model(make(tiny_checkpoint, tmp_path / "m"))
    assert report.weight_format.name == expected
    assert report.to_dict()["weight_format"]["description"]

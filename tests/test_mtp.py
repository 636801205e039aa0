"""Multi-token-prediction layers (DeepSeek-V3 ``num_nextn_predict_layers``): a whole MoE layer
at index num_hidden_layers that transformers ignores and servers load for speculative decoding.
It is pruned to the config's count (by default like the last decoder layer), or removed with
the config updated when asked."""

from __future__ import annotations

import json
import shutil
from importlib import resources

import pytest
import torch
from checks import assert_exact, assert_experts_follow, removed
from safetensors.torch import load_file, save_file

from mfprune import PrunePlan, rewrite_checkpoint
from mfprune.arch import load_spec_file
from mfprune.errors import ModelError, PlanError
from mfprune.inspect import inspect_model

KEPT = {1: [0, 2, 5, 7], 2: [1, 3, 4, 6]}
MTP = 3  # num_hidden_layers of the tiny DeepSeek-V3


def _add_mtp(source, out, *, n_mtp: int = 1):
    """Copy ``source`` with an MTP layer 3: layer 2's tensors (perturbed) plus the MTP parts."""
    shutil.copytree(source, out)
    tensors = load_file(out / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    for name, t in list(tensors.items()):
        if name.startswith("model.layers.2."):
            noise = torch.randn(t.shape, generator=g) * 0.01
            tensors[name.replace("layers.2.", f"layers.{MTP}.")] = (t + noise).contiguous()
    d, v = tensors["model.embed_tokens.weight"].shape[1], tensors["lm_head.weight"].shape[0]
    for part, shape in {
        "enorm.weight": [d],
        "hnorm.weight": [d],
        "eh_proj.weight": [d, 2 * d],
        "embed_tokens.weight": [v, d],
        "shared_head.norm.weight": [d],
        "shared_head.head.weight": [v, d],
    }.items():
        tensors[f"model.layers.{MTP}.{part}"] = torch.randn(shape, generator=g)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["num_nextn_predict_layers"] = n_mtp
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def with_mtp(tiny_checkpoint, tmp_path_factory):
    return _add_mtp(tiny_checkpoint("deepseek_v3"), tmp_path_factory.mktemp("mtp") / "model")


def test_mtp_layer_keeps_the_configs_count_like_the_last_layer(with_mtp, tmp_path):
    out = tmp_path / "pruned"
    rewrite_checkpoint(with_mtp, PrunePlan(experts=KEPT), out)
    expected = {**KEPT, MTP: KEPT[2]}
    assert assert_experts_follow(with_mtp, out, kept=expected) == 4 * 3 * 3
    tensors = load_file(out / "model.safetensors")
    source = load_file(with_mtp / "model.safetensors")
    assert tensors[f"model.layers.{MTP}.mlp.gate.weight"].shape[0] == 4
    bias = f"model.layers.{MTP}.mlp.gate.e_score_correction_bias"
    assert torch.equal(tensors[bias], source[bias][KEPT[2]])
    assert torch.equal(
        tensors[f"model.layers.{MTP}.eh_proj.weight"], source[f"model.layers.{MTP}.eh_proj.weight"]
    )
    config = json.loads((out / "config.json").read_text())
    assert (config["n_routed_experts"], config["num_nextn_predict_layers"]) == (4, 1)
    plan = PrunePlan.load(out / "mfprune_plan.json")
    assert plan.experts[MTP] == tuple(KEPT[2]) and "MTP" in plan.meta["mtp"]
    assert_exact(with_mtp, out, experts=removed(KEPT, 8), allow_unexpected=True)


def test_a_plan_can_name_the_mtp_layer(with_mtp, tmp_path):
    out = tmp_path / "pruned"
    rewrite_checkpoint(with_mtp, PrunePlan(experts={**KEPT, MTP: [0, 1, 4, 5]}), out)
    assert_experts_follow(with_mtp, out, kept={**KEPT, MTP: [0, 1, 4, 5]})
    with pytest.raises(PlanError, match=r"experts\[3\]: the multi-token-prediction layer keeps 6"):
        rewrite_checkpoint(with_mtp, PrunePlan(experts={**KEPT, MTP: [0, 1, 2, 4, 5, 6]}), out)


def test_mtp_heads_follow_the_last_layer(with_mtp, tmp_path):
    heads = {0: [1, 2, 3], 1: [0, 2, 3], 2: [0, 1, 3]}
    out = tmp_path / "pruned"
    rewrite_checkpoint(with_mtp, PrunePlan(heads=heads), out)
    tensors = load_file(out / "model.safetensors")
    width = 8 + 16  # qk_nope_head_dim + v_head_dim
    assert tensors[f"model.layers.{MTP}.self_attn.kv_b_proj.weight"].shape[0] == 3 * width
    assert tensors[f"model.layers.{MTP}.self_attn.o_proj.weight"].shape[1] == 3 * 16


def test_drop_mtp_removes_the_layer_and_says_so_in_the_config(with_mtp, tmp_path):
    out = tmp_path / "pruned"
    result = rewrite_checkpoint(with_mtp, PrunePlan(experts=KEPT), out, drop_mtp=True)
    assert not [
        n for n in load_file(out / "model.safetensors") if n.startswith(f"model.layers.{MTP}.")
    ]
    config = json.loads((out / "config.json").read_text())
    assert (config["n_routed_experts"], config["num_nextn_predict_layers"]) == (4, 0)
    assert result.config_changes["num_nextn_predict_layers"] == [1, 0]
    assert_exact(with_mtp, out, experts=removed(KEPT, 8))  # no unexpected keys left


def test_drop_mtp_is_refused_where_it_does_nothing_or_contradicts_the_plan(
    with_mtp, tiny_checkpoint, tmp_path
):
    out = tmp_path / "pruned"
    with pytest.raises(PlanError, match="has no multi-token-prediction layers"):
        rewrite_checkpoint(
            tiny_checkpoint("deepseek_v3"), PrunePlan(experts=KEPT), out, drop_mtp=True
        )
    with pytest.raises(PlanError, match=r"removes MTP layer\(s\) \[3\], but the plan prunes them"):
        rewrite_checkpoint(with_mtp, PrunePlan(experts={**KEPT, MTP: KEPT[2]}), out, drop_mtp=True)
    assert not out.exists()


def test_a_router_beyond_the_layers_the_config_names_is_refused(tiny_checkpoint, tmp_path):
    source = _add_mtp(tiny_checkpoint("deepseek_v3"), tmp_path / "src", n_mtp=0)
    with pytest.raises(ModelError, match=r"num_hidden_layers = 3 and no MTP layers but the weig"):
        rewrite_checkpoint(source, PrunePlan(experts=KEPT), tmp_path / "pruned")
    with pytest.raises(ModelError, match="an MTP / extra layer the adapter does not describe"):
        inspect_model(source)


def test_an_adapter_that_does_not_know_the_mtp_key_is_refused(with_mtp, tmp_path):
    builtin = resources.files("mfprune.arch").joinpath("families", "deepseek_v3.toml")
    text = builtin.read_text("utf-8").replace('mtp_layers_key = "num_nextn_predict_layers"', "")
    adapter = tmp_path / "no_mtp.toml"
    adapter.write_text(text)
    spec = load_spec_file(adapter)
    with pytest.raises(ModelError, match=r"weights hold 4 layers"):
        rewrite_checkpoint(with_mtp, PrunePlan(experts=KEPT), tmp_path / "pruned", spec=spec)
    assert not (tmp_path / "pruned").exists()


def test_inspect_reports_mtp_layers(with_mtp):
    report = inspect_model(with_mtp)
    assert report.mtp_layers == [MTP]


def _last_layer_as_mtp(tiny, source, config_path: str = ""):
    """A copy of ``tiny`` whose last decoder layer (2) is also stored as the MTP layer
    model.layers.{MTP}.*, with num_nextn_predict_layers = 1 (under ``config_path``)."""
    shutil.copytree(tiny, source)
    tensors = load_file(source / "model.safetensors")
    for name, t in list(tensors.items()):
        if name.startswith("model.layers.2."):
            tensors[name.replace("layers.2.", f"layers.{MTP}.")] = t.clone()
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    (config[config_path] if config_path else config)["num_nextn_predict_layers"] = 1
    (source / "config.json").write_text(json.dumps(config))
    return source


def test_step3p7_mtp_layers_under_text_config_follow_the_last_layer(tiny_checkpoint, tmp_path):
    """Step 3.7 Flash appends its MTP layers as model.layers.N.* (num_nextn_predict_layers in
    text_config); transformers ignores them on load. They keep the last MoE layer's experts."""
    source = _last_layer_as_mtp(tiny_checkpoint("step3p7"), tmp_path / "src", "text_config")
    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts=KEPT), out)
    assert_experts_follow(source, out, kept={**KEPT, MTP: KEPT[2]})
    pruned = load_file(out / "model.safetensors")
    assert pruned[f"model.layers.{MTP}.moe.gate.weight"].shape[0] == 4
    assert pruned[f"model.layers.{MTP}.moe.router_bias"].shape == (4,)
    assert json.loads((out / "config.json").read_text())["text_config"]["n_routed_experts"] == 4
    assert_exact(source, out, experts=removed(KEPT, 8), allow_unexpected=True)
    dropped = tmp_path / "dropped"
    rewrite_checkpoint(source, PrunePlan(experts=KEPT), dropped, drop_mtp=True)
    config = json.loads((dropped / "config.json").read_text())["text_config"]
    assert (config["n_routed_experts"], config["num_nextn_predict_layers"]) == (4, 0)
    assert_exact(source, dropped, experts=removed(KEPT, 8))  # no unexpected keys left


@pytest.mark.parametrize(
    ("family", "count_key"), [("glm4_moe", "n_routed_experts"), ("bailing_hybrid", "num_experts")]
)
def test_deepseek_style_mtp_layers_of_other_families_follow_the_last_layer(
    family, count_key, tiny_checkpoint, tmp_path
):
    """GLM-4.5 and Bailing hybrid store their MTP layers as model.layers.N.* after the last
    decoder layer (num_nextn_predict_layers), as transformers' MtpModel reads them."""
    source = _last_layer_as_mtp(tiny_checkpoint(family), tmp_path / "src")
    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts=KEPT), out)
    assert_experts_follow(source, out, kept={**KEPT, MTP: KEPT[2]})
    assert load_file(out / "model.safetensors")[f"model.layers.{MTP}.mlp.gate.weight"].shape[0] == 4
    config = json.loads((out / "config.json").read_text())
    assert (config[count_key], config["num_nextn_predict_layers"]) == (4, 1)
    assert_exact(source, out, experts=removed(KEPT, 8), allow_unexpected=True)
    dropped = tmp_path / "dropped"
    rewrite_checkpoint(source, PrunePlan(experts=KEPT), dropped, drop_mtp=True)
    assert json.loads((dropped / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert_exact(source, dropped, experts=removed(KEPT, 8))

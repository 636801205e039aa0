"""The oracle for every routing rule: routers found from the adapter (through transformers'
key renamings), the selection bias masked wherever the family keeps it, the eager experts
where CPU grouped_mm refuses a shape, and `prune --verify` with the user's adapter."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from checks import assert_exact, load, removed
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from mfprune import PrunePlan, rewrite_checkpoint
from mfprune.arch import load_spec_file
from mfprune.cli import app
from mfprune.oracle import logits, masked_logits, sample_ids

MIXTRAL_KEPT = {0: [0, 2, 5, 7], 1: [1, 3, 4, 6]}

# ERNIE 4.5 selects on softmax(logits) + a bias kept in `mlp.moe_statics` (on disk) /
# `mlp.gate.moe_statics` (loaded), shaped [1, E]: masking the logits alone is not enough.
ERNIE_ADAPTER = """
family = "ernie_test"
model_types = ["ernie4_5_moe"]
[experts]
count_keys = ["moe_num_experts"]
top_k_key = "moe_k"
router = "model.layers.{layer}.mlp.gate.weight"
per_expert = [
  "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
  "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",
  "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",
]
selection = "biased_score"
selection_bias = "model.layers.{layer}.mlp.moe_statics.e_score_correction_bias"
stacked = [{ name = "model.layers.{layer}.mlp.moe_statics.e_score_correction_bias", axis = 1 }]
[heads]
tensors = []
"""


@pytest.fixture(scope="module")
def ernie(tmp_path_factory):
    root = tmp_path_factory.mktemp("ernie")
    config = AutoConfig.for_model(
        "ernie4_5_moe",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        moe_num_experts=8,
        moe_k=2,
        moe_layer_start_index=0,
        moe_num_shared_experts=0,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = layer.mlp.gate
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=g))
            bias = gate.moe_statics.e_score_correction_bias
            bias.copy_(torch.rand(bias.shape, generator=g) * 0.5)  # softmax scores are < 1
    model.save_pretrained(root / "model")
    adapter = root / "ernie.toml"
    adapter.write_text(ERNIE_ADAPTER)
    return root / "model", adapter


def test_a_bias_kept_off_the_router_is_masked_and_verify_takes_the_users_adapter(ernie, tmp_path):
    source, adapter = ernie
    plan = tmp_path / "plan.json"
    PrunePlan(experts=MIXTRAL_KEPT).save(plan)
    out = tmp_path / "pruned"
    args = ["prune", source, "--plan", plan, "--out", out, "--arch", adapter, "--verify"]
    result = CliRunner().invoke(app, [*map(str, args), "--format", "json"])
    assert result.exit_code == 0, result.output + result.stderr
    check = json.loads(result.stdout)["verify"]
    assert check["exact"] and check["max_abs_diff"] <= 1e-5 and check["masking_effect"] > 1e-4
    # the control: masking the logits alone lets the bias pick pruned experts
    spec = load_spec_file(adapter)
    logits_only = replace(spec, experts=replace(spec.experts, selection="logits"))
    original, _ = load(source)
    pruned, _ = load(out)
    ids = sample_ids(128, batch=2, seq=24)
    wrong = masked_logits(original, ids, experts=removed(MIXTRAL_KEPT, 8), spec=logits_only)
    assert (wrong - logits(pruned, ids)).abs().max().item() > 1e-3


def test_routers_are_found_without_their_class_names(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("mixtral")
    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts=MIXTRAL_KEPT), out)
    original, _ = load(source)
    for layer in original.model.layers:  # a class name no pattern knows
        gate = layer.mlp.gate
        gate.__class__ = type("Chooser", (type(gate),), {})
    ids = sample_ids(128, batch=2, seq=24)
    reference = masked_logits(original, ids, experts=removed(MIXTRAL_KEPT, 8))
    pruned, _ = load(out)
    assert (logits(pruned, ids) - reference).abs().max().item() <= 1e-5


def test_shapes_grouped_mm_refuses_fall_back_to_eager_experts(tiny_checkpoint, tmp_path):
    odd = {"hidden_size": 37, "intermediate_size": 37, "head_dim": 16}
    source = tiny_checkpoint("mixtral", **odd)
    model, _ = load(source)
    assert model.config._experts_implementation == "grouped_mm"
    refusal = pytest.raises(RuntimeError, match="strides should be multiple of 16 bytes")
    with refusal, torch.no_grad():
        model(input_ids=sample_ids(128))
    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts=MIXTRAL_KEPT), out)
    assert_exact(source, out, experts=removed(MIXTRAL_KEPT, 8))


def test_llama4_heads_are_its_text_models_and_its_logits_come_from_its_language_model(
    tiny_checkpoint,
):
    from mfprune.modules import find_o_projs

    model, _ = load(tiny_checkpoint("llama4"))
    text = model.language_model.model.layers
    # the vision tower's layer 0 also has self_attn.o_proj; only the text model's count
    assert find_o_projs(model) == {i: layer.self_attn.o_proj for i, layer in enumerate(text)}
    ids = sample_ids(128, batch=2, seq=8)
    with pytest.raises(AttributeError, match="image_outputs"), torch.no_grad():
        model(input_ids=ids)  # the composite's own forward fails in transformers 5.24
    with torch.no_grad():
        want = model.language_model(input_ids=ids).logits
    assert torch.equal(logits(model, ids), want)


def test_a_token_classifier_loads_with_its_own_class_and_verifies(tmp_path):
    from transformers import MixtralForTokenClassification

    from mfprune import tinymodels
    from mfprune.verify import verify_rewrite

    torch.manual_seed(0)
    model = MixtralForTokenClassification(tinymodels.make_config("mixtral", num_labels=5))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    model.save_pretrained(tmp_path / "src")
    out = tmp_path / "pruned"
    rewrite_checkpoint(tmp_path / "src", PrunePlan(experts=MIXTRAL_KEPT), out)
    check = verify_rewrite(tmp_path / "src", out)
    assert check.exact and check.masking_effect > 1e-4


def test_a_mask_that_never_reaches_the_logits_is_an_error(tiny_checkpoint, monkeypatch):
    """LongCat's router multiplies by ``classifier.weight`` itself and never calls the Linear:
    a hook on that Linear would leave the reference unmasked. The oracle masks at the router
    (mfprune.modules._logits_module); forced onto the Linear, it must refuse, not pass."""
    import mfprune.modules as modules

    source = tiny_checkpoint("longcat_flash")
    model = load(source)[0]
    ids = sample_ids(model.config.vocab_size, batch=1, seq=8)
    masked_logits(model, ids, experts={0: [1, 3]})  # found at the router: applied
    monkeypatch.setattr(modules, "_logits_module", lambda m, name: (name, m.get_submodule(name)))
    with pytest.raises(RuntimeError, match=r"mask on .*classifier was never applied"):
        masked_logits(model, ids, experts={0: [1, 3]})

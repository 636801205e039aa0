"""The exactness oracle for every family: rewrite, load in stock transformers, compare logits
with the original model whose pruned experts / heads are masked."""

from __future__ import annotations

import json

import pytest
import torch
from checks import assert_exact, assert_tensors_are_slices, config_diff, removed

from mfprune import PrunePlan, rewrite_checkpoint
from mfprune.checkpoint import open_checkpoint
from mfprune.errors import PlanError
from mfprune.oracle import logits, masked_logits, sample_ids


def _half(*layers: int) -> dict[int, list[int]]:
    """Keep 4 of 8 experts in each MoE layer, a different half each time; 2 per group of 4,
    so group-limited routers (2 groups) stay feasible."""
    halves = ([0, 2, 5, 7], [1, 3, 4, 6])
    return {layer: halves[i % 2] for i, layer in enumerate(layers)}


# tiny model -> (kept experts per MoE layer, the config key holding the count)
EXPERT_CASES = {
    "mixtral": ({0: [0, 2, 5, 7], 1: [1, 3, 4, 6]}, "num_local_experts"),
    "qwen2_moe": ({0: [0, 1, 2, 7], 1: [3, 4, 5, 6]}, "num_experts"),
    "qwen3_moe": ({0: [1, 2, 3, 4, 5], 1: [0, 2, 4, 6, 7]}, "num_local_experts"),
    "olmoe": ({0: [0, 2, 5], 1: [1, 6, 7]}, "num_experts"),
    "deepseek_v2": ({1: [0, 2, 5, 7], 2: [1, 3, 4, 6]}, "n_routed_experts"),
    # V3: 2 groups of 4, group score = top-2 sum: keep 2 per group
    "deepseek_v3": ({1: [0, 2, 5, 7], 2: [1, 3, 4, 6]}, "n_routed_experts"),
    "gpt_oss": ({0: [0, 1, 2, 7], 1: [2, 3, 5, 6]}, "num_local_experts"),
    "granitemoe": ({0: [0, 2, 5, 7], 1: [1, 3, 4, 6]}, "num_local_experts"),
    "phimoe": ({0: [0, 2, 5, 7], 1: [1, 3, 4, 6]}, "num_local_experts"),
    # V3 routing (sigmoid + correction bias, groups), first layer dense
    "glm4_moe": (_half(1, 2), "n_routed_experts"),
    "dots1": (_half(1, 2), "n_routed_experts"),
    "solar_open": (_half(0, 1, 2), "n_routed_experts"),
    "sarvam_moe": (_half(1, 2), "n_routed_experts"),  # bias saved as gate.expert_bias
    "sarvam_mla": (_half(1, 2), "n_routed_experts"),  # the deepseek_v3 adapter
    "deepseek_v32": (_half(1, 2), "n_routed_experts"),  # MoE layers from mlp_layer_types
    "glm_moe_dsa": (_half(1, 2), "n_routed_experts"),
    "glm4_moe_lite": (_half(1, 2), "n_routed_experts"),  # MLA; mlp_layer_types
    "mimo_v2_flash": (_half(1, 2), "n_routed_experts"),
    # softmax / top-k routers
    "minimax": (_half(0, 1), "num_local_experts"),
    "flex_olmo": (_half(0, 1), "num_experts"),
    "mellum": (_half(0, 1), "num_local_experts"),
    "cohere2_moe": (_half(1, 2), "num_experts"),  # MoE layers from mlp_layer_types
    "jamba": (_half(0, 2), "num_experts"),  # MoE every 2nd layer from offset 0
    "granitemoeshared": (_half(0, 1), "num_local_experts"),
    "granitemoehybrid": (_half(0, 1), "num_local_experts"),
    "granitemoe_swa": (_half(0, 1), "num_local_experts"),
    "lara_mini": (_half(0, 1), "num_experts"),
    "qwen3_next": (_half(0, 1), "num_experts"),
    # selection bias off the router module: masked there by the oracle
    "ernie4_5_moe": (_half(1, 2), "moe_num_experts"),  # bias in mlp.moe_statics, [1, E]
    "exaone_moe": (_half(1, 2), "num_experts"),  # bias on the MoE block; groups
    "minimax_m2": (_half(0, 1), "num_local_experts"),  # bias on the MoE block
    "lfm2_moe": (_half(1, 2), "num_experts"),  # bias on the MoE block; conv layer 1
    "afmoe": (_half(1, 2), "num_experts"),  # bias on the MoE block; router.gate child
    "hunyuan_v1_moe": (_half(0, 1), "num_experts"),  # router gate.wg
    "kolibri1": (_half(0, 1), "num_local_experts"),  # bias saved as moe.router.expert_bias
    "llama4_text": (_half(1, 3), "num_local_experts"),  # MoE layers from moe_layers
    "gemma4_text": (_half(0, 1), "num_experts"),  # router on the layer, per-expert scale
}


@pytest.mark.parametrize("family", sorted(EXPERT_CASES))
def test_expert_pruning_is_exact(family, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    kept, count_key = EXPERT_CASES[family]
    out = tmp_path / "pruned"
    result = rewrite_checkpoint(source, PrunePlan(experts=kept), out)
    assert_exact(source, out, experts=removed(kept, 8))
    assert_tensors_are_slices(source, out, experts=kept)
    n = len(next(iter(kept.values())))
    assert config_diff(source, out) == {count_key: (8, n)}
    assert result.tensors_sliced > 0
    assert result.out_bytes < result.source_bytes
    assert (out / "mfprune_plan.json").is_file()
    assert PrunePlan.load(out / "mfprune_plan.json").experts == {
        k: tuple(v) for k, v in kept.items()
    }


def test_jetmoe_mlp_and_attention_experts_are_exact(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("jetmoe")
    kept_mlp, kept_att = {0: [0, 1, 3], 1: [1, 2, 3]}, {0: [0, 2, 3], 1: [0, 1, 2]}
    out = tmp_path / "pruned"
    plan = PrunePlan(experts=kept_mlp, attention_experts=kept_att)
    rewrite_checkpoint(source, plan, out)
    assert_exact(source, out, experts=removed(kept_mlp, 4), attention_experts=removed(kept_att, 4))
    assert config_diff(source, out) == {"num_local_experts": (4, 3)}


# family -> kept query heads per layer (4 heads; KV heads from the tiny config)
HEAD_CASES = {
    "qwen3_moe": ({0: [1, 3], 1: [0, 2]}, {}),  # GQA 4/2: one query head per KV group
    "mixtral": ({0: [0, 1], 1: [2, 3]}, {}),  # GQA: a whole KV group goes
    "gpt_oss": ({0: [0, 2], 1: [1, 3]}, {}),  # per-head attention sinks are sliced too
    "deepseek_v3": ({1: [0, 2, 3], 2: [0, 1, 3], 0: [1, 2, 3]}, {}),  # MLA, KV heads == heads
    "qwen2_moe": ({0: [0, 1], 1: [0, 1]}, {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}),  # q/k/v biases
    "glm4_moe": ({0: [0, 1], 1: [0, 1], 2: [2, 3]}, _half(1, 2)),
    "dots1": ({0: [1, 3], 1: [0, 2], 2: [0, 3]}, {}),  # per-head-dim q/k norms
    "deepseek_v32": ({0: [1, 2, 3], 1: [0, 1, 3], 2: [0, 1, 2]}, _half(1, 2)),  # MLA + indexer
    "granitemoe_swa": ({0: [0, 2], 1: [1, 3]}, {}),  # sinks
    "glm4_moe_lite": ({0: [1, 2, 3], 1: [0, 1, 3], 2: [0, 1, 2]}, _half(1, 2)),  # MLA
    # hybrids: heads only in the softmax-attention layers
    "qwen3_next": ({1: [1, 3]}, {}),  # layer 0: Gated DeltaNet; q_proj rows = query + gate
    "jamba": ({1: [0, 1], 3: [2, 3]}, _half(0, 2)),  # layers 0, 2: Mamba
    "granitemoehybrid": ({1: [1, 2]}, {}),  # layer 0: Mamba-2
    "lara_mini": ({1: [0, 3]}, {}),  # layer 0: linear attention
    "ernie4_5_moe": ({0: [0, 1], 1: [0, 1], 2: [0, 1], 3: [2, 3]}, _half(1, 2)),
    "afmoe": ({0: [0, 2], 1: [1, 3], 2: [0, 3]}, {}),  # per-head output gate (gate_proj)
    "exaone_moe": ({0: [1, 3], 1: [0, 2], 2: [0, 3]}, _half(1, 2)),
    "llama4_text": ({0: [1, 3], 1: [0, 2], 2: [1, 2], 3: [0, 3]}, _half(1, 3)),
}


@pytest.mark.parametrize("family", sorted(HEAD_CASES))
def test_head_pruning_is_exact(family, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    heads, experts = HEAD_CASES[family]
    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts=experts, heads=heads), out)
    assert_exact(source, out, heads=removed(heads, 4), experts=removed(experts, 8) or None)
    assert_tensors_are_slices(source, out, experts=experts)
    diff = config_diff(source, out)
    assert diff["num_attention_heads"] == (4, len(next(iter(heads.values()))))


@pytest.mark.parametrize(
    ("family", "layer", "kind"),
    [("qwen3_next", 0, "linear_attention"), ("lara_mini", 0, "linear_attention"), ("jamba", 0, "")],
)
def test_heads_in_a_layer_without_attention_are_refused(
    family, layer, kind, tiny_checkpoint, tmp_path
):
    source = tiny_checkpoint(family)
    with pytest.raises(
        PlanError, match=f"heads\\[{layer}\\]: layer {layer} has no attention heads"
    ) as err:
        rewrite_checkpoint(source, PrunePlan(heads={layer: [0, 2]}), tmp_path / "out")
    if kind:
        assert f"(a '{kind}' layer)" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_minimax_heads_are_refused_with_the_reason(tiny_checkpoint, tmp_path):
    # its linear-attention layers also read num_attention_heads: pruning heads is not exact
    with pytest.raises(PlanError, match="lightning-attention layers take their head count"):
        rewrite_checkpoint(tiny_checkpoint("minimax"), PrunePlan(heads={0: [0, 2]}), tmp_path / "o")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_uneven_expert_counts_load_with_mfprune_and_are_exact(family, tiny_checkpoint, tmp_path):
    from checks import load

    import mfprune

    source = tiny_checkpoint(family)
    kept = {
        "mixtral": {0: [0, 2, 5], 1: [1, 3, 4, 6, 7]},
        "qwen2_moe": {0: [0, 1], 1: [3, 4, 5, 6, 7]},
        "deepseek_v3": {1: [0, 2, 5, 7], 2: [0, 1, 2, 5, 6, 7]},
        "gpt_oss": {0: [0, 1, 2, 7], 1: [2, 3]},
    }[family]
    out = tmp_path / "pruned"
    with pytest.raises(PlanError, match="allow-uneven"):
        rewrite_checkpoint(source, PrunePlan(experts=kept), out)
    rewrite_checkpoint(source, PrunePlan(experts=kept), out, allow_uneven=True)
    counts = json.loads((out / "config.json").read_text())["mfprune_expert_counts"]
    assert counts == {str(k): len(v) for k, v in kept.items()}
    model = mfprune.load_pretrained(out, dtype=torch.float32).eval()
    original, _ = load(source)
    ids = sample_ids(original.config.vocab_size, batch=2, seq=24)
    reference = masked_logits(original, ids, experts=removed(kept, 8))
    assert (logits(model, ids) - reference).abs().max().item() <= 1e-5
    assert (reference - logits(original, ids)).abs().max().item() > 1e-4


# composite models (vision + text): counts under text_config, weights under the language
# model's prefix, the tower carried over byte for byte.
# family -> (count key, the tower's prefix, kept heads, the MoE layers)
COMPOSITE_CASES = {
    "qwen3_vl_moe": ("num_local_experts", "model.visual.", {0: [1, 3], 1: [0, 2]}, (0, 1)),
    # layer 0 is Gated DeltaNet: heads only in layer 1
    "qwen3_5_moe": ("num_experts", "model.visual.", {1: [1, 3]}, (0, 1)),
    # GLM-4.5V: V3 routing with groups, first layer dense, q/k/v biases
    "glm4v_moe": ("n_routed_experts", "model.visual.", {0: [0, 2], 1: [1, 3], 2: [0, 3]}, (1, 2)),
    # MoE in layers 1 and 3; the vision tower's layers have self_attn.{q,k,v,o}_proj too
    # DeepSeek-V3 language model: MLA (KV heads == heads), groups, first layer dense
    "kimi_k25": ("n_routed_experts", "vision_tower.", {0: [0, 1], 1: [1, 3], 2: [0, 2]}, (1, 2)),
    # heads refused (NoPE layers widen wkv_b's per-head slice); consolidated names layers.N.*
    "mistral_large4": ("n_routed_experts", "vision_encoder.", {}, (1, 2)),
    # MLA heads in layer 1 only (layers 0 and 2: linear attention); layer 0 dense
    "glm5_next": ("n_routed_experts", "model.visual.", {1: [1, 2]}, (1, 2)),
    # router and experts on the decoder layer, a per-expert scale; heads refused (per-layer
    # head sizes)
    "gemma4": ("num_experts", "model.vision_tower.", {}, (0, 1)),
    "llama4": (
        "num_local_experts",
        "vision_model.",
        {0: [1, 3], 1: [0, 2], 2: [1, 2], 3: [0, 3]},
        (1, 3),
    ),
}


MLA_COMPOSITES = {"kimi_k25", "glm5_next"}


@pytest.mark.parametrize("family", sorted(COMPOSITE_CASES))
def test_composite_model_prunes_its_language_model_exactly(family, tiny_checkpoint, tmp_path):
    count_key, tower, heads, moe_layers = COMPOSITE_CASES[family]
    source = tiny_checkpoint(family)
    experts = _half(*moe_layers)
    out = tmp_path / "pruned"
    result = rewrite_checkpoint(source, PrunePlan(experts=experts, heads=heads), out)
    assert_exact(source, out, experts=removed(experts, 8), heads=removed(heads, 4))
    assert_tensors_are_slices(source, out, experts=experts)
    assert set(config_diff(source, out)) == {"text_config"}  # nothing else in config.json
    mla = family in MLA_COMPOSITES  # one KV latent per head: KV heads go with the heads
    assert result.config_changes == {  # else one query head per KV group: KV heads stay 2
        f"text_config.{count_key}": [8, 4],
        **({"text_config.num_attention_heads": [4, 2]} if heads else {}),
        **({"text_config.num_key_value_heads": [4, 2]} if mla else {}),
    }

    src, dst = open_checkpoint(source).tensors, open_checkpoint(out).tensors
    towers = sorted(name for name in src if name.startswith(tower))
    assert towers and towers == sorted(name for name in dst if name.startswith(tower))
    assert all(src[n].shape == dst[n].shape for n in towers)  # and bytes: assert_tensors_are_slices


def test_composite_model_refuses_uneven_counts(tiny_checkpoint, tmp_path):
    plan = PrunePlan(experts={0: [0, 1, 2], 1: [0, 1, 2, 3, 4]})
    with pytest.raises(PlanError, match="not supported for composite models"):
        rewrite_checkpoint(tiny_checkpoint("qwen3_vl_moe"), plan, tmp_path / "o", allow_uneven=True)


def test_composite_config_that_lies_is_refused(tiny_checkpoint, tmp_path):
    import shutil

    from mfprune.errors import ModelError

    source = tmp_path / "src"
    shutil.copytree(tiny_checkpoint("qwen3_vl_moe"), source)
    config = json.loads((source / "config.json").read_text())
    config["text_config"]["hidden_size"] = 96  # the weights are 64 wide
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"config\.json says hidden_size = 96"):
        rewrite_checkpoint(source, PrunePlan(experts=_half(0, 1)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_kimi_k25_as_transformers_saves_it_is_refused(tmp_path):
    from mfprune import tinymodels
    from mfprune.errors import ModelError

    source = tmp_path / "src"
    tinymodels.build_model("kimi_k25").save_pretrained(source)  # layers saved as blocks
    assert any(".model.blocks.1." in name for name in open_checkpoint(source).tensors)
    with pytest.raises(ModelError, match="no MoE layer found"):
        rewrite_checkpoint(source, PrunePlan(experts=_half(1, 2)), tmp_path / "out")


@pytest.mark.parametrize(
    ("family", "reason"),
    [("mistral_large4", "NoPE layers"), ("gemma4", "global_head_dim")],  # (and gemma4_text)
)
def test_composite_heads_are_refused_with_the_reason(family, reason, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    layers = json.loads((source / "config.json").read_text())["text_config"]["num_hidden_layers"]
    plan = PrunePlan(heads={layer: [0, 2] for layer in range(layers)})
    with pytest.raises(PlanError, match=reason):
        rewrite_checkpoint(source, plan, tmp_path / "o")

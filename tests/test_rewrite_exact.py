"""The exactness oracle for every family: rewrite, load in stock transformers, compare logits
with the original model whose pruned experts / heads are masked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checks import (
    assert_exact,
    assert_stacked_sliced,
    assert_tensors_are_slices,
    config_diff,
    removed,
)

from mfprune import PrunePlan, rewrite_checkpoint
from mfprune.arch import spec_for_config
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
    "mistral4": ({1: [0, 2, 5, 7], 2: [1, 3, 4, 6]}, "n_routed_experts"),
    "gpt_oss": ({0: [0, 1, 2, 7], 1: [2, 3, 5, 6]}, "num_local_experts"),
    # a token classifier: its logits are per-token label scores [B, T, 33]
    "openai_privacy_filter": (_half(0, 1), "num_local_experts"),
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
    "dbrx": (_half(0, 1), "ffn_config.moe_num_experts"),  # [E * I, D] blocks
    "longcat_flash": (_half(0, 1), "n_routed_experts"),  # + 2 zero experts, never pruned
    # layer 0 hash-routed: its table names experts 0, 2, 5, 7 only (values remapped)
    "deepseek_v4": (_half(0, 1, 2), "n_routed_experts"),
    "zaya": (_half(0, 1), "num_experts"),  # MLP router: its output rows + the skip class
    "flint": (_half(1, 2), "num_experts"),  # sigmoid router; shared expert; layer 0 dense
    "bailing_hybrid": (_half(1, 2), "num_experts"),  # V3 routing, bias saved as gate.expert_bias
    # composite: HY-V4 under text_config, its vision tower (vit.*) byte for byte
    "hy_v4_vl": (_half(1, 2), "text_config.n_routed_experts"),
    # per-layer type lists (mlp_layer_types); hybrids with linear attention
    "kimi_linear": (_half(1, 2), "num_experts"),  # V3 routing; KDA layers 0, 2; MLA layer 1
    "hy_v4": (_half(1, 2), "n_routed_experts"),  # fused experts; MLA + indexer
    "axk1": (_half(1, 2), "n_routed_experts"),  # V3 routing with groups; MLA
    "axk2": (_half(1, 2), "n_routed_experts"),  # no groups; MLA + indexer
    "beam": (_half(1, 2), "num_experts"),  # V3 routing with groups, no shared expert
    # layers_block_type: Mamba-2, MoE, attention, MoE; no num_hidden_layers
    "nemotron_h": (_half(1, 3), "n_routed_experts"),
    "hy_v3": (_half(1, 2), "num_experts"),  # bias on the MoE block (mlp.expert_bias on disk)
    "laguna": (_half(1, 2), "num_experts"),  # soft-capped logits; bias under mlp.experts.
    "llama4_text": (_half(1, 3), "num_local_experts"),  # MoE layers from moe_layers
    "gemma4_text": (_half(0, 1), "num_experts"),  # router on the layer, per-expert scale
    "aria_text": (_half(0, 1), "moe_num_experts"),  # experts saved as experts.fc1 / fc2
    "minimax_m3_vl_text": (_half(1, 2), "num_local_experts"),  # sigmoid + bias; layer 0 dense
    "dots3_note_text": (_half(1, 2), "n_routed_experts"),  # V3 routing, groups; experts one by one
    # saved as released (model.llm.layers.*: gate.bias, experts.w13_weight / w2_weight)
    "inkling2_text": (_half(0, 1, 2), "n_routed_experts"),
    # the same names; layers 1 and 2 run 3 times per token (the oracle masks every pass)
    "inkling2_loop_text": (_half(0, 1, 2, 3), "n_routed_experts"),
    # gated shared expert; hyper-connections, PLE in layer 0, a QSA indexer in layer 1
    "qwen4_exp_text": (_half(0, 1), "num_experts"),
    # router rows 8, 9 score the 2 shared experts: kept after the kept ones; layer 0 dense
    "inkling_text": (_half(1, 2), "n_routed_experts"),
}


def _with_config(tiny: Path, source: Path, edit) -> Path:
    """A copy of the tiny checkpoint ``tiny`` at ``source``, its config.json ``edit(config)``."""
    shutil.copytree(tiny, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(edit(config)))
    return source


@pytest.mark.parametrize("family", sorted(EXPERT_CASES))
def test_expert_pruning_is_exact(family, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    kept, count_key = EXPERT_CASES[family]
    out = tmp_path / "pruned"
    result = rewrite_checkpoint(source, PrunePlan(experts=kept), out)
    assert_exact(source, out, experts=removed(kept, 8))
    assert_tensors_are_slices(source, out, experts=kept)
    n = len(next(iter(kept.values())))
    assert result.config_changes == {count_key: [8, n]}  # dotted: in a sub-config
    assert result.tensors_sliced > 0
    assert result.out_bytes < result.source_bytes
    assert (out / "mfprune_plan.json").is_file()
    assert PrunePlan.load(out / "mfprune_plan.json").experts == {
        k: tuple(v) for k, v in kept.items()
    }


def test_a_token_classifier_is_compared_on_its_label_logits(tiny_checkpoint, tmp_path):
    """OpenAI's privacy filter has no LM head: the oracle compares its per-token label logits
    [B, T, num_labels], and mfprune loads it with its own class."""
    from checks import load

    import mfprune

    source = tiny_checkpoint("openai_privacy_filter")
    model, _ = load(source)
    assert type(model).__name__ == "OpenAIPrivacyFilterForTokenClassification"
    assert type(mfprune.load_pretrained(source)) is type(model)
    ids = sample_ids(model.config.vocab_size, batch=2, seq=24)
    assert logits(model, ids).shape == (2, 24, model.config.num_labels)


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
    "openai_privacy_filter": ({0: [1, 3], 1: [0, 2]}, _half(0, 1)),  # sinks; bidirectional
    "deepseek_v3": ({1: [0, 2, 3], 2: [0, 1, 3], 0: [1, 2, 3]}, {}),  # MLA, KV heads == heads
    "mistral4": ({1: [0, 2, 3], 2: [0, 1, 3], 0: [1, 2, 3]}, {}),  # MLA, KV heads == heads
    "qwen2_moe": ({0: [0, 1], 1: [0, 1]}, {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}),  # q/k/v biases
    "glm4_moe": ({0: [0, 1], 1: [0, 1], 2: [2, 3]}, _half(1, 2)),
    "dots1": ({0: [1, 3], 1: [0, 2], 2: [0, 3]}, {}),  # per-head-dim q/k norms
    "deepseek_v32": ({0: [1, 2, 3], 1: [0, 1, 3], 2: [0, 1, 2]}, _half(1, 2)),  # MLA + indexer
    "granitemoe_swa": ({0: [0, 2], 1: [1, 3]}, {}),  # sinks
    "flint": ({0: [0, 3], 1: [1, 2], 2: [1, 3]}, _half(1, 2)),  # softmax_offset sinks
    "glm4_moe_lite": ({0: [1, 2, 3], 1: [0, 1, 3], 2: [0, 1, 2]}, _half(1, 2)),  # MLA
    # hybrids: heads only in the softmax-attention layers
    "qwen3_next": ({1: [1, 3]}, {}),  # layer 0: Gated DeltaNet; q_proj rows = query + gate
    "jamba": ({1: [0, 1], 3: [2, 3]}, _half(0, 2)),  # layers 0, 2: Mamba
    "granitemoehybrid": ({1: [1, 2]}, {}),  # layer 0: Mamba-2
    "lara_mini": ({1: [0, 3]}, {}),  # layer 0: linear attention
    "ernie4_5_moe": ({0: [0, 1], 1: [0, 1], 2: [0, 1], 3: [2, 3]}, _half(1, 2)),
    "afmoe": ({0: [0, 2], 1: [1, 3], 2: [0, 3]}, {}),  # per-head output gate (gate_proj)
    "exaone_moe": ({0: [1, 3], 1: [0, 2], 2: [0, 3]}, _half(1, 2)),
    "kimi_linear": ({1: [0, 2, 3]}, _half(1, 2)),  # MLA layer 1 only; KDA layers 0, 2
    # MLA + indexer, per-head output gate (linear_gate) and sinks (learnable_sink_param)
    "hy_v4": ({0: [1, 2, 3], 1: [0, 1, 3], 2: [0, 1, 2]}, _half(1, 2)),
    "axk1": ({0: [1, 2, 3], 1: [0, 1, 3], 2: [0, 1, 2]}, _half(1, 2)),  # MLA
    # q_b_proj rows per head: query (nope + rope) and output gate (v_head_dim)
    "axk2": ({0: [1, 2, 3], 1: [0, 1, 3], 2: [0, 1, 2]}, _half(1, 2)),
    "beam": ({0: [1, 3], 1: [0, 2], 2: [0, 3]}, _half(1, 2)),  # per-head output gate + bias
    "nemotron_h": ({2: [0, 3]}, _half(1, 3)),  # the attention mixer of layer 2 only
    "hy_v3": ({0: [1, 3], 1: [0, 2], 2: [0, 3]}, _half(1, 2)),  # per-head-dim q/k norms
    # per-head softplus gate (g_proj rows); num_attention_heads_per_layer patched too
    "laguna": ({0: [1, 3], 1: [0, 2], 2: [0, 3]}, _half(1, 2)),
    "llama4_text": ({0: [1, 3], 1: [0, 2], 2: [1, 2], 3: [0, 3]}, _half(1, 3)),
    "aria_text": ({0: [1, 3], 1: [0, 2]}, _half(0, 1)),
    # a lightning indexer (heads of its own, untouched) in layer 1
    "minimax_m3_vl_text": ({0: [1, 3], 1: [0, 2], 2: [0, 3]}, _half(1, 2)),
    # layer 0: Gated DeltaNet; q_proj rows = query + gate; the QSA indexer's heads stay
    "qwen4_exp_text": ({1: [1, 3]}, _half(0, 1)),
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
    [
        ("qwen3_next", 0, "linear_attention"),
        ("lara_mini", 0, "linear_attention"),
        ("qwen4_exp_text", 0, "linear_attention"),
        ("jamba", 0, ""),
        ("kimi_linear", 2, "linear_attention"),
        ("nemotron_h", 1, ""),  # an MoE layer
        ("nemotron_h_omni", 3, ""),  # an MoE layer of its language model
        ("nemo_speechlm", 1, ""),  # an MoE layer of its language model
    ],
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


def test_axk2_with_expert_groups_refuses_expert_pruning(tiny_checkpoint, tmp_path):
    # A.X-K2's group mask fills unchosen groups with 0.0, so a pruned expert stays selectable
    source = tiny_checkpoint("axk2", n_group=2, topk_group=1)
    with pytest.raises(PlanError, match=r"experts\[1\]: group-limited routing .* fills the scores"):
        rewrite_checkpoint(source, PrunePlan(experts=_half(1, 2)), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    heads = {0: [1, 2, 3], 1: [0, 1, 3], 2: [0, 1, 2]}  # heads are unaffected by the routing
    rewrite_checkpoint(source, PrunePlan(heads=heads), tmp_path / "heads")
    assert_exact(source, tmp_path / "heads", heads=removed(heads, 4))


def test_nemotron_h_released_config_form_is_exact(tiny_checkpoint, tmp_path):
    # released checkpoints say num_hidden_layers and hybrid_override_pattern (one character
    # per layer: M Mamba-2, E MoE, * attention, - MLP), not layers_block_type

    from mfprune.arch import spec_for_config
    from mfprune.arch.layout import resolve_layout

    def released(config):
        del config["layers_block_type"]
        return config | {"num_hidden_layers": 4, "hybrid_override_pattern": "ME*E"}

    source = _with_config(tiny_checkpoint("nemotron_h"), tmp_path / "src", released)
    ckpt = open_checkpoint(source)
    layout = resolve_layout(ckpt, spec_for_config(ckpt.config))
    assert (layout.num_layers, layout.experts.layers, layout.heads.layers) == (4, (1, 3), (2,))
    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts=_half(1, 3), heads={2: [1, 2]}), out)
    assert_exact(source, out, experts=removed(_half(1, 3), 8), heads={2: [0, 3]})


def test_nemotron_h_omni_released_config_form_is_exact(tiny_checkpoint, tmp_path):
    # released checkpoints keep the language model's settings under llm_config (transformers
    # reads it as text_config), with hybrid_override_pattern for the layer types

    def released(config):
        text = config.pop("text_config")
        del text["layers_block_type"]
        pattern = {"num_hidden_layers": 4, "hybrid_override_pattern": "ME*E"}
        return config | {"llm_config": text | pattern}

    source = _with_config(tiny_checkpoint("nemotron_h_omni"), tmp_path / "src", released)
    out = tmp_path / "pruned"
    result = rewrite_checkpoint(source, PrunePlan(experts=_half(1, 3), heads={2: [1, 2]}), out)
    assert_exact(source, out, experts=removed(_half(1, 3), 8), heads={2: [0, 3]})
    assert result.config_changes == {
        "llm_config.n_routed_experts": [8, 4],
        "llm_config.num_attention_heads": [4, 2],
    }
    assert "text_config" not in json.loads((out / "config.json").read_text())


def test_nemo_speechlm_released_config_form_is_exact(tiny_checkpoint, tmp_path):
    # the released config.json gives the language model's layer types as
    # hybrid_override_pattern (as transformers' own default text_config does)

    def released(config):
        del config["text_config"]["layers_block_type"]
        pattern = {"num_hidden_layers": 4, "hybrid_override_pattern": "ME*E"}
        return config | {"text_config": config["text_config"] | pattern}

    source = _with_config(tiny_checkpoint("nemo_speechlm"), tmp_path / "src", released)
    out = tmp_path / "pruned"
    result = rewrite_checkpoint(source, PrunePlan(experts=_half(1, 3), heads={2: [1, 2]}), out)
    assert_exact(source, out, experts=removed(_half(1, 3), 8), heads={2: [0, 3]})
    assert result.config_changes == {
        "text_config.n_routed_experts": [8, 4],
        "text_config.num_attention_heads": [4, 2],
    }


def test_dots3_note_released_config_form_is_exact(tiny_checkpoint, tmp_path):
    # released checkpoints keep the language model's settings at the top level of config.json
    # (transformers builds text_config from them); the counts are patched there

    def released(config):
        text = config.pop("text_config")
        del text["model_type"]
        return config | text

    source = _with_config(tiny_checkpoint("dots3_note"), tmp_path / "src", released)
    config = json.loads((source / "config.json").read_text())
    out = tmp_path / "pruned"
    result = rewrite_checkpoint(source, PrunePlan(experts=_half(1, 2)), out)
    assert_exact(source, out, experts=removed(_half(1, 2), 8))
    assert result.config_changes == {"n_routed_experts": [8, 4]}
    written = json.loads((out / "config.json").read_text())
    assert "text_config" not in written
    assert written["vision_config"] == config["vision_config"]  # the tower's experts stay


def test_qwen4_exp_released_layer_types_are_exact(tiny_checkpoint, tmp_path):
    # released configs call the indexed layers "full_attention" (transformers renames them)
    def released(config):
        return config | {"layer_types": ["linear_attention", "full_attention"]}

    source = _with_config(tiny_checkpoint("qwen4_exp_text"), tmp_path / "src", released)
    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts=_half(0, 1), heads={1: [0, 3]}), out)
    assert_exact(source, out, experts=removed(_half(0, 1), 8), heads={1: [1, 2]})
    assert json.loads((out / "config.json").read_text())["layer_types"][1] == "full_attention"
    with pytest.raises(PlanError, match="layer 0 has no attention heads"):
        rewrite_checkpoint(source, PrunePlan(heads={0: [0, 3]}), tmp_path / "o")


@pytest.mark.parametrize(
    ("family", "reason"),
    [
        # its linear-attention layers also read num_attention_heads: pruning heads is not exact
        ("minimax", "lightning-attention layers take their head count"),
        ("dots3_note_text", "swa_num_attention_heads"),  # sliding layers' own head count
        ("inkling2_text", "swa_num_attention_heads"),  # and per-head sinks, relative states
        ("inkling2_loop_text", "swa_num_attention_heads"),  # the same
        ("inkling_text", "swa_num_attention_heads"),  # and relative states, convolutions
    ],
)
def test_heads_are_refused_with_the_reason(family, reason, tiny_checkpoint, tmp_path):
    with pytest.raises(PlanError, match=reason):
        rewrite_checkpoint(tiny_checkpoint(family), PrunePlan(heads={0: [0, 2]}), tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "openai_privacy_filter"]
)
def test_uneven_expert_counts_load_with_mfprune_and_are_exact(family, tiny_checkpoint, tmp_path):
    from checks import load

    import mfprune

    source = tiny_checkpoint(family)
    kept = {
        "mixtral": {0: [0, 2, 5], 1: [1, 3, 4, 6, 7]},
        "qwen2_moe": {0: [0, 1], 1: [3, 4, 5, 6, 7]},
        "deepseek_v3": {1: [0, 2, 5, 7], 2: [0, 1, 2, 5, 6, 7]},
        "gpt_oss": {0: [0, 1, 2, 7], 1: [2, 3]},
        "openai_privacy_filter": {0: [0, 1, 2, 7], 1: [2, 3]},  # its own class: a classifier
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
    # the same, with hyper-connections, PLE (layer 0) and a QSA token indexer (layer 1)
    "qwen4_exp": ("num_experts", "model.visual.", {1: [1, 3]}, (0, 1)),
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
    # the same language model as encoder and block-diffusion decoder, tied (saved once, as
    # model.decoder.layers.*); the oracle masks both passes' routers
    "diffusion_gemma": ("num_experts", "model.encoder.vision_tower.", {}, (0, 1)),
    # saved as model.layers.*, towers as visual.* and audio_tower.* (its layers have heads too)
    "qwen3_omni_moe_thinker": ("num_experts", "audio_tower.", {0: [1, 3], 1: [0, 2]}, (0, 1)),
    # Nemotron-H under text_config: Mamba-2, MoE, attention, MoE (heads in layer 2 only)
    "nemotron_h_omni": ("n_routed_experts", "vision_model.", {2: [0, 3]}, (1, 3)),
    # the same, in NeMo's names (llm.model.layers.*), beside the speech encoders (perception.*)
    "nemo_speechlm": ("n_routed_experts", "perception.", {2: [0, 3]}, (1, 3)),
    # sigmoid router on scaled logits + correction bias; experts between a pooling pair; heads
    # refused (hidden_size must stay a multiple of the head count)
    "muse_spark": ("num_local_experts", "model.vision_tower.", {}, (1, 2)),
    # released names (model.llm.layers.*: gate.bias, experts.w13_weight / w2_weight); heads
    # refused (per-layer-type head counts, per-head sinks and relative states)
    "inkling2": ("n_routed_experts", "model.visual.", {}, (0, 1, 2)),
    # the same, with layers 1 and 2 looped 3 times per token (messages between the passes)
    "inkling2_loop": ("n_routed_experts", "model.visual.", {}, (0, 1, 2, 3)),
    # the same names; router rows for the shared experts after the routed ones; layer 0 dense
    "inkling_mm_model": ("n_routed_experts", "model.audio.", {}, (1, 2)),
    # the thinker under thinker_config.text_config; the talker (an MoE too) carried over whole
    "qwen3_omni_moe": ("num_experts", "talker.", {0: [1, 3], 1: [0, 2]}, (0, 1)),
    "llama4": (
        "num_local_experts",
        "vision_model.",
        {0: [1, 3], 1: [0, 2], 2: [1, 2], 3: [0, 3]},
        (1, 3),
    ),
    # every layer MoE; the tower's and the projector's attention are not the decoder's
    "aria": ("moe_num_experts", "vision_tower.", {0: [1, 3], 1: [0, 2]}, (0, 1)),
    # sigmoid + selection bias (moe.router_bias on disk); heads refused (sliding layers' count)
    "step3p7": ("n_routed_experts", "vision_model.", {}, (1, 2)),
    # experts saved one by one (block_sparse_moe.experts.N.w1/w3/w2); indexer in layer 1
    "minimax_m3_vl": (
        "num_local_experts",
        "vision_tower.",
        {0: [1, 3], 1: [0, 2], 2: [0, 3]},
        (1, 2),
    ),
    # V3 routing with groups; experts one by one (model.layers.N.mlp.experts.E.*); its vision
    # tower is an MoE too (vision_encoder.blocks.0.mlp.experts.*), carried over whole; heads
    # refused (sliding layers' head counts)
    "dots3_note": ("n_routed_experts", "vision_encoder.", {}, (1, 2)),
    # DeepSeek-V2 routing with groups; experts one by one; the towers saved as model.sam_model.*
    # and model.vision_model.* beside the language model's model.layers.*; heads refused
    "unlimited_ocr": ("n_routed_experts", "model.vision_model.", {}, (1, 2)),
    # the same language model; its vision encoder (model.qwen2_model.*) has layers.N.self_attn too
    "deepseek_ocr2": ("n_routed_experts", "model.qwen2_model.", {}, (1, 2)),
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
    path = spec_for_config(open_checkpoint(source).config).config_path  # text_config mostly
    assert set(config_diff(source, out)) == {path.split(".")[0]}  # nothing else in config.json
    mla = family in MLA_COMPOSITES  # one KV latent per head: KV heads go with the heads
    assert result.config_changes == {  # else one query head per KV group: KV heads stay 2
        f"{path}.{count_key}": [8, 4],
        **({f"{path}.num_attention_heads": [4, 2]} if heads else {}),
        **({f"{path}.num_key_value_heads": [4, 2]} if mla else {}),
    }

    src, dst = open_checkpoint(source).tensors, open_checkpoint(out).tensors
    towers = sorted(name for name in src if name.startswith(tower))
    assert towers and towers == sorted(name for name in dst if name.startswith(tower))
    assert all(src[n].shape == dst[n].shape for n in towers)  # and bytes: assert_tensors_are_slices


def test_qwen3_omni_talker_keeps_its_experts(tiny_checkpoint, tmp_path):
    """Qwen3-Omni's talker is an MoE too, routed only while generate() speaks: a plan prunes
    the thinker; the talker keeps every expert, its router rows and its count."""
    source = tiny_checkpoint("qwen3_omni_moe")
    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts=_half(0, 1)), out)
    config = json.loads((out / "config.json").read_text())
    assert config["thinker_config"]["text_config"]["num_experts"] == 4
    assert (
        config["talker_config"] == json.loads((source / "config.json").read_text())["talker_config"]
    )
    src, dst = open_checkpoint(source).tensors, open_checkpoint(out).tensors
    talker = sorted(n for n in src if n.startswith("talker."))
    assert "talker.model.layers.1.mlp.experts.7.down_proj.weight" in talker
    assert talker == sorted(n for n in dst if n.startswith("talker."))
    assert dst["talker.model.layers.0.mlp.gate.weight"].shape == (8, 64)


def test_composite_model_refuses_uneven_counts(tiny_checkpoint, tmp_path):
    plan = PrunePlan(experts={0: [0, 1, 2], 1: [0, 1, 2, 3, 4]})
    with pytest.raises(PlanError, match="not supported for composite models"):
        rewrite_checkpoint(tiny_checkpoint("qwen3_vl_moe"), plan, tmp_path / "o", allow_uneven=True)


def test_composite_config_that_lies_is_refused(tiny_checkpoint, tmp_path):

    from mfprune.errors import ModelError

    def lying(config):
        config["text_config"]["hidden_size"] = 96  # the weights are 64 wide
        return config

    source = _with_config(tiny_checkpoint("qwen3_vl_moe"), tmp_path / "src", lying)
    with pytest.raises(ModelError, match=r"config\.json says hidden_size = 96"):
        rewrite_checkpoint(source, PrunePlan(experts=_half(0, 1)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dbrx_blocks_of_rows_follow_their_expert(tiny_checkpoint, tmp_path):
    """DBRX keeps expert e in rows [e * I, (e + 1) * I) of w1 / v1 / w2 [E * I, D]: the kept
    blocks, in order, byte for byte."""
    source = tiny_checkpoint("dbrx")
    kept = {0: [1, 2, 6, 7], 1: [0, 3, 4, 5]}
    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts=kept), out)
    names = [f"transformer.blocks.{{layer}}.ffn.experts.mlp.{w}" for w in ("w1", "v1", "w2")]
    names.append("transformer.blocks.{layer}.ffn.router.layer.weight")
    assert_stacked_sliced(source, out, kept=kept, names=names[:3], rows=32)
    assert_stacked_sliced(source, out, kept=kept, names=names[3:])


def test_longcat_zero_experts_stay_after_the_kept_ones(tiny_checkpoint, tmp_path):
    """LongCat's router has 8 routed + 2 zero-compute (identity) rows: every plan keeps the
    zero rows (router, selection bias, what transformers saves under experts.8/9), after the
    kept experts, and zero_expert_num stays."""
    source = tiny_checkpoint("longcat_flash")
    kept = {0: [0, 2, 5, 7], 1: [1, 3, 4, 6]}
    out = tmp_path / "pruned"
    result = rewrite_checkpoint(source, PrunePlan(experts=kept), out)
    rows = {layer: [*ids, 8, 9] for layer, ids in kept.items()}
    names = [
        "model.layers.{layer}.mlp.router." + n
        for n in ("classifier.weight", "e_score_correction_bias")
    ]
    assert_stacked_sliced(source, out, kept=rows, names=names)
    dst = open_checkpoint(out).tensors
    assert "model.layers.0.mlp.experts.5.gate_proj.weight" in dst  # zero expert 9, renumbered
    assert "model.layers.0.mlp.experts.6.gate_proj.weight" not in dst
    assert result.config_changes == {"n_routed_experts": [8, 4]}


@pytest.mark.parametrize(
    ("family", "layers", "bias", "carried"),
    [  # carried per MoE layer: the shared experts' tensors and the router's global scale
        ("inkling_text", "model.layers.", "gate.e_score_correction_bias", 3 + 1),
        ("inkling_mm_model", "model.llm.layers.", "gate.bias", 2 + 1),  # released names
    ],
)
def test_inkling_shared_expert_rows_stay_after_the_kept_ones(
    family, layers, bias, carried, tiny_checkpoint, tmp_path
):
    """Inkling's router has 8 routed + 2 shared-expert rows: every plan keeps the shared rows
    after the kept experts; the correction bias (routed experts only) loses the pruned
    entries; the shared experts and the router's global scale are the source's bytes."""
    from safetensors import safe_open

    source = tiny_checkpoint(family)
    kept = _half(1, 2)
    out = tmp_path / "pruned"
    result = rewrite_checkpoint(source, PrunePlan(experts=kept), out)
    mlp = layers + "{layer}.mlp."
    rows = {layer: [*ids, 8, 9] for layer, ids in kept.items()}
    assert_stacked_sliced(source, out, kept=rows, names=[mlp + "gate.weight"])
    assert_stacked_sliced(source, out, kept=kept, names=[mlp + bias])
    src, dst = open_checkpoint(source).tensors, open_checkpoint(out).tensors
    moe = tuple(mlp.format(layer=layer) for layer in kept)
    same = [
        n
        for n in src
        if n.startswith(moe) and (".shared_experts." in n or n.endswith(".gate.global_scale"))
    ]
    assert len(same) == len(kept) * carried
    for name in same:
        with safe_open(src[name].file, "pt") as f, safe_open(dst[name].file, "pt") as g:
            assert torch.equal(f.get_tensor(name), g.get_tensor(name)), name
    path = "text_config." if family == "inkling_mm_model" else ""
    assert result.config_changes == {f"{path}n_routed_experts": [8, 4]}  # n_shared_experts stays


def test_a_carried_tensor_with_an_expert_axis_is_refused(tiny_checkpoint, tmp_path):
    """The adapter carries Inkling's gate.global_scale [1] unchanged; one with a leading axis
    of E would be per-expert, so the rewrite refuses it like any uncovered tensor."""
    from safetensors.torch import load_file, save_file

    from mfprune.errors import ModelError

    source = tmp_path / "src"
    shutil.copytree(tiny_checkpoint("inkling_text"), source)
    tensors = load_file(source / "model.safetensors")
    name = "model.layers.1.mlp.gate.global_scale"
    tensors[name] = torch.ones(8)
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=rf"no adapter rule covers them: {name} \[8\]"):
        rewrite_checkpoint(source, PrunePlan(experts=_half(1, 2)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_deepseek_v4_keeps_every_expert_its_hash_table_names(tiny_checkpoint, tmp_path):
    """Layer 0 routes by tid2eid, whose values name experts 0, 2, 5, 7 only: a plan that drops
    one of them is refused with the layer and the ids, and a profile plan keeps them first."""
    from mfprune.arch import spec_for_config
    from mfprune.arch.layout import resolve_layout
    from mfprune.planner import plan_experts

    source = tiny_checkpoint("deepseek_v4")
    ckpt = open_checkpoint(source)
    layout = resolve_layout(ckpt, spec_for_config(ckpt.config))
    assert layout.experts.pinned(0) == {0, 2, 5, 7} and not layout.experts.pinned(1)
    bad = {0: [0, 1, 2, 3], 1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}
    with pytest.raises(PlanError, match=r"experts\[0\]: drops experts \[5, 7\] .*\(hash routing\)"):
        rewrite_checkpoint(source, PrunePlan(experts=bad), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    scores = torch.arange(24, dtype=torch.float64).view(3, 8)  # experts 4..7 score best
    kept = plan_experts(layout.experts, scores, keep=4)
    assert kept[0] == (0, 2, 5, 7) and kept[1] == kept[2] == (4, 5, 6, 7)
    with pytest.raises(PlanError, match="names 4 experts; keeping 3"):
        plan_experts(layout.experts, scores, keep=3)


def test_zaya_router_mlp_keeps_its_skip_class(tiny_checkpoint, tmp_path):
    """Zaya's router is an MLP; only its output layer has a row per expert, plus a last row for
    the skip class: the kept experts' rows, then the skip row (and its balancing bias); the
    router MLP's other layers are the source's bytes."""
    source = tiny_checkpoint("zaya")
    kept = {0: [0, 2, 5, 7], 1: [1, 3, 4, 6]}
    out = tmp_path / "pruned"
    rewrite_checkpoint(source, PrunePlan(experts=kept), out)
    rows = {layer: [*ids, 8] for layer, ids in kept.items()}
    gate = "model.layers.{layer}.mlp.gate."
    names = [gate + "router_mlp.out_proj.weight", gate + "balancing_biases"]
    assert_stacked_sliced(source, out, kept=rows, names=names)
    assert_tensors_are_slices(source, out, experts=kept)  # fc1, fc2, down_proj: unchanged


def test_kimi_k25_as_transformers_saves_it_is_refused(tmp_path):
    from mfprune import tinymodels
    from mfprune.errors import ModelError

    source = tmp_path / "src"
    tinymodels.build_model("kimi_k25").save_pretrained(source)  # layers saved as blocks
    assert any(".model.blocks.1." in name for name in open_checkpoint(source).tensors)
    with pytest.raises(ModelError, match="no MoE layer found"):
        rewrite_checkpoint(source, PrunePlan(experts=_half(1, 2)), tmp_path / "out")


def test_nemo_speechlm_with_experts_one_by_one_is_refused(tmp_path):
    # a model built from its config saves its experts one by one; NVIDIA's export (and what a
    # model loaded from it saves) stacks them, which is what the adapter names
    from mfprune import tinymodels
    from mfprune.errors import ModelError

    source = tmp_path / "src"
    tinymodels.build_model("nemo_speechlm").save_pretrained(source)
    assert "llm.model.layers.1.mixer.experts.7.up_proj.weight" in open_checkpoint(source).tensors
    with pytest.raises(
        ModelError, match=r"layers\.1\.mixer\.experts\.gate_and_up_projs is missing"
    ):
        rewrite_checkpoint(source, PrunePlan(experts=_half(1, 3)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("family", "reason"),
    [
        ("mistral_large4", "NoPE layers"),
        ("gemma4", "global_head_dim"),  # (and gemma4_text)
        ("diffusion_gemma", "global_head_dim"),
        ("step3p7", "num_sliding_attention_heads"),
        ("unlimited_ocr", "recomputes head_dim"),
        ("deepseek_ocr2", "recomputes head_dim"),
        ("muse_spark", "not a multiple of num_attention_heads"),
        ("inkling2", "swa_num_attention_heads"),
        ("inkling2_loop", "swa_num_attention_heads"),
        ("inkling_mm_model", "swa_num_attention_heads"),
        ("dots3_note", "swa_num_attention_heads"),
    ],
)
def test_composite_heads_are_refused_with_the_reason(family, reason, tiny_checkpoint, tmp_path):
    source = tiny_checkpoint(family)
    layers = json.loads((source / "config.json").read_text())["text_config"]["num_hidden_layers"]
    plan = PrunePlan(heads={layer: [0, 2] for layer in range(layers)})
    with pytest.raises(PlanError, match=reason):
        rewrite_checkpoint(source, plan, tmp_path / "o")


# encoder-decoder models: a plan numbers the encoder's layers first, then the decoder's;
# (tiny-model overrides, kept experts per MoE layer, each stack's name prefix -> its first number)
ENCODER_DECODER_CASES = {
    # every layer of both stacks sparse; expert_capacity 3 drops tokens
    "switch_transformers": (
        {},
        {0: [0, 2, 5, 7], 1: [1, 3, 4, 6], 2: [0, 1, 2, 7], 3: [2, 3, 5, 6]},
        {"decoder.": 2},
    ),
    # T5's rule i % step == 1: encoder step 4 makes layer 1 sparse (not 3), decoder step 2 too
    "switch_transformers-step4": (
        {"num_layers": 4, "num_sparse_encoder_layers": 1, "num_sparse_decoder_layers": 1},
        {1: [0, 2, 5, 7], 5: [1, 3, 4, 6]},
        {"decoder.": 4},
    ),
}


@pytest.mark.parametrize("case", sorted(ENCODER_DECODER_CASES))
def test_encoder_decoder_expert_pruning_is_exact(case, tiny_checkpoint, tmp_path):
    from mfprune.arch import spec_for_config
    from mfprune.arch.layout import resolve_layout

    overrides, kept, stack_first = ENCODER_DECODER_CASES[case]
    source = tiny_checkpoint(case.split("-")[0], **overrides)
    ckpt = open_checkpoint(source)
    assert resolve_layout(ckpt, spec_for_config(ckpt.config)).experts.layers == tuple(kept)
    out = tmp_path / "pruned"
    result = rewrite_checkpoint(source, PrunePlan(experts=kept), out)
    assert_exact(source, out, experts=removed(kept, 8))
    assert_tensors_are_slices(source, out, experts=kept, stack_first=stack_first)
    assert result.config_changes == {"num_experts": [8, 4]}
    assert config_diff(source, out) == {"num_experts": (8, 4)}  # expert_capacity stays


def test_encoder_decoder_refusals(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("switch_transformers")
    uneven = PrunePlan(experts={0: [0, 1, 2], 2: [0, 1, 2, 3, 4]})
    with pytest.raises(PlanError, match="not supported for encoder-decoder models"):
        rewrite_checkpoint(source, uneven, tmp_path / "o", allow_uneven=True)
    with pytest.raises(PlanError, match="T5's q/k/v/o"):  # heads: the adapter's reason
        rewrite_checkpoint(source, PrunePlan(heads={0: [0, 1]}), tmp_path / "o")
    # no fixed capacity (a config.json transformers' own config class would refuse too)
    import shutil

    no_capacity = tmp_path / "no_capacity"
    shutil.copytree(source, no_capacity)
    config = json.loads((no_capacity / "config.json").read_text())
    (no_capacity / "config.json").write_text(json.dumps(config | {"expert_capacity": None}))
    with pytest.raises(PlanError, match=r"experts\[0\]: the router's expert capacity would change"):
        rewrite_checkpoint(no_capacity, PrunePlan(experts=_half(0, 1, 2, 3)), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_nllb_moe_stays_refused_while_transformers_runs_two_experts(tiny_checkpoint):
    # NllbMoeExperts.forward one-hot encodes the one-hot top-1 mask: only expert_0 and
    # expert_1 ever run. When this fails, transformers computes NLLB-MoE properly: write its
    # adapter ([[stacks]], top_k 2, capacity_keys) and drop it from unsupported.toml
    from checks import load

    from mfprune.arch import spec_for_config
    from mfprune.errors import ArchError

    model, _ = load(tiny_checkpoint("nllb-moe"))
    ids = sample_ids(128, batch=2, seq=24)
    before = logits(model, ids)
    with torch.no_grad():
        for stack in ("encoder", "decoder"):
            experts = model.get_submodule(f"model.{stack}.layers.1.ffn.experts")
            for e in range(2, 8):
                experts[f"expert_{e}"].fc2.bias.fill_(5.0)
    assert torch.equal(before, logits(model, ids))
    with pytest.raises(ArchError, match="runs expert_0"):
        spec_for_config(model.config.to_dict())


def test_ernie4_5_vl_moe_stays_refused_while_its_banks_share_one_count(tiny_checkpoint, tmp_path):
    # ERNIE 4.5 VL saves a text bank (experts 0..7, width 32) and a vision bank (8..15, width
    # 16) as one list, transposed routers and one [2, E] bias; text input never reaches the
    # vision bank, so carrying it over would be exact, but one count (moe_num_experts) sizes
    # both banks and the loader splits the list in equal halves: a text bank pruned to 7 beside
    # the vision bank's 8 does not load. When this fails, write the adapter (text experts
    # pruned, vision bank carried over) and drop the family from unsupported.toml
    from checks import load
    from safetensors.torch import load_file, save_file

    from mfprune.errors import ArchError

    source = tiny_checkpoint("ernie4_5_vl_moe")
    tensors = load_file(source / "model.safetensors")
    mlp = "model.layers.1.mlp."
    assert tensors[f"{mlp}gate.weight"].shape == tensors[f"{mlp}gate.weight_1"].shape == (64, 8)
    assert tensors[f"{mlp}moe_statics.e_score_correction_bias"].shape == (2, 8)
    widths = [tensors[f"{mlp}experts.{e}.down_proj.weight"].shape[1] for e in range(16)]
    assert widths == [32] * 8 + [16] * 8 and f"{mlp}experts.16.down_proj.weight" not in tensors

    model, _ = load(source)
    ids = sample_ids(128, batch=2, seq=24)
    before = logits(model, ids)
    vision = model.get_submodule("model.language_model.layers.1.mlp.vision_moe")
    with torch.no_grad():  # text tokens: the vision bank and its router never run
        vision.experts.down_proj.zero_()
    assert torch.equal(before, logits(model, ids))

    ragged = tmp_path / "ragged"  # text expert 7 dropped, the vision bank renumbered after it
    shutil.copytree(source, ragged)
    pruned = {}
    for name, tensor in tensors.items():
        if name.startswith(f"{mlp}experts."):
            expert, rest = name[len(f"{mlp}experts.") :].split(".", 1)
            if int(expert) != 7:
                pruned[f"{mlp}experts.{int(expert) - (int(expert) > 7)}.{rest}"] = tensor
        else:
            pruned[name] = tensor[:, :7].contiguous() if name == f"{mlp}gate.weight" else tensor
    save_file(pruned, ragged / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((ragged / "config.json").read_text())
    config["text_config"]["moe_num_experts"] = 7
    (ragged / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="conversion of the weights"):
        load(ragged)
    with pytest.raises(ArchError, match="sized by one count"):
        spec_for_config(config)

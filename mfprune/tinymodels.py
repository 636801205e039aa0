"""Builders for tiny, random Mixture-of-Experts checkpoints, one per supported family.

Everything is built locally from a config (no model hub access): a model is instantiated with
``AutoModelForCausalLM.from_config``, given deterministic random weights, and optionally written
to disk with ``save_pretrained``.

Default-initialised MoE models are poor test subjects: with ``initializer_range=0.02`` and a
64-wide hidden state the router logits are nearly uniform, and several routing parameters
(DeepSeek-V3's ``e_score_correction_bias``, GPT-OSS's router and expert biases, JetMoE's MoE
biases) start at exactly zero, so a bug that mishandles them would go unnoticed. ``build_model``
therefore re-randomises these with a fixed generator, so routing genuinely varies between tokens
and pruning an expert changes the logits.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from mfprune.loading import auto_model_class
from mfprune.modules import is_router

Tensors = dict[str, torch.Tensor]

_BASE: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}

#: Three layers, the first dense, then 8 routed experts (top-2) and a shared expert: the
#: DeepSeek layout that many families reuse.
_ROUTED_AFTER_DENSE: dict[str, Any] = {
    "num_hidden_layers": 3,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
}

_DEEPSEEK: dict[str, Any] = {
    **_ROUTED_AFTER_DENSE,
    "num_key_value_heads": 4,
    "kv_lora_rank": 16,
    "q_lora_rank": None,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
}

#: DeepSeek-V3 routing (sigmoid + correction bias, 2 groups of 4, one group per token) on a
#: GQA model whose first layer is dense: GLM-4.5 and the families built on its code.
_GLM: dict[str, Any] = {
    **_ROUTED_AFTER_DENSE,
    "n_group": 2,
    "topk_group": 1,
    "head_dim": 16,
}

#: A per-expert softmax-router family: 8 experts of width 32, top-2.
_SOFTMAX: dict[str, Any] = {"num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16}

#: Qwen3-Next's language model: Gated DeltaNet in layer 0, gated softmax attention in layer 1.
_QWEN_NEXT: dict[str, Any] = {
    "shared_expert_intermediate_size": 32,
    "linear_num_value_heads": 4,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "layer_types": ["linear_attention", "full_attention"],
}

#: A one-block vision tower of the Qwen-VL families.
_QWEN_VISION: dict[str, Any] = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 32,
    "num_heads": 2,
    "out_hidden_size": 64,
    "patch_size": 4,
    "temporal_patch_size": 1,
    "spatial_merge_size": 1,
}

#: Llama 4's language model: MoE in layers 1 and 3 (interleave step 2, saved as moe_layers),
#: layer 3 without RoPE.
_LLAMA4_TEXT: dict[str, Any] = {
    **_BASE,
    "num_hidden_layers": 4,
    "intermediate_size": 32,  # experts and the shared expert
    "intermediate_size_mlp": 64,  # the dense layers
    "head_dim": 16,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "interleave_moe_layer_step": 2,
}

#: Gemma 4's MoE language model: in every layer a dense MLP beside 8 routed experts (router
#: on the decoder layer); no per-layer inputs.
_GEMMA4_TEXT: dict[str, Any] = {
    **_BASE,
    "head_dim": 16,
    "global_head_dim": 16,
    "enable_moe_block": True,
    "num_experts": 8,
    "top_k_experts": 2,
    "moe_intermediate_size": 32,
    "hidden_size_per_layer_input": 0,
    "vocab_size_per_layer_input": 128,
    "sliding_window": 8,
    "layer_types": ["sliding_attention", "full_attention"],
}

#: Gemma 4's keys that DiffusionGemma's text config does not have
_PER_LAYER_INPUTS = (
    "enable_moe_block",
    "hidden_size_per_layer_input",
    "vocab_size_per_layer_input",
)

#: A one-block Gemma 4 vision tower
_GEMMA4_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "patch_size": 4,
    "position_embedding_size": 64,
}

#: A one-block SAM image encoder (the DeepSeek-OCR towers' first stage)
_SAM_TOWER: dict[str, Any] = {
    "hidden_size": 32,
    "output_channels": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 16,
    "window_size": 2,
    "global_attn_indexes": [0],
    "mlp_dim": 32,
    "downsample_channels": [32, 32],
}

#: Aria's language model: every layer MoE (8 experts of width 32, top-2) with one shared
#: expert (also 32 wide: intermediate_size x moe_num_shared_experts)
_ARIA_TEXT: dict[str, Any] = {
    **_BASE,
    "intermediate_size": 32,
    "moe_num_experts": 8,
    "moe_topk": 2,
    "moe_num_shared_experts": 1,
}

#: MiniMax-M3's language model: layer 0 dense, 8 experts (top-2) and a shared expert after;
#: a lightning indexer in layer 1 that keeps every block (its top blocks differ in padded
#: batches); its default special token ids lie outside the tiny vocabulary
_MINIMAX_M3_TEXT: dict[str, Any] = {
    **_BASE,
    "num_hidden_layers": 3,
    "head_dim": 16,
    "num_experts_per_tok": 2,
    "intermediate_size": 32,  # the routed experts
    "dense_intermediate_size": 64,
    "shared_intermediate_size": 32,
    "num_local_experts": 8,
    "rotary_dim": 8,
    "mlp_layer_types": ["dense", "sparse", "sparse"],
    "layer_types": ["full_attention", "minimax_m3_sparse", "full_attention"],
    "index_n_heads": 2,
    "index_head_dim": 16,
    "index_block_size": 4,
    "index_topk_blocks": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

#: Qwen3-Omni-MoE's thinker: a Qwen3-MoE language model (multimodal RoPE sections: half the
#: head size, 16 / 2), a one-block vision tower and a one-layer audio tower. Its position ids
#: read vision_start_token_id, which the config class lacks (the released configs carry it).
_OMNI_THINKER: dict[str, Any] = {
    "vision_start_token_id": 127,
    "text_config": {
        **_BASE,
        **_SOFTMAX,
        "num_experts": 8,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 2, 2],
            "interleaved": True,
        },
    },
    "vision_config": {**_QWEN_VISION, "deepstack_visual_indexes": [0]},
    "audio_config": {
        "encoder_layers": 1,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 32,
        "d_model": 32,
        "output_dim": 64,
        "num_mel_bins": 16,
        "downsample_hidden_size": 8,
    },
}

#: Qwen3-Omni-MoE whole: the thinker above, a two-layer MoE talker (8 experts and a gated
#: shared expert) with a one-layer code predictor, and a one-layer code2wav.
_OMNI: dict[str, Any] = {
    "thinker_config": _OMNI_THINKER,
    "talker_config": {
        "text_config": {
            **_BASE,
            **_SOFTMAX,
            "num_experts": 8,
            "shared_expert_intermediate_size": 32,
            "rope_parameters": _OMNI_THINKER["text_config"]["rope_parameters"],
        },
        "code_predictor_config": {
            **_BASE,
            "vocab_size": 32,
            "head_dim": 16,
            "num_hidden_layers": 1,
            "num_code_groups": 4,
        },
        "num_code_groups": 4,
        "thinker_hidden_size": 64,
        "accept_hidden_layer": 1,
        "spatial_merge_size": 1,  # read by the talker, absent from its config class
    },
    "code2wav_config": {
        "codebook_size": 32,
        "hidden_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_quantizers": 4,
        "upsample_rates": [2, 2],
        "upsampling_ratios": [2],
        "decoder_dim": 32,
        "sliding_window": 8,
    },
}

#: Nemotron-H: one mixer per layer, Mamba-2 / MoE / attention / MoE; the layer list is the
#: layer count (num_hidden_layers is not a config key), 2 groups of 4 experts
_NEMOTRON_H: dict[str, Any] = {
    **{k: v for k, v in _BASE.items() if k != "num_hidden_layers"},
    "layers_block_type": ["linear_attention", "moe", "full_attention", "moe"],
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "moe_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32,
    "head_dim": 16,
    "mamba_num_heads": 4,
    "mamba_head_dim": 32,
    "ssm_state_size": 8,
    "n_groups": 1,
    "chunk_size": 16,
}

#: A one-layer speech encoder of Nemotron-3.5-Transcribe (recognition, diarization, timestamps)
_SPEECH_ENCODER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_mel_bins": 8,
}

#: The three attention layers of Inkling and Inkling 2: sliding-window layers 0 and 2 (their
#: own head counts) around a full-attention layer 1, with relative-position states.
_INKLING_LAYERS: dict[str, Any] = {
    **_BASE,
    "num_hidden_layers": 3,
    "head_dim": 16,
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "swa_head_dim": 16,
    "sliding_window_size": 8,
    "d_rel": 8,
    "rel_extent": 16,
    "layer_types": ["hybrid_sliding", "hybrid", "hybrid_sliding"],
}

#: Inkling 2's language model: sliding-window layers 0 and 2 around a full-attention layer 1,
#: attention-residual blocks of 2 layers, an MoE in every layer; the lm head unpadded.
_INKLING2_TEXT: dict[str, Any] = {
    **_INKLING_LAYERS,
    "unpadded_vocab_size": 128,
    "moe_intermediate_size": 32,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_layers_per_attn_res_block": 2,
    "eos_token_id": 2,  # the default lies outside the tiny vocabulary
}

#: Inkling 2 Loop's language model: Inkling 2's with attention-residual blocks of one layer,
#: layers 1 (full attention) and 2 (sliding window) looped 3 times per token between layer 0
#: and layer 3 (each pass after the first gets messages from the one before).
_INKLING2_LOOP_TEXT: dict[str, Any] = {
    **_INKLING2_TEXT,
    "num_hidden_layers": 4,
    "layer_types": ["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"],
    "n_layers_per_attn_res_block": 1,
    "loop_layer_index_start": 1,
    "loop_layer_index_end": 3,
    "loop_num_passes": 3,
    "loop_gate_rank": 8,
}

#: A one-block Inkling 2 vision tower projecting to the tiny language model's width.
_INKLING2_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "patch_size": 4,
    "posemb_grid_size": 4,
    "projection_hidden_dim": 32,
    "text_hidden_size": 64,
}

#: Qwen4-Exp's language model: Gated DeltaNet in layer 0 (with hashed n-gram embeddings, PLE:
#: 2 x 2 heads over a tiny n-gram vocabulary, saved in 2 shards), gated softmax attention with a
#: QSA token indexer in layer 1 (its budget keeps every key: a top-k over blocks would differ
#: in padded batches), 2 hyper-connection streams, an MoE with a gated shared expert in both
_QWEN4_EXP_TEXT: dict[str, Any] = {
    **_BASE,
    **_SOFTMAX,
    **_QWEN_NEXT,
    "num_experts": 8,
    "layer_types": ["linear_attention", "indexed_attention"],
    "hc_count": 2,
    "hc_lowrank": 16,
    "ple_layer_ids": [1],  # one-indexed: layer 0
    "heads_per_ngram": 2,
    "ngram_vocab_size_base": 64,
    "split_ngram_parts": 2,
    "indexer_n_heads": 2,
    "indexer_kv_heads": 1,
    "indexer_head_dim": 16,
    "indexer_budget": 2048,
    "indexer_compress_ratio": 4,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [4, 2, 2],
    },
    "eos_token_id": 2,  # PLE's n-gram context starts at eos
}

#: Inkling's language model: sliding-window layers 0 and 2 around a full-attention layer 1,
#: layer 0 dense, then 8 routed experts (top-2) and 2 shared experts, which the router scores
#: too (rows 8 and 9)
_INKLING_TEXT: dict[str, Any] = {
    **_INKLING_LAYERS,
    "mlp_layer_types": ["dense", "sparse", "sparse"],
    "moe_intermediate_size": 32,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 2,
    "eos_token_id": 2,
}

#: dots3.note's language model: layer 0 dense, 8 experts (2 groups of 4, one group per token)
#: and a shared expert after; MLA with a per-head sigmoid gate, indexed (DSA) attention in
#: layers 0 and 1 and a sliding-window layer 2 with its own head counts (per_layer_config);
#: its default special token ids lie outside the tiny vocabulary
_DOTS3_NOTE_TEXT: dict[str, Any] = {
    **_BASE,
    "num_hidden_layers": 3,
    "num_key_value_heads": 4,
    "moe_intermediate_size": 32,
    "shared_experts_intermediate_size": 32,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "head_dim": 16,
    "index_topk": 8,
    "index_head_dim": 16,
    "index_n_heads": 2,
    "mlp_layer_types": ["dense", "sparse", "sparse"],
    "sliding_window": 8,
    "swa_num_attention_heads": 2,
    "swa_num_key_value_heads": 2,
    "swa_q_lora_rank": 16,
    "swa_kv_lora_rank": 16,
    "swa_head_dim": 16,
    "swa_qk_nope_head_dim": 8,
    "swa_v_head_dim": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

#: Config kwargs per tiny model (keyed by the transformers ``model_type``; the adapter that
#: serves it is found from that). Each dict is complete: pass it to
#: ``AutoConfig.for_model(model_type, **kw)``.
#: Hunyuan V4 (hy_v4, and the language model of hy_v4_vl)
_HY_V4: dict[str, Any] = {
    **_BASE,
    "num_hidden_layers": 3,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "num_key_value_heads": 4,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "index_n_heads": 2,
    "index_head_dim": 16,
    "index_topk": 8,
    "hc_mult": 2,
    "initializer_range": 0.02,
    "mlp_layer_types": ["dense", "sparse", "sparse"],
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

FAMILIES: dict[str, dict[str, Any]] = {
    "mixtral": {**_BASE, "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {
        **_BASE,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "qwen3_moe": {
        **_BASE,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "head_dim": 16,
    },
    # OLMoE's default eos_token_id (50279) lies outside the tiny vocabulary.
    "olmoe": {**_BASE, "num_experts": 8, "num_experts_per_tok": 2, "eos_token_id": 2},
    "deepseek_v2": {**_BASE, **_DEEPSEEK},
    "deepseek_v3": {**_BASE, **_DEEPSEEK, "n_group": 2, "topk_group": 1, "q_lora_rank": 16},
    # softmax group-limited routing, scaled; default rope is YaRN (kept: it is the family's)
    "mistral4": {
        **_BASE,
        **_DEEPSEEK,
        "n_group": 2,
        "topk_group": 1,
        "q_lora_rank": 16,
        "routed_scaling_factor": 2.5,
        "pad_token_id": 0,
    },
    "gpt_oss": {**_BASE, "num_local_experts": 8, "num_experts_per_tok": 2, "head_dim": 16},
    # a bidirectional token classifier (33 labels) built like GPT-OSS; its default special
    # token ids lie outside the tiny vocabulary
    "openai_privacy_filter": {
        **_BASE,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "intermediate_size": 32,
        "head_dim": 16,
        "sliding_window": 8,
        "pad_token_id": 0,
        "eos_token_id": 2,
    },
    "granitemoe": {**_BASE, "num_local_experts": 8, "num_experts_per_tok": 2},
    "phimoe": {**_BASE, "num_local_experts": 8, "num_experts_per_tok": 2},
    # JetMoE defaults to initializer_range=0.01, which makes expert outputs (two products of
    # init-scale matrices) so small that pruning barely moves the logits; use the usual 0.02.
    "jetmoe": {
        **_BASE,
        "initializer_range": 0.02,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "kv_channels": 16,
        "num_key_value_heads": 2,
        "num_attention_heads": 4,
    },
    "glm4_moe": {**_BASE, **_GLM},
    "dots1": {**_BASE, **_GLM},
    "solar_open": {**_BASE, **_GLM, "first_k_dense_replace": 0},
    "sarvam_moe": {**_BASE, **_GLM},
    "sarvam_mla": {**_BASE, **_DEEPSEEK, "n_group": 2, "topk_group": 1, "q_lora_rank": 16},
    # DeepSeek-V3.2 / GLM-5 DSA: MLA plus a token indexer; MoE layers from mlp_layer_types
    **{
        family: {
            **_BASE,
            **_DEEPSEEK,
            "n_group": 2,
            "topk_group": 1,
            "q_lora_rank": 16,
            "index_n_heads": 2,
            "index_head_dim": 16,
            "mlp_layer_types": ["dense", "sparse", "sparse"],
        }
        for family in ("deepseek_v32", "glm_moe_dsa")
    },
    "glm4_moe_lite": {
        **_BASE,
        **_DEEPSEEK,
        "n_group": 2,
        "topk_group": 1,
        "q_lora_rank": 16,
        "mlp_layer_types": ["dense", "sparse", "sparse"],
    },
    # values wider than keys (v_head_dim), per-head sinks; MoE layers from mlp_layer_types
    "mimo_v2_flash": {
        **_BASE,
        **_GLM,
        "first_k_dense_replace": None,
        "n_shared_experts": None,
        "v_head_dim": 32,
        "mlp_layer_types": ["dense", "sparse", "sparse"],
    },
    # lightning attention in layer 1: heads only in layer 0
    "minimax": {
        **_BASE,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "head_dim": 16,
        "layer_types": ["full_attention", "linear_attention"],
    },
    # FlexOlmo's default pad_token_id lies outside the tiny vocabulary
    "flex_olmo": {
        **_BASE,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "pad_token_id": 1,
        "bos_token_id": None,
        "eos_token_id": 2,
    },
    "mellum": {**_BASE, **_SOFTMAX, "num_local_experts": 8},
    "cohere2_moe": {
        **_BASE,
        **_SOFTMAX,
        "num_hidden_layers": 3,
        "num_experts": 8,
        "mlp_layer_types": ["dense", "sparse", "sparse"],
        "layer_types": ["sliding_attention"] * 3,
    },
    # Mamba in layers 0 and 2, attention in 1 and 3; MoE in layers 0 and 2 (offset 0, so the
    # default every-step-th rule would be wrong)
    "jamba": {
        **_BASE,
        **_SOFTMAX,
        "num_hidden_layers": 4,
        "num_experts": 8,
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "expert_layer_period": 2,
        "expert_layer_offset": 0,
        "mamba_d_state": 8,
        "mamba_d_conv": 4,
        "mamba_expand": 2,
        "mamba_dt_rank": 8,
    },
    "granitemoeshared": {
        **_BASE,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "shared_intermediate_size": 32,
    },
    "granitemoehybrid": {
        **_BASE,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "shared_intermediate_size": 32,
        "layer_types": ["mamba", "attention"],
        "mamba_n_heads": 4,
        "mamba_d_head": 32,
        "mamba_d_state": 8,
        "mamba_n_groups": 1,
    },
    "granitemoe_swa": {**_BASE, "num_local_experts": 8, "num_experts_per_tok": 2},
    "lara_mini": {
        **_BASE,
        **_SOFTMAX,
        "num_experts": 8,
        "shared_expert_intermediate_size": 32,
        "layer_types": ["linear_attention", "sliding_attention"],
    },
    "qwen3_next": {**_BASE, **_SOFTMAX, **_QWEN_NEXT, "num_experts": 8},
    # selection biases kept off the router module (block, statics module), routers not named
    # *TopKRouter: found by the oracle from the adapter
    # ERNIE: MoE in layers 1..2 of 4 (moe_layer_start_index .. moe_layer_end_index)
    "ernie4_5_moe": {
        **_BASE,
        "num_hidden_layers": 4,
        "moe_num_experts": 8,
        "moe_k": 2,
        "moe_intermediate_size": 32,
        "moe_num_shared_experts": 1,
        "moe_layer_start_index": 1,
        "moe_layer_end_index": 2,
    },
    "exaone_moe": {
        **_BASE,
        **_GLM,
        "n_routed_experts": None,
        "num_experts": 8,
        "mlp_layer_types": ["dense", "sparse", "sparse"],
    },
    "minimax_m2": {**_BASE, **_SOFTMAX, "num_local_experts": 8},
    # short-convolution layer 1 between attention layers 0 and 2; layer 0 dense
    "lfm2_moe": {
        **_BASE,
        **_SOFTMAX,
        "num_hidden_layers": 3,
        "num_experts": 8,
        "num_dense_layers": 1,
        "layer_types": ["full_attention", "conv", "full_attention"],
    },
    "afmoe": {
        **_BASE,
        **_SOFTMAX,
        "num_hidden_layers": 3,
        "num_experts": 8,
        "num_dense_layers": 1,
        "num_shared_experts": 1,
    },
    "hunyuan_v1_moe": {
        **_BASE,
        "num_experts": 8,
        "moe_topk": 2,
        "moe_intermediate_size": 32,
        "head_dim": 16,
    },
    "kolibri1": {
        **_BASE,
        **_SOFTMAX,
        "num_local_experts": 8,
        "shared_expert_intermediate_size": 32,
    },
    # experts concatenated as [E * I, D] blocks; counts inside ffn_config, heads in attn_config
    "dbrx": {
        "vocab_size": 128,
        "d_model": 64,
        "n_heads": 4,
        "n_layers": 2,
        "max_seq_len": 128,
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2},
    },
    # 2 zero-compute (identity) experts after the 8 routed ones, in the router's rows
    "longcat_flash": {
        "vocab_size": 128,
        "hidden_size": 64,
        "num_layers": 2,
        "num_attention_heads": 4,
        "n_routed_experts": 8,
        "zero_expert_num": 2,
        "moe_topk": 2,
        "expert_ffn_hidden_size": 32,
        "ffn_hidden_size": 64,
        "kv_lora_rank": 16,
        "q_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "head_dim": 8,
        "max_position_embeddings": 128,
    },
    # hash routing in layer 0 (a token -> expert table), top-k with a selection bias after;
    # compressed attention with one KV head and hyper-connections
    "deepseek_v4": {
        "vocab_size": 128,
        "hidden_size": 64,
        "moe_intermediate_size": 32,
        "intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "q_lora_rank": 16,
        "num_experts_per_tok": 2,
        "n_routed_experts": 8,
        "mlp_layer_types": ["hash_moe", "moe", "moe"],
        "max_position_embeddings": 128,
        "o_groups": 2,
        "o_lora_rank": 16,
        "index_n_heads": 2,
        "index_head_dim": 16,
        "index_topk": 8,
        "sliding_window": 16,
        "num_nextn_predict_layers": 0,
        "hc_mult": 2,
    },
    # an MLP router whose output layer has a skip class after the 8 experts (top-1 only)
    "zaya": {
        **_BASE,
        "head_dim": 16,
        "moe_intermediate_size": 32,
        "num_experts": 8,
        "num_experts_per_tok": 1,
        "router_hidden_size": 32,
    },
    # Kimi Delta Attention in layers 0 and 2 (narrower heads than the MLA layer 1, so head
    # tensors of the same name differ in size), layer 0 dense; its default special token ids
    # lie outside the tiny vocabulary
    "kimi_linear": {
        **_BASE,
        "num_hidden_layers": 3,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "n_group": 2,
        "topk_group": 1,
        "num_key_value_heads": 4,
        "kv_lora_rank": 16,
        "q_lora_rank": None,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "linear_num_heads": 4,
        "linear_head_dim": 8,
        "layer_types": ["linear_attention", "full_attention", "linear_attention"],
        "mlp_layer_types": ["dense", "sparse", "sparse"],
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # MLA + indexer, hyper-connections (2 streams); layer 0 dense; its default special token
    # ids lie outside the tiny vocabulary; initializer_range 0.006 makes pruning barely move
    # the logits
    "hy_v4": _HY_V4,
    # A.X-K1: DeepSeek-V3 with a norm after the MoE block; A.X-K2: MLA + indexer, gated norms,
    # no expert groups (the light checkpoints' routing); its indexer keeps the default top-2048
    # keys (every key here: with 8 of them, padded batches select differently, a property of
    # the model that the profiling tests would misread). Their default special token ids lie
    # outside the tiny vocabulary
    "axk1": {
        **_BASE,
        **_DEEPSEEK,
        "n_group": 2,
        "topk_group": 1,
        "q_lora_rank": 16,
        "mlp_layer_types": ["dense", "sparse", "sparse"],
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "axk2": {
        **_BASE,
        **_DEEPSEEK,
        "q_lora_rank": 16,
        "index_n_heads": 2,
        "index_head_dim": 16,
        "gated_norm_rank": 8,
        "mlp_layer_types": ["dense", "sparse", "sparse"],
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # Beam: V3 routing without shared experts, 2 groups of 4; a sliding-window layer on each
    # side of a full-attention (NoPE) layer; layer 0 dense
    "beam": {
        **_BASE,
        **_SOFTMAX,
        "num_hidden_layers": 3,
        "num_experts": 8,
        "n_group": 2,
        "topk_group": 1,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "mlp_layer_types": ["dense", "sparse", "sparse"],
    },
    "nemotron_h": _NEMOTRON_H,
    # Hunyuan V3: selection bias on the MoE block; layer 0 dense; initializer_range 0.006
    # makes pruning barely move the logits
    "hy_v3": {
        **_BASE,
        **_SOFTMAX,
        "num_hidden_layers": 3,
        "num_experts": 8,
        "initializer_range": 0.02,
        "mlp_layer_types": ["dense", "sparse", "sparse"],
    },
    # Laguna: soft-capped sigmoid router logits, selection bias; sliding-window layers around
    # a full-attention one; layer 0 dense
    "laguna": {
        **_BASE,
        **_SOFTMAX,
        "num_hidden_layers": 3,
        "num_experts": 8,
        "shared_expert_intermediate_size": 32,
        "moe_router_logit_softcapping": 2.0,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "mlp_layer_types": ["dense", "sparse", "sparse"],
    },
    # sigmoid router, ungated shared expert; layer 0 dense (mlp_only_layers); per-head sinks
    "flint": {
        **_BASE,
        "num_hidden_layers": 3,
        "head_dim": 16,
        "moe_intermediate_size": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "shared_expert_intermediate_size": 32,
        "mlp_only_layers": [0],
    },
    # V3 routing with 2 groups of 4; delta attention in layers 0 and 2, MLA in layer 1; layer 0
    # dense; its default special token ids lie outside the tiny vocabulary
    "bailing_hybrid": {
        **_BASE,
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "moe_intermediate_size": 32,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": None,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
        "head_dim": 16,
        "layer_group_size": 2,
        "num_mtp_layers": 0,
        "pad_token_id": 0,
        "eos_token_id": 2,
    },
    # Nemotron-H (as above) under text_config and a one-block RADIO vision tower; no audio
    # tower (its config is optional)
    "nemotron_h_omni": {
        "text_config": {**_NEMOTRON_H, "model_type": "nemotron_h"},
        "vision_config": {
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "patch_size": 8,
            "image_size": 16,
            "max_img_size": 32,
            "num_cls_tokens": 1,
            "num_registers": 1,
            "video_temporal_patch_size": 2,
        },
        "audio_config": None,
        "vision_hidden_size": 32,
        "projector_hidden_size": 64,
    },
    # Nemotron-H (as above) under text_config beside one-layer speech recognition and
    # diarization encoders and a one-layer word-timestamp head; the audio token outside the
    # tiny vocabulary (as released: it has no embedding row)
    "nemo_speechlm": {
        "text_config": {**_NEMOTRON_H, "model_type": "nemotron_h"},
        "audio_config": {
            "asr_config": _SPEECH_ENCODER,
            "diarization_config": {
                "audio_config": _SPEECH_ENCODER,
                "head_config": {"hidden_size": 16, "audio_hidden_size": 32},
            },
        },
        "word_timestamp_config": {
            **_SPEECH_ENCODER,
            "vocab_size": 16,
            "blank_token_id": 15,
        },
        "audio_token_id": 128,
    },
    # composite: a one-block vision tower and the MoE language model under text_config
    "qwen3_vl_moe": {
        "text_config": {**_BASE, **_SOFTMAX, "num_experts": 8},
        "vision_config": {**_QWEN_VISION, "deepstack_visual_indexes": [0]},
    },
    "glm4v_moe": {
        "text_config": {
            **_BASE,
            **_GLM,
            "attention_bias": True,
            # multimodal RoPE sections must add up to half the rotary width (16 x 0.5 / 2)
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [2, 1, 1],
            },
        },
        "vision_config": _QWEN_VISION,
    },
    "qwen3_5_moe": {
        "text_config": {**_BASE, **_SOFTMAX, **_QWEN_NEXT, "num_experts": 8},
        "vision_config": _QWEN_VISION,
    },
    # HY-V4 under text_config (multimodal RoPE sections: half the rotary width, 8 / 2), the vision
    # tower saved as vit.*, the language model as model.layers.*; its indexer keeps every key
    "hy_v4_vl": {
        "text_config": {
            **_HY_V4,
            "index_topk": 2048,  # every key: its indexer's top-8 differs in padded batches
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 1, 1],
            },
        },
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "out_hidden_size": 64,
            "patch_size": 8,
            "max_image_size": 64,
        },
    },
    # a DeepSeek-V3 language model (MLA, groups, first layer dense) and a one-block tower
    "kimi_k25": {
        "text_config": {
            **_BASE,
            **_DEEPSEEK,
            "model_type": "deepseek_v3",
            "n_group": 2,
            "topk_group": 1,
            "q_lora_rank": 16,
        },
        "vision_config": {
            "patch_size": 4,
            "pos_emb_height": 4,
            "pos_emb_width": 4,
            "pos_emb_time": 1,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "hidden_size": 32,
            "intermediate_size": 32,
        },
        "projection_hidden_size": 32,
    },
    # softmax router with groups (2 of 4, one group per token); MLA with a token indexer; a
    # one-block Pixtral tower
    "mistral_large4": {
        "text_config": {
            **_BASE,
            **{k: v for k, v in _DEEPSEEK.items() if k != "q_lora_rank"},  # no Q-LoRA key
            "n_group": 2,
            "topk_group": 1,
            "index_head_dim": 16,
            "index_n_heads": 2,
        },
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 8,
            "head_dim": 16,
        },
    },
    # KDA linear attention in layers 0 and 2, MLA + indexer in layer 1; layer 0 dense
    "glm5_next": {
        "text_config": {
            **_BASE,
            **_ROUTED_AFTER_DENSE,
            "num_key_value_heads": 4,  # == heads (MLA)
            "n_group": 2,
            "topk_group": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": 16,
            "qk_nope_head_dim": 16,
            "v_head_dim": 16,
            "index_topk": 16,
            "index_kpool": 4,
            "index_head_dim": 16,
            "index_n_heads": 2,
            "pad_token_id": 0,  # the default lies outside the tiny vocabulary
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "layer_types": ["linear_attention", "indexed_attention", "linear_attention"],
            "linear_head_dim": 16,
            "linear_num_heads": 4,
            "hc_mult": 2,
        },
        "vision_config": {
            **_QWEN_VISION,
            "projection_intermediate_size": 64,
            "image_size": 16,
        },
    },
    "qwen3_omni_moe_thinker": _OMNI_THINKER,
    "qwen3_omni_moe": _OMNI,
    # Muse Spark: experts at moe_hidden_size 32 between a pooling pair; layer 0 dense; sliding
    # layers 0, 1, a full-attention NoPE layer 2; one-block vision tower, two-stage audio tower
    "muse_spark": {
        "text_config": {
            **_BASE,
            **_SOFTMAX,
            "num_hidden_layers": 3,
            "num_local_experts": 8,
            "moe_hidden_size": 32,
            "sliding_window": 8,
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "bos_token_id": 1,  # the defaults lie outside the tiny vocabulary
            "eos_token_id": 2,
        },
        "vision_config": {
            "patch_size": 4,
            "pos_emb_height": 4,
            "pos_emb_width": 4,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "hidden_size": 32,
            "intermediate_size": 32,
            "max_position_embeddings": 16,
        },
        "audio_config": {
            "patch_sizes": [4, 2],
            "hidden_sizes": [16, 32],
            "depths": [1, 1],
            "num_hidden_layers": 2,
            "out_hidden_size": 64,
        },
        "out_hidden_size": 128,  # the tower's 32 after a 2 x 2 patch merge
        "projector_hidden_size": 32,
    },
    "inkling2": {"text_config": _INKLING2_TEXT, "vision_config": _INKLING2_VISION},
    "inkling2_text": _INKLING2_TEXT,
    "inkling2_loop": {"text_config": _INKLING2_LOOP_TEXT, "vision_config": _INKLING2_VISION},
    "inkling2_loop_text": _INKLING2_LOOP_TEXT,
    "inkling_text": _INKLING_TEXT,
    # a two-layer vision tower (its layer plan needs a temporal patch of 2) and an audio tower
    "inkling_mm_model": {
        "text_config": _INKLING_TEXT,
        "vision_config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": 4,
            "temporal_patch_size": 2,
        },
        "audio_config": {"n_mel_bins": 8, "mel_vocab_size": 16},
    },
    "qwen4_exp_text": _QWEN4_EXP_TEXT,
    "qwen4_exp": {
        "text_config": _QWEN4_EXP_TEXT,
        "vision_config": {**_QWEN_VISION, "num_position_embeddings": 16},
    },
    "gemma4_text": _GEMMA4_TEXT,
    # a one-block vision tower, no audio tower
    "gemma4": {
        "text_config": _GEMMA4_TEXT,
        "vision_config": _GEMMA4_VISION,
        "audio_config": None,
    },
    # DiffusionGemma: Gemma 4's MoE language model (without the per-layer inputs, which it
    # lacks) as encoder and decoder, tied; the Gemma 4 tower as above
    "diffusion_gemma": {
        "text_config": {k: v for k, v in _GEMMA4_TEXT.items() if k not in _PER_LAYER_INPUTS},
        "vision_config": _GEMMA4_VISION,
    },
    "dots3_note_text": _DOTS3_NOTE_TEXT,
    # a one-block vision tower that is an MoE itself (4 experts, its count in per_layer_config:
    # carried over untouched) and a one-layer audio tower
    "dots3_note": {
        "text_config": _DOTS3_NOTE_TEXT,
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 32,
            "moe_intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "patch_size": 4,
            "spatial_merge_size": 1,
            "adapter_merge_size": 1,
            "adapter_in_dim": 32,
            "adapter_out_dim": 64,
            "pyramid_num_routed": [4],
            "num_experts_per_tok": 2,
        },
        "audio_config": {
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "feature_size": 16,
            "downsample_hidden_size": 8,
            "adapter_input_size": 32,
            "adapter_out_dim": 64,
            "max_position_embeddings": 64,
        },
    },
    "aria_text": _ARIA_TEXT,
    # a one-block Idefics3 vision tower and a projector with one query size
    "aria": {
        "text_config": _ARIA_TEXT,
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 8,
        },
        "projector_patch_to_query_dict": {4: 4},
    },
    # sigmoid router + selection bias, a shared expert; layer 0 dense; a sliding-window layer
    # on each side of a full-attention one (the masks need sliding_window); a one-block tower
    "step3p7": {
        "text_config": {
            **_BASE,
            **_SOFTMAX,
            "num_hidden_layers": 3,
            "n_routed_experts": 8,
            "share_expert_dim": 32,
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "sliding_window": 8,
        },
        "vision_config": {
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 8,
            "mlp_ratio": 1.0,
        },
    },
    "minimax_m3_vl_text": _MINIMAX_M3_TEXT,
    # a one-block vision tower without patch merging
    "minimax_m3_vl": {
        "text_config": _MINIMAX_M3_TEXT,
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "patch_size": 4,
            "temporal_patch_size": 1,
            "spatial_merge_size": 1,
            "image_size": 16,
        },
        "projector_hidden_size": 64,
    },
    # DeepSeek-V2 routing, group-limited (2 groups of 4, one per token); layer 0 dense;
    # reference sliding windows; one-block SAM and CLIP towers
    "unlimited_ocr": {
        "text_config": {
            **_BASE,
            **_ROUTED_AFTER_DENSE,
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "n_group": 2,
            "topk_group": 1,
            "topk_method": "group_limited_greedy",
            "sliding_window": 8,
        },
        "vision_config": {
            "sam_config": _SAM_TOWER,
            "encoder_config": {
                "hidden_size": 32,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 16,
            },
        },
    },
    # DeepSeek-V2 routing, group-limited (2 groups of 4, one per token); layer 0 dense;
    # a one-block SAM encoder and a one-layer Qwen2-style vision encoder
    "deepseek_ocr2": {
        "text_config": {
            **_BASE,
            **_ROUTED_AFTER_DENSE,
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "n_group": 2,
            "topk_group": 1,
            "topk_method": "group_limited_greedy",
        },
        "vision_config": {
            "sam_config": _SAM_TOWER,
            "encoder_config": {
                "vocab_size": 16,
                "hidden_size": 32,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "max_position_embeddings": 64,
            },
        },
    },
    "llama4_text": _LLAMA4_TEXT,
    "llama4": {
        "text_config": _LLAMA4_TEXT,
        "vision_config": {
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "image_size": 16,
            "patch_size": 8,
            "vision_output_dim": 64,
            "projector_input_dim": 64,
            "projector_output_dim": 64,
        },
    },
    # encoder-decoder: every layer of both stacks sparse (num_sparse_* = 2: step 1); an expert
    # takes at most 3 tokens per 24-token sequence, so tokens are dropped
    "switch_transformers": {
        "vocab_size": 128,
        "d_model": 64,
        "d_kv": 16,
        "d_ff": 64,
        "num_heads": 4,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_sparse_encoder_layers": 2,
        "num_sparse_decoder_layers": 2,
        "num_experts": 8,
        "expert_capacity": 3,
        "decoder_start_token_id": 0,
    },
    # encoder-decoder: layer 1 of each stack sparse (step 2), top-2; at inference an expert
    # takes at most ceil(0.25 * tokens), so tokens are dropped
    "nllb-moe": {
        "vocab_size": 128,
        "d_model": 64,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "num_experts": 8,
        "encoder_sparse_step": 2,
        "decoder_sparse_step": 2,
        "moe_eval_capacity_token_fraction": 0.25,
        "max_position_embeddings": 128,
    },
    # kept for the test that shows why mfprune refuses it: a text bank (width 32) and a vision
    # bank (width 16) of 8 experts each under one count, layer 1 MoE; multimodal RoPE sections
    # add up to half the head size (16 / 2)
    "ernie4_5_vl_moe": {
        "text_config": {
            **_BASE,
            "head_dim": 16,
            "moe_num_experts": 8,
            "moe_k": 2,
            "moe_intermediate_size": [32, 16],
            "moe_num_shared_experts": 1,
            "mlp_layer_types": ["dense", "sparse"],
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [3, 3, 2],
            },
        },
        "vision_config": {
            "depth": 1,
            "hidden_size": 32,
            "num_heads": 2,
            "intermediate_size": 64,
            "patch_size": 8,
        },
    },
}

#: The experts DeepSeek-V4's token -> expert tables name in tiny models: a hash layer can drop
#: the others, and a plan that drops one of these is refused.
HASHED_EXPERTS = (0, 2, 5, 7)

#: Standard deviation given to router weights so routing is far from uniform.
ROUTER_STD = 1.0

# Parameters (by name suffix) that are zero at init but matter for routing or expert outputs,
# with the std they are redrawn at. JetMoE's MoE/MoA output biases are added to every token
# alike; at std >= 0.02 they swamp the (init-scale) token-dependent part of the residual stream
# and later routers pick the same experts for almost every token, hence the small std.
_ZERO_INIT_STD: dict[str, float] = {
    "mlp.router.bias": 0.5,  # gpt_oss router bias
    "experts.gate_up_proj_bias": 0.5,  # gpt_oss
    "experts.down_proj_bias": 0.5,  # gpt_oss
    "mlp.bias": 0.005,  # jetmoe MoE output bias
    "self_attention.experts.bias": 0.005,  # jetmoe MoA output bias
    "self_attn.gate_bias": 0.5,  # beam per-head output-gate bias (sliced per head)
    "self_attn.softmax_offset": 0.5,  # flint per-head attention sinks (sliced per head)
}

# Weights whose init scale makes them all but inert, redrawn larger: Inkling 2 Loop's message
# gates and queries (at std 0.02, a pass after the first routes as the first did).
_INERT_INIT_STD: dict[str, float] = {
    "_message_gate.down_proj.weight": 0.5,
    "_message_gate.forget_gate_proj.weight": 0.5,
    "_message_gate.message_gate_proj.weight": 1.0,
    "message_input.query": 1.0,
}

# Per-expert scales that start at one, redrawn at one plus noise of this std.
_ONE_INIT_STD: dict[str, float] = {"router.per_expert_scale": 0.5}  # gemma4


def make_config(family: str, **overrides: Any) -> PretrainedConfig:
    """Return the tiny config of ``family`` with ``overrides`` applied on top of ``FAMILIES``.

    Raises:
        KeyError: if ``family`` is not one of ``FAMILIES``.
    """
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    return AutoConfig.for_model(family, **{**FAMILIES[family], **overrides})


# selection biases (added to the scores before top-k) and the std they are redrawn at: scores
# are sigmoids for DeepSeek-V3, LFM2, AFMoE; Zaya adds its biases to softmax probabilities, so
# a smaller spread keeps the router in charge (transformers resets its skip class's to -1)
_SELECTION_BIAS_STD = {"e_score_correction_bias": 0.5, "expert_bias": 0.5, "balancing_biases": 0.05}

# routers whose class name the oracle's old rule did not know (HunYuanMoEV1Gate,
# AfmoeTokenChoiceRouter, ZayaRouterMLP, SwitchTransformersTop1Router, NllbMoeTop2Router):
# their logits come from an nn.Linear child
_OTHER_ROUTER = re.compile(r"(MoEV1Gate|TokenChoiceRouter|RouterMLP|Top1Router|Top2Router)$")


def _randomise(model: PreTrainedModel, generator: torch.Generator) -> None:
    """Re-draw router weights and zero-initialised routing/expert biases, in place."""
    drawn: set[int] = set()

    def draw(tensor: torch.Tensor, std: float) -> None:
        tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std)
        drawn.add(tensor.data_ptr())

    for module in model.modules():
        if is_router(module):  # some take their logits from an nn.Linear child
            # jetmoe's gating wraps .layer, longcat's router .classifier
            layer = getattr(module, "layer", None) or getattr(module, "classifier", None)
            draw((layer if isinstance(layer, nn.Linear) else module).weight, ROUTER_STD)
        elif _OTHER_ROUTER.search(type(module).__name__):  # hunyuan's gate.wg,
            # afmoe's router.gate, zaya's router_mlp.out_proj, switch's router.classifier
            for child in ("wg", "gate", "out_proj", "classifier"):
                if isinstance(getattr(module, child, None), nn.Linear):
                    draw(getattr(module, child).weight, ROUTER_STD)
            for child in ("fc1", "fc2"):  # zaya's router MLP: wide enough to vary by token
                if isinstance(getattr(module, child, None), nn.Linear):
                    draw(getattr(module, child).weight, 0.3)
        for name, std in _SELECTION_BIAS_STD.items():
            bias = getattr(module, name, None)
            if isinstance(bias, torch.Tensor):
                draw(bias, std)
    for name, param in model.named_parameters():
        for suffix, std in (_ZERO_INIT_STD | _INERT_INIT_STD).items():
            if name.endswith(suffix):
                draw(param, std)
        for suffix, std in _ONE_INIT_STD.items():
            if name.endswith(suffix):
                draw(param, std)
                param.add_(1.0)
    for name, buffer in model.named_buffers():
        if name.endswith("tid2eid"):  # DeepSeek-V4 hash layers: token -> K distinct experts
            pool = torch.tensor(HASHED_EXPERTS)
            rows = [pool[torch.randperm(len(pool), generator=generator)] for _ in buffer]
            buffer.copy_(torch.stack(rows)[:, : buffer.shape[1]])
    for tensor, std in _adapter_routing(model):  # what the class rules above did not reach
        if tensor.data_ptr() not in drawn:
            draw(tensor, std)


def _adapter_routing(model: PreTrainedModel) -> list[tuple[torch.Tensor, float]]:
    """The router weights (std ``ROUTER_STD``) and selection biases (std 0.5) that the
    family's adapter names, in every decoder layer that has them: Llama 4's router (an
    ``nn.Linear`` subclass), whatever a router class is called."""
    from mfprune.arch import spec_for_config
    from mfprune.arch.layout import stack_layouts
    from mfprune.errors import ArchError
    from mfprune.modules import loaded_name

    try:
        spec = spec_for_config(model.config.to_dict())
    except ArchError:  # kept for a test that mfprune refuses it (nllb-moe, ernie4_5_vl_moe)
        return []
    # every name of a tied tensor (DiffusionGemma's router is the encoder's and the decoder's)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors |= dict(model.named_buffers(remove_duplicate=False))
    # DBRX's n_layers, LongCat's num_layers: no num_hidden_layers (their routers are drawn above)
    num_layers = int(getattr(model.config.get_text_config(), "num_hidden_layers", None) or 0)
    kinds = [(k, num_layers) for k in (spec.experts, spec.attention_experts) if k is not None]
    if spec.stacks:  # encoder-decoder: each stack's templates over its own layers
        stacks = stack_layouts(spec, model.config.to_dict())
        kinds = [(s.spec, s.num_layers) for s in stacks]
    found = []
    for kind, num_layers in kinds:
        for layer in range(num_layers):
            for template, std in ((kind.router, ROUTER_STD), (kind.selection_bias, 0.5)):
                name = loaded_name(model, template.format(layer=layer)) if template else ""
                if name in tensors:
                    found.append((tensors[name], std))
    return found


def build_model(family: str, *, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """Build a deterministic tiny random model of ``family`` in eval mode and float32.

    Args:
        family: one of ``FAMILIES``.
        seed: seeds both the standard initialisation and the extra randomisation.
        **overrides: config kwargs overriding ``FAMILIES[family]``.

    Returns:
        The model, with router weights drawn at std ``ROUTER_STD`` and zero-initialised routing
        state (DeepSeek-V3 score-correction bias, GPT-OSS router/expert biases, JetMoE MoE/MoA
        biases) filled with random values.
    """
    config = make_config(family, **overrides)
    torch.manual_seed(seed)
    model = auto_model_class(config.model_type).from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        _randomise(model, generator)
    return model.float().eval()


def save_checkpoint(
    model: PreTrainedModel,
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
) -> Path:
    """Cast ``model`` to ``dtype`` (in place) and ``save_pretrained`` it to ``path``.

    Args:
        model: the model to save; note ``model.to(dtype)`` converts it in place.
        path: destination directory (created if missing).
        dtype: storage dtype of the checkpoint, e.g. ``torch.bfloat16``.
        max_shard_size: e.g. ``"20KB"`` to get a sharded checkpoint with an index file; ``None``
            keeps transformers' default (a single file for these tiny models).

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.to(dtype).save_pretrained(path, **kwargs)
    released = _RELEASED_FORMS.get(str(model.config.model_type))
    if released is not None:
        _rewrite_shards(path, released)
    return path


def _renamed(renames: tuple[tuple[str, str], ...]) -> Callable[[Tensors], Tensors]:
    """A shard rewrite that renames tensors by prefix, ``(old prefix, new prefix)``."""

    def rename(name: str) -> str:
        for old, new in renames:
            if name.startswith(old):
                return new + name[len(old) :]
        return name

    return lambda tensors: {rename(n): t for n, t in tensors.items()}


_NEMO_EXPERT = re.compile(
    r"^(llm\.model\.layers\.\d+\.mixer\.experts\.)(\d+)\.(up|down)_proj\.weight$"
)


def _nemo_stacked_experts(tensors: Tensors) -> Tensors:
    """NeMo's export of Nemotron-3.5-Transcribe: each MoE layer's experts stacked, as
    ``(num_experts, in_features, out_features)``: ``experts.gate_and_up_projs`` [E, D, I] (the
    up projections: the experts are not gated) and ``experts.down_projs`` [E, I, D]."""
    out: Tensors = {}
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _NEMO_EXPERT.match(name)
        if match is None:
            out[name] = tensor
            continue
        stacked = "gate_and_up_projs" if match.group(3) == "up" else "down_projs"
        stacks.setdefault(match.group(1) + stacked, {})[int(match.group(2))] = tensor
    for name, experts in stacks.items():
        if sorted(experts) != list(range(len(experts))):  # a layer split across shards
            raise ValueError(f"{name}: experts {sorted(experts)} in one shard, not all")
        out[name] = torch.stack([experts[e].T for e in range(len(experts))]).contiguous()
    return out


#: How the family's released checkpoints store what transformers' save_pretrained writes
#: otherwise (for a model built from its config), as a rewrite of each shard's tensors. Kimi
#: K2.5: a rename meant for the vision tower (blocks -> layers) is reversed onto the language
#: model's layers too. Nemotron-3.5-Transcribe: NeMo's stacked experts (a model loaded from
#: them saves them so again).
_RELEASED_FORMS: dict[str, Callable[[Tensors], Tensors]] = {
    "kimi_k25": _renamed((("language_model.model.blocks.", "language_model.model.layers."),)),
    "nemo_speechlm": _nemo_stacked_experts,
}


def _rewrite_shards(path: Path, rewrite: Callable[[Tensors], Tensors]) -> None:
    """Rewrite the saved tensors of the checkpoint in ``path`` in place, shard by shard (tiny
    models only: each shard is read whole), and the shard index to match."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    weight_map = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            metadata, names = f.metadata(), f.keys()
            tensors = rewrite({n: f.get_tensor(n) for n in names})
        save_file(tensors, shard, metadata=metadata)
        weight_map |= dict.fromkeys(tensors, shard.name)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = weight_map
        index.write_text(json.dumps(data, indent=2))


def build_checkpoint(
    family: str,
    path: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    **overrides: Any,
) -> Path:
    """Build a tiny model of ``family`` (see ``build_model``) and save it to ``path``.

    Returns:
        ``path`` as a ``Path``.
    """
    model = build_model(family, seed=seed, **overrides)
    return save_checkpoint(model, path, dtype=dtype, max_shard_size=max_shard_size)


#: Text the tiny tokenizer is trained on (and a handy source of test documents).
TINY_CORPUS = (
    "The router sends every token to the experts it scores highest.",
    "A mixture of experts model keeps many feed forward networks and uses a few per token.",
    "Pruning removes the experts and attention heads that a task barely uses.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "Calibration data from the task matters more than the pruning criterion.",
)

#: A minimal chat template for the tiny tokenizer (role: content, one message per line).
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
)


def save_tokenizer(path: str | Path, *, vocab_size: int = 100) -> Path:
    """Train a tiny BPE tokenizer on ``TINY_CORPUS`` offline and save it into ``path``.

    Its ids stay below ``vocab_size`` (keep it <= the tiny models' 128). It has ``<pad>`` (0),
    ``<s>``, ``</s>`` and ``<unk>`` and a chat template, so every data format can be profiled.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]
    )
    tok.train_from_iterator(TINY_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    path = Path(path)
    fast.save_pretrained(path)
    return path

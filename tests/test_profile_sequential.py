"""`mfprune profile --sequential`: one decoder layer at a time from the safetensors gives the same
stats as the whole model in memory, never holds two layers, and says clearly what it cannot
load."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_profile import (
    SEQ_LEN,
    assert_clean_error,
    assert_same_stats,
    profile,
    run,
)

from mfprune.errors import ModelError
from mfprune.profiling import ProfileStats
from mfprune.profiling.sequential import LayerByLayer

# every family with a tiny model that --sequential runs: per-expert on-disk names (mixtral
# w1/w2/w3, qwen2_moe gate/up/down + shared expert), dense first layers and groups (deepseek_v3),
# fused experts with biases and sliding-window layers (gpt_oss), attention experts (jetmoe),
# hybrid linear-attention / mamba layers (qwen3_next, jamba, nemotron_h: a decoder that reads
# each layer's block type), layer-dependent rotary and windows (mimo_v2_flash, cohere2_moe)
FAMILIES = [
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss",
    "granitemoe", "phimoe", "jetmoe", "glm4_moe", "dots1", "solar_open", "sarvam_moe",
    "sarvam_mla", "deepseek_v32", "glm4_moe_lite", "mimo_v2_flash", "minimax", "flex_olmo",
    "mellum", "cohere2_moe", "jamba", "granitemoeshared", "granitemoehybrid", "granitemoe_swa",
    "lara_mini", "qwen3_next", "ernie4_5_moe", "exaone_moe", "minimax_m2", "lfm2_moe", "afmoe",
    "hunyuan_v1_moe", "kolibri1", "longcat_flash", "kimi_linear", "axk1", "axk2", "beam",
    "nemotron_h", "hy_v3", "laguna", "flint", "bailing_hybrid", "qwen3_5_moe", "inkling_text",
    "dots3_note_text", "dots3_note", "aria_text", "minimax_m3_vl_text",
]  # fmt: skip
# the families --sequential refuses (with the start of the reason): whatever the decoder does
# beyond handing one layer's output to the next could not be rebuilt one layer at a time
REFUSED = {
    # block states / top-k indices / hyper-connection streams carried between layers
    "inkling2_text": "inputs made from more than the hidden states",
    "glm_moe_dsa": "cannot run with its decoder layers one at a time",
    "hy_v4": "cannot run with its decoder layers one at a time",
    "deepseek_v4": "objects besides tensors (position_embeddings: dict)",  # and HC streams
    "qwen4_exp_text": "cannot run with its decoder layers one at a time",
    "qwen4_exp": "cannot run with its decoder layers one at a time",
    "zaya": "cannot run with its decoder layers one at a time",
    # no `.layers` to run one by one
    "dbrx": "keeps no decoder layers in `.layers`",
    "llama4_text": "keeps no decoder layers in `.layers`",
    "llama4": "keeps no decoder layers in `.layers`",
    "gemma4": "keeps no decoder layers in `.layers`",
    "gemma4_text": "computes buffers (embed_scale) next to weights",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from test_profile import DOCS, write_jsonl

    path = tmp_path_factory.mktemp("seq-data") / "task.jsonl"
    return write_jsonl(path, [{"text": d} for d in DOCS])


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_equals_whole_model(family, model_dir, data):
    whole = profile(model_dir(family), data, batch_size=3)
    layered = profile(model_dir(family), data, batch_size=3, sequential=True)
    assert_same_stats(whole, layered, rtol=1e-6)
    assert layered.meta == whole.meta  # same data and model fingerprints, tokens, dtype


# refused before the model is built, each by its own test: looped layers,
# encoder-decoder (both in test_profile.py), unsupported model types (test_arch_registry.py)
REFUSED_EARLIER = {
    "inkling2_loop", "inkling2_loop_text", "switch_transformers", "nllb-moe", "ernie4_5_vl_moe"
}  # fmt: skip


def test_every_tiny_family_is_checked():
    """Each tiny family is compared with the whole model here, or refused with a tested
    reason: a new family cannot reach --sequential unchecked."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from mfprune.tinymodels import FAMILIES as TINY
    from mfprune.tinymodels import make_config

    listed = [*FAMILIES, *REFUSED, *REFUSED_EARLIER]
    assert len(listed) == len(set(listed)) and set(listed) <= set(TINY)
    rest = [
        family
        for family in TINY
        if family not in listed
        and make_config(family).model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ]
    assert not rest, f"add {rest} to FAMILIES or REFUSED"  # composites are refused up front


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_refused_families_say_why_in_one_line(family, model_dir, data):
    with pytest.raises(ModelError, match=re.escape(REFUSED[family])) as err:
        profile(model_dir(family), data, batch_size=3, sequential=True)
    assert "\n" not in str(err.value) and "without --sequential" in err.value.hint


def test_layer_outputs_unpacked_into_state_are_refused_at_any_batch_size(model_dir, data):
    """glm_moe_dsa's decoder unpacks each layer's output into (hidden, top-k indices): with 2
    layers and 2 sequences a batch, the stand-ins' [2, S, D] outputs unpack without an error;
    the probe still sees layer 1 get something else than layer 0's output."""
    path = model_dir("glm_moe_dsa", num_hidden_layers=2, mlp_layer_types=["dense", "sparse"])
    with pytest.raises(ModelError, match="passes decoder layer 1 more than layer 0's output"):
        profile(path, data, batch_size=2, sequential=True)


def test_layer_arguments_besides_tensors_are_refused(model_dir, data, monkeypatch):
    """A dict handed to every layer (which layers could fill: shared keys and values) is state
    the stand-ins never write: refused, though mixtral itself runs."""
    from transformers.models.mixtral.modeling_mixtral import MixtralModel

    original = MixtralModel.forward

    def with_shared(self: MixtralModel, *args: Any, **kwargs: Any) -> Any:
        return original(self, *args, **kwargs, shared_state={})  # its **kwargs go to the layers

    monkeypatch.setattr(MixtralModel, "forward", with_shared)
    with pytest.raises(ModelError, match=r"layer 0 objects besides tensors \(shared_state: dict"):
        profile(model_dir("mixtral"), data, sequential=True)


def test_bf16_sharded_checkpoint_auto_dtype(model_dir, data):
    """A bf16 checkpoint whose layers straddle shard files runs in bf16 either way."""
    path = model_dir("qwen3_moe", dtype=torch.bfloat16, max_shard_size="60KB")
    assert len(list(path.glob("*.safetensors"))) > 2
    whole = profile(path, data)
    layered = profile(path, data, sequential=True)
    assert layered.meta.dtype == whole.meta.dtype == "bfloat16"
    assert_same_stats(whole, layered, rtol=1e-6)


def test_one_layer_at_a_time_then_freed(model_dir, data, monkeypatch):
    """Every layer runs with all the others on the meta device, and goes back there after."""
    seen: list[list[bool]] = []
    original = LayerByLayer._run

    def spy(self: LayerByLayer, *args: Any) -> None:
        def pre(_module: Any, _args: Any) -> None:
            seen.append([not next(layer.parameters()).is_meta for layer in self.layers])

        handles = [layer.register_forward_pre_hook(pre) for layer in self.layers]
        try:
            original(self, *args)
        finally:
            for h in handles:
                h.remove()
        assert all(p.is_meta for p in self.model.parameters())  # everything freed at the end

    monkeypatch.setattr(LayerByLayer, "_run", spy)
    progress: list[float] = []
    stats = profile(model_dir("deepseek_v3"), data, sequential=True, on_batch=progress.append)
    assert seen and all(sum(loaded) == 1 for loaded in seen)
    assert [row.index(True) for row in seen] == sorted(row.index(True) for row in seen)
    assert sum(progress) == pytest.approx(stats.meta.tokens)  # the bar ends full


def _copy_without(src: Path, dst: Path, tensor: str) -> Path:
    shutil.copytree(src, dst)
    file = dst / "model.safetensors"
    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != tensor}  # noqa: SIM118
    save_file(tensors, file, metadata={"format": "pt"})
    return dst


def test_a_tensor_missing_on_disk_is_one_clear_error(model_dir, data, tmp_path):
    """from_pretrained would quietly initialise a missing norm at random; --sequential refuses."""
    path = _copy_without(
        model_dir("mixtral"), tmp_path / "m", "model.layers.1.post_attention_layernorm.weight"
    )
    with pytest.raises(ModelError, match=r"cannot load decoder layer 1 .*post_attention_layernorm"):
        profile(path, data, sequential=True)


def test_quantized_checkpoint_is_refused(model_dir, data, tmp_path):
    path = tmp_path / "q"
    shutil.copytree(model_dir("mixtral"), path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="quantized checkpoint"):
        profile(path, data, sequential=True)


def test_cli_sequential(model_dir, data, tmp_path):
    out = tmp_path / "seq.safetensors"
    model = model_dir("gpt_oss")
    result = run(
        "profile", model, "--data", data, "--out", out, "--seq-len", SEQ_LEN, "--sequential"
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out}")
    assert_same_stats(ProfileStats.load(out), profile(model, data), rtol=1e-6)
    bad = tmp_path / "bad"
    _copy_without(model, bad, "model.layers.0.self_attn.sinks")
    result = run("profile", bad, "--data", data, "--out", tmp_path / "x.st", "--sequential")
    assert_clean_error(result, "cannot load decoder layer 0", "sinks")
    assert not (tmp_path / "x.st").exists()


@pytest.mark.parametrize("impl", ["eager", "batched_mm"])
def test_slot_outputs_under_other_experts_implementations(impl, model_dir, data):
    """Both paths run each experts module once per (token, slot) through whatever experts
    implementation the config selects; the model's output stays the plain forward's."""
    from transformers import AutoModelForCausalLM

    from mfprune.arch import spec_for_config
    from mfprune.arch.layout import resolve_layout
    from mfprune.checkpoint import open_checkpoint
    from mfprune.profiling.hooks import Recorder

    path = model_dir("qwen3_moe")
    ckpt = open_checkpoint(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, experts_implementation=impl
    ).eval()
    recorder = Recorder(model, resolve_layout(ckpt, spec_for_config(ckpt.config)))
    ids = torch.tensor([[5, 9, 13, 2, 40, 7], [8, 3, 21, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with recorder.attached():
            recorder.set_mask(mask)
            hooked = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(hooked, plain, rtol=1e-6, atol=1e-6)
    stats = recorder.expert_stats("experts")
    assert stats is not None and (stats.tokens == 9).all() and (stats.ean > 0).any()


def test_composite_model_is_refused_with_one_line(model_dir, data, tmp_path):
    from typer.testing import CliRunner

    from mfprune.cli import app

    out = tmp_path / "s.safetensors"
    args = ["profile", str(model_dir("qwen3_vl_moe")), "--data", str(data), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--sequential"])
    assert result.exit_code != 0
    assert "--sequential cannot profile it yet" in result.stderr
    assert "Traceback" not in result.output + result.stderr and not out.exists()

"""Multi-token-prediction layers under their own prefix (Qwen3-Next, Qwen3.5-MoE, Qwen4-Exp:
``mtp.layers.N.*`` beside ``mtp.fc`` / ``mtp.norm`` / ``mtp.pre_fc_norm_*``, counted by
``mtp_num_hidden_layers``). transformers ignores ``^mtp.*``; servers build the head with the
config's expert count, so the rewrite prunes it like the last decoder layer, or removes it
whole with ``--drop-mtp``. An expert-looking tensor outside the decoder layers that no rule
covers stops a prune that changes the count."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from importlib import resources

import pytest
import torch
from checks import assert_exact, removed
from safetensors.torch import load_file, save_file

from mfprune import PrunePlan, rewrite_checkpoint
from mfprune.arch import load_spec_file
from mfprune.arch.spec import parse_spec
from mfprune.errors import ArchError, ModelError
from mfprune.inspect import inspect_model

E = 8
KEPT = {0: [0, 2, 5, 7], 1: [1, 3, 4, 6]}  # the last decoder layer keeps 1, 3, 4, 6
QWEN_HEAD = {  # the MTP head's own tensors, copied unchanged
    "mtp.fc.weight": lambda d: [d, 2 * d],
    "mtp.norm.weight": lambda d: [d],
    "mtp.pre_fc_norm_embedding.weight": lambda d: [d],
    "mtp.pre_fc_norm_hidden.weight": lambda d: [d],
}


@dataclass(frozen=True)
class Case:
    prefix: str  # the decoder layers'
    where: str  # the sub-config holding the counts ("" top level)
    count_key: str
    mtp_key: str
    stored: str  # an MTP layer's prefix, with {i}
    head: dict = field(default_factory=lambda: QWEN_HEAD)
    kept: dict = field(default_factory=lambda: KEPT)

    @property
    def module(self) -> str:
        return self.stored.split("{i}")[0].rsplit(".", 2)[0] + "."


CASES = {
    "qwen3_next": Case(
        "model.layers.", "", "num_experts", "mtp_num_hidden_layers", "mtp.layers.{i}."
    ),
    "qwen4_exp_text": Case(
        "model.layers.", "", "num_experts", "mtp_num_hidden_layers", "mtp.layers.{i}."
    ),
    "qwen3_5_moe": Case(
        "model.language_model.layers.",
        "text_config",
        "num_experts",
        "mtp_num_hidden_layers",
        "mtp.layers.{i}.",
    ),
    "mellum": Case(
        "model.layers.", "", "num_local_experts", "num_nextn_predict_layers", "mtp.layers.{i}."
    ),
    # fused experts, a router row per shared expert after the routed ones (kept); layer 0 dense
    "inkling_text": Case(
        "model.layers.",
        "",
        "n_routed_experts",
        "num_mtp_layers",
        "model.mtp.layers.{i}.transformer_block.",
        head={
            "model.mtp.layers.0.hidden_norm.weight": lambda d: [d],
            "model.mtp.layers.0.embed_norm.weight": lambda d: [d],
            "model.mtp.layers.0.input_proj.weight": lambda d: [d, 2 * d],
            "model.mtp.chain_norm.weight": lambda d: [d],
        },
        kept={1: [0, 2, 5, 7], 2: [1, 3, 4, 6]},
    ),
}


def _with_mtp(source, out, case: Case, *, n_mtp: int = 1, stored: int = 1):
    """Copy ``source`` with ``stored`` MTP layers under ``case.stored`` (the last decoder
    layer's tensors, perturbed: a full-attention MoE layer) and the MTP head's own tensors."""
    shutil.copytree(source, out)
    tensors = load_file(out / "model.safetensors")
    last = f"{case.prefix}{max(case.kept)}."
    g = torch.Generator().manual_seed(5)
    for name, t in list(tensors.items()):
        if name.startswith(last):
            for i in range(stored):
                noise = torch.randn(t.shape, generator=g) * 0.01
                new = case.stored.format(i=i) + name[len(last) :]
                tensors[new] = (t + noise).to(t.dtype).contiguous()
    d = next(t for n, t in tensors.items() if n.endswith("embed_tokens.weight")).shape[1]
    for name, shape in case.head.items():
        tensors[name] = torch.randn(shape(d), generator=g)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (config[case.where] if case.where else config)[case.mtp_key] = n_mtp
    (out / "config.json").write_text(json.dumps(config))
    return out


def _lm(config: dict, where: str) -> dict:
    return config[where] if where else config


def _num_layers(src, case: Case) -> int:
    """The decoder-layer count: mfprune numbers the MTP layers from there."""
    return _lm(json.loads((src / "config.json").read_text()), case.where)["num_hidden_layers"]


@pytest.fixture(scope="module", params=sorted(CASES))
def source(request, tiny_checkpoint, tmp_path_factory):
    family = request.param
    out = tmp_path_factory.mktemp(f"mtp-{family}") / "model"
    return family, _with_mtp(tiny_checkpoint(family), out, CASES[family])


def _mtp_experts(tensors: dict) -> dict[int, dict[str, torch.Tensor]]:
    """MTP layer 0's per-expert tensors: expert id -> {name after the id: tensor}."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = re.match(r"mtp\.layers\.0\.mlp\.experts\.(\d+)\.(.*)$", name)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = t
    return found


def test_mtp_layer_keeps_the_last_layers_experts_and_the_model_stays_exact(source, tmp_path):
    family, src = source
    case = CASES[family]
    kept, last = case.kept, max(case.kept)
    out = tmp_path / "pruned"
    rewrite_checkpoint(src, PrunePlan(experts=kept), out)
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    mtp = case.stored.format(i=0)
    router = before[f"{mtp}mlp.gate.weight"]
    extra = list(range(E, router.shape[0]))  # Inkling: a row per shared expert, kept
    assert torch.equal(after[f"{mtp}mlp.gate.weight"], router[kept[last] + extra])
    # every output tensor is its source's bytes: a kept expert's under its new number, a
    # sliced one (router rows, fused experts, biases) its kept rows; the MTP head's fc, norms,
    # attention and shared expert unchanged
    layer_of = re.compile(rf"^(?:{re.escape(case.prefix)}(\d+)\.|{re.escape(mtp)})")
    expert = re.compile(r"^(.*\.experts\.)(\d+)(\..*)$")
    for name, t in after.items():
        where = layer_of.match(name)
        layer = None if where is None else last if where.group(1) is None else int(where[1])
        m = expert.match(name) if layer in kept else None
        origin = f"{m[1]}{kept[layer][int(m[2])]}{m[3]}" if m else name
        if before[origin].shape == t.shape:
            assert torch.equal(t.view(torch.uint8), before[origin].view(torch.uint8)), name
        else:
            assert layer in kept, name
            ids = kept[layer] + list(range(E, before[origin].shape[0]))
            assert torch.equal(t, before[origin][ids]), name
    assert {n for n in before if n.startswith(case.module)} >= set(case.head)
    assert set(case.head) <= set(after)
    config = _lm(json.loads((out / "config.json").read_text()), case.where)
    assert (config[case.count_key], config[case.mtp_key]) == (4, 1)
    plan = PrunePlan.load(out / "mfprune_plan.json")
    mtp_layer = _num_layers(src, case)
    assert plan.experts[mtp_layer] == tuple(kept[last])
    assert f"MTP layer(s) [{mtp_layer}]" in plan.meta["mtp"]
    # stock transformers ignores the MTP head: the language model is the masked original
    assert_exact(src, out, experts=removed(kept, E), allow_unexpected=True)


# family -> kept query heads (4 heads, 2 KV heads): the MTP layer follows the last layer's
HEADS_ONLY = {
    "qwen3_next": {1: [1, 3]},  # layer 0: Gated DeltaNet
    "qwen3_5_moe": {1: [1, 3]},  # the same, beside a vision tower (untouched)
    "qwen4_exp_text": {1: [1, 3]},  # the same, with a QSA indexer (heads of its own)
    "mellum": {0: [0, 1], 1: [2, 3]},  # a whole KV group goes: num_key_value_heads 2 -> 1
}


@pytest.mark.parametrize("family", sorted(HEADS_ONLY))
def test_mtp_heads_follow_the_last_layer(family, tiny_checkpoint, tmp_path):
    """A plan that prunes only heads: the MTP layer keeps the last decoder layer's heads (its
    attention matches the config's new head counts) and every expert; the model stays exact."""
    case, heads = CASES[family], HEADS_ONLY[family]
    src = _with_mtp(tiny_checkpoint(family), tmp_path / "src", case)
    out = tmp_path / "pruned"
    rewrite_checkpoint(src, PrunePlan(heads=heads), out)
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    last, mtp = f"{case.prefix}{max(heads)}.", case.stored.format(i=0)
    for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
        name = f"{last}self_attn.{part}.weight"
        assert after[f"{mtp}self_attn.{part}.weight"].shape == after[name].shape, part
    assert after[f"{mtp}self_attn.o_proj.weight"].shape != before[f"{mtp}self_attn.o_proj.weight"]
    assert after[f"{mtp}mlp.gate.weight"].shape[0] == E  # no expert plan: all kept
    assert set(case.head) <= set(after)
    config = _lm(json.loads((out / "config.json").read_text()), case.where)
    kv = len({q // 2 for q in heads[max(heads)]})
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, kv)
    assert PrunePlan.load(out / "mfprune_plan.json").heads[_num_layers(src, case)] == tuple(
        heads[max(heads)]
    )
    assert_exact(src, out, heads=removed(heads, 4), allow_unexpected=True)


def test_an_undescribed_mtp_attention_stops_a_heads_only_prune(tiny_checkpoint, tmp_path):
    """A heads-only plan changes no expert count, but the config's head counts are one for
    every layer: an MTP head the adapter does not describe would keep its old heads."""
    src = _with_mtp(tiny_checkpoint("qwen3_next"), tmp_path / "src", CASES["qwen3_next"])
    spec = _without_rule(tmp_path)
    out = tmp_path / "pruned"
    with pytest.raises(
        ModelError,
        match=r"^6 tensor\(s\) outside the decoder layers look like the attention of a layer "
        r"this rewrite does not prune: mtp\.layers\.0\.self_attn\..*; they would keep their "
        r"heads while the config's num_attention_heads = 4 → 2 changes; nothing was "
        r"written \(hint",
    ) as refused:
        rewrite_checkpoint(src, PrunePlan(heads={1: [1, 3]}), out, spec=spec)
    assert "mtp_prefix" in refused.value.hint and "untouched" in refused.value.hint
    assert not out.exists()


def test_an_attention_tensor_outside_the_layers_stops_a_heads_only_prune(tiny_checkpoint, tmp_path):
    """One stray ``mtp.layers.0.self_attn.q_proj.weight`` in a family without MTP rules."""
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint("qwen3_moe"), src)
    tensors = load_file(src / "model.safetensors")
    q = tensors["model.layers.1.self_attn.q_proj.weight"]
    tensors["mtp.layers.0.self_attn.q_proj.weight"] = q.clone()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "pruned"
    with pytest.raises(
        ModelError,
        match=r"^1 tensor\(s\) outside the decoder layers look like the attention of a layer "
        rf"this rewrite does not prune: mtp\.layers\.0\.self_attn\.q_proj\.weight "
        rf"\[{q.shape[0]}, {q.shape[1]}\]; they would keep their heads while the config's "
        r"num_attention_heads = 4 → 2, num_key_value_heads = 2 → 1 changes",
    ):
        rewrite_checkpoint(src, PrunePlan(heads={0: [0, 1], 1: [2, 3]}), out)
    assert not out.exists()
    # a plan that changes no head count leaves it consistent: copied as it is
    rewrite_checkpoint(src, PrunePlan(experts=KEPT), out)
    assert torch.equal(
        load_file(out / "model.safetensors")["mtp.layers.0.self_attn.q_proj.weight"], q
    )


def test_towers_with_attention_of_their_own_pass_through_untouched(tiny_checkpoint, tmp_path):
    """Qwen3.5-MoE's vision tower (model.visual.blocks.N.attn.*) reads vision_config's heads:
    carried on purpose (``untouched``); without that key a heads-only plan is refused."""
    src = tiny_checkpoint("qwen3_5_moe")
    spec_text = resources.files("mfprune.arch").joinpath("families", "qwen3_5_moe.toml")
    text = spec_text.read_text("utf-8")
    assert 'untouched = ["model.visual."]' in text
    adapter = tmp_path / "no_untouched.toml"
    adapter.write_text(text.replace('untouched = ["model.visual."]', ""))
    with pytest.raises(ModelError, match=r"model\.visual\.blocks\.0\.attn\."):
        rewrite_checkpoint(
            src, PrunePlan(heads={1: [1, 3]}), tmp_path / "a", spec=load_spec_file(adapter)
        )
    rewrite_checkpoint(src, PrunePlan(heads={1: [1, 3]}), tmp_path / "b")
    assert_exact(src, tmp_path / "b", heads=removed({1: [1, 3]}, 4))


@pytest.mark.parametrize("family", ["qwen3_5_moe", "inkling_text"])
def test_drop_mtp_removes_the_whole_mtp_head_and_says_so(family, tiny_checkpoint, tmp_path):
    case = CASES[family]
    src = _with_mtp(tiny_checkpoint(family), tmp_path / "src", case)
    out = tmp_path / "pruned"
    result = rewrite_checkpoint(src, PrunePlan(experts=case.kept), out, drop_mtp=True)
    # the MTP layers and the head's own tensors (fc, norms; Inkling's per-layer extras)
    assert not [n for n in load_file(out / "model.safetensors") if n.startswith(case.module)]
    config = _lm(json.loads((out / "config.json").read_text()), case.where)
    assert (config[case.count_key], config[case.mtp_key]) == (4, 0)
    key = f"{case.where}.{case.mtp_key}" if case.where else case.mtp_key
    assert result.config_changes[key] == [1, 0]
    assert_exact(src, out, experts=removed(case.kept, E))  # no unexpected keys left


def test_inspect_reports_the_mtp_layer_under_its_own_prefix(source):
    family, src = source
    report = inspect_model(src)
    assert report.mtp_layers == [_num_layers(src, CASES[family])]
    assert report.uncovered_expert_tensors == []


def test_more_mtp_layers_stored_than_the_config_counts_is_refused(tiny_checkpoint, tmp_path):
    src = _with_mtp(tiny_checkpoint("qwen3_next"), tmp_path / "src", CASES["qwen3_next"], stored=2)
    with pytest.raises(
        ModelError,
        match=r"num_hidden_layers = 2 \(\+ 1 MTP\) but the weights hold 4 layers "
        r"\(model\.layers\.0 … model\.layers\.1, mtp\.layers\.0\. … mtp\.layers\.1\.\)",
    ):
        rewrite_checkpoint(src, PrunePlan(experts=KEPT), tmp_path / "pruned")
    assert not (tmp_path / "pruned").exists()


def _without_rule(tmp_path):
    """The built-in qwen3_next adapter without its mtp_prefix rule."""
    builtin = resources.files("mfprune.arch").joinpath("families", "qwen3_next.toml")
    text = builtin.read_text("utf-8").replace('mtp_prefix = "mtp.layers.{layer}."', "")
    adapter = tmp_path / "no_prefix.toml"
    adapter.write_text(text)
    return load_spec_file(adapter)


def test_an_mtp_head_the_adapter_does_not_describe_stops_the_prune(tiny_checkpoint, tmp_path):
    src = _with_mtp(tiny_checkpoint("qwen3_next"), tmp_path / "src", CASES["qwen3_next"])
    spec = _without_rule(tmp_path)
    out = tmp_path / "pruned"
    with pytest.raises(
        ModelError,
        match=r"25 tensor\(s\) outside the decoder layers look like experts or a router of an "
        r"MoE this rewrite does not prune: mtp\.layers\.0\.mlp\.experts\.0\..*num_experts = 8 "
        r"changes; nothing was written",
    ):
        rewrite_checkpoint(src, PrunePlan(experts=KEPT), out, spec=spec)
    assert not out.exists()
    uncovered = inspect_model(src, spec=spec).uncovered_expert_tensors
    assert "mtp.layers.0.mlp.gate.weight" in uncovered and len(uncovered) == 25


def test_an_unknown_expert_tensor_outside_the_layers_stops_the_prune(tiny_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint("qwen3_next"), src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.extra_moe.experts.3.w.weight"] = torch.zeros(4, 4)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "pruned"
    with pytest.raises(ModelError, match=r"model\.extra_moe\.experts\.3\.w\.weight \[4, 4\]"):
        rewrite_checkpoint(src, PrunePlan(experts=KEPT), out)
    assert not out.exists()
    # a plan that keeps every expert changes no count: the tensor is copied as it is
    rewrite_checkpoint(src, PrunePlan(heads={1: [1, 3]}), out)
    assert "model.extra_moe.experts.3.w.weight" in load_file(out / "model.safetensors")


def test_parts_carried_on_purpose_pass_the_check(tiny_checkpoint, tmp_path):
    """dots.note 3's vision tower routes over experts of its own (``untouched``): copied."""
    src = tiny_checkpoint("dots3_note")
    spec_text = resources.files("mfprune.arch").joinpath("families", "dots3_note.toml")
    adapter = tmp_path / "no_untouched.toml"
    adapter.write_text(spec_text.read_text("utf-8").replace('untouched = ["vision_encoder."]', ""))
    kept = {1: [0, 2, 5, 7], 2: [1, 3, 4, 6]}
    with pytest.raises(ModelError, match=r"vision_encoder\.blocks\.0\.mlp\.experts\.0\."):
        rewrite_checkpoint(
            src, PrunePlan(experts=kept), tmp_path / "a", spec=load_spec_file(adapter)
        )
    rewrite_checkpoint(src, PrunePlan(experts=kept), tmp_path / "b")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({}, "mtp_prefix needs mtp_layers_key"),
        ({"mtp_layers_key": "n", "mtp_prefix": "mtp.{layer}."}, "expected '<module>.<list>"),
        ({"mtp_layers_key": "n", "mtp_prefix": "model.mtp_layers.{layer}."}, "holds the decoder"),
    ],
)
def test_a_malformed_mtp_prefix_is_refused(extra, message):
    data = {
        "family": "x",
        "mtp_prefix": "mtp.layers.{layer}.",
        "experts": {
            "count_keys": ["num_experts"],
            "router": "model.layers.{layer}.mlp.gate.weight",
            "per_expert": ["model.layers.{layer}.mlp.experts.{expert}.w.weight"],
        },
        **extra,
    }
    with pytest.raises(ArchError, match=re.escape(message)):
        parse_spec(data, source="test")


def test_quantization_config_names_of_mtp_experts_are_renumbered(tiny_checkpoint, tmp_path):
    src = _with_mtp(tiny_checkpoint("qwen3_next"), tmp_path / "src", CASES["qwen3_next"])
    config = json.loads((src / "config.json").read_text())
    names = [
        "mtp.layers.0.mlp.experts.4.down_proj",
        "mtp.layers.0.mlp.experts.5.up_proj",
        "lm_head",
    ]
    config["quantization_config"] = {"quant_method": "fp8", "modules_to_not_convert": names}
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "pruned"
    rewrite_checkpoint(src, PrunePlan(experts=KEPT), out)  # MTP keeps 1, 3, 4, 6
    written = json.loads((out / "config.json").read_text())["quantization_config"]
    assert written["modules_to_not_convert"] == ["mtp.layers.0.mlp.experts.2.down_proj", "lm_head"]


def test_an_mtp_layer_saved_with_fused_experts_is_sliced(tiny_checkpoint, tmp_path):
    """A released Qwen4-Exp checkpoint saves its MTP experts fused
    (``mtp.layers.0.mlp.experts.gate_up_proj`` [E, 2I, D], ``down_proj`` [E, D, I]) beside
    decoder layers saved one expert at a time: sliced along the expert axis."""
    src = _with_mtp(tiny_checkpoint("qwen4_exp_text"), tmp_path / "src", CASES["qwen4_exp_text"])
    tensors = load_file(src / "model.safetensors")
    per = _mtp_experts(tensors)
    for name in [n for n in tensors if n.startswith("mtp.layers.0.mlp.experts.")]:
        del tensors[name]
    fused = {
        "gate_up_proj": torch.stack(
            [torch.cat([per[e]["gate_proj.weight"], per[e]["up_proj.weight"]]) for e in range(E)]
        ),
        "down_proj": torch.stack([per[e]["down_proj.weight"] for e in range(E)]),
    }
    for part, t in fused.items():
        tensors[f"mtp.layers.0.mlp.experts.{part}"] = t
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "pruned"
    rewrite_checkpoint(src, PrunePlan(experts=KEPT), out)
    after = load_file(out / "model.safetensors")
    for part, t in fused.items():
        assert torch.equal(after[f"mtp.layers.0.mlp.experts.{part}"], t[KEPT[1]]), part
    assert after["mtp.layers.0.mlp.gate.weight"].shape[0] == 4
    # fused, with one tensor lacking the expert axis: refused, as in any pruned layer
    tensors["mtp.layers.0.mlp.experts.down_proj"] = fused["down_proj"][0].contiguous()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ModelError, match=r"covers them: mtp\.layers\.0\.mlp\.experts\.down_proj \["
    ):
        rewrite_checkpoint(src, PrunePlan(experts=KEPT), tmp_path / "refused")

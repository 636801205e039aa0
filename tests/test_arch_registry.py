"""Every MoE family in the installed transformers has an adapter or a stated reason why not, so
a transformers upgrade that adds one fails here until someone decides; unknown families get a
suggestion only when one is close."""

from __future__ import annotations

import dataclasses
import inspect
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from transformers import CONFIG_MAPPING, PretrainedConfig

from mfprune.arch import builtin_specs, spec_for_config, unsupported_families
from mfprune.errors import ArchError

#: Config fields that hold a routed-expert count in some family.
EXPERT_COUNT_KEYS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}


def _fields(cls: type, seen: frozenset = frozenset()) -> set[str]:
    """Every field a config class (and its sub-config classes) declares."""
    if cls in seen or not isinstance(cls, type) or not issubclass(cls, PretrainedConfig):
        return set()
    names = set(inspect.signature(cls.__init__).parameters) | set(cls.attribute_map)
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    for sub in getattr(cls, "sub_configs", {}).values():
        names |= _fields(sub, seen | {cls})
    return names


def _dict_keys(data: Any) -> set[str]:
    """Keys of a nested config dict (sub-configs that the class declares only as AutoConfig)."""
    if not isinstance(data, dict):
        return set()
    keys = {k for k in data if isinstance(k, str)}
    for value in data.values():
        keys |= _dict_keys(value)
    return keys


def moe_model_types() -> set[str]:
    """``model_type``s whose config (or a sub-config) declares an expert count."""
    found = set()
    for model_type, cls in CONFIG_MAPPING.items():
        names = _fields(cls)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                names |= _dict_keys(cls().to_dict())
        except Exception:  # some configs cannot be built from defaults; their fields still count
            pass
        if names & EXPERT_COUNT_KEYS:
            found.add(model_type)
    return found


@pytest.fixture(scope="module")
def moe_types() -> set[str]:
    return moe_model_types()


def _supported() -> dict[str, str]:
    return {mt: spec.family for spec in builtin_specs().values() for mt in spec.model_types}


def test_the_walk_finds_known_families(moe_types):
    # the walk itself must work, or the completeness check below would pass on nothing
    assert {"mixtral", "deepseek_v3", "jetmoe", "qwen3_vl_moe", "dbrx", "kimi_k25"} <= moe_types
    assert not {"llama", "gpt2", "qwen3", "bert"} & moe_types


def test_every_moe_family_has_an_adapter_or_a_reason(moe_types):
    supported, unsupported = _supported(), unsupported_families()
    missing = sorted(moe_types - set(supported) - set(unsupported))
    assert not missing, (
        f"transformers has MoE families mfprune does not know: {missing}; add an adapter in "
        "mfprune/arch/families/ or an entry with its reason in mfprune/arch/unsupported.toml"
    )


def test_the_unsupported_list_is_current(moe_types):
    supported, unsupported = _supported(), unsupported_families()
    assert not set(supported) & set(unsupported), "a family is both supported and unsupported"
    stale = sorted(set(unsupported) - moe_types)
    assert not stale, f"unsupported.toml names families transformers no longer has: {stale}"
    assert all(len(reason) > 20 for reason in unsupported.values())


def test_every_adapter_serves_a_transformers_family(moe_types):
    for model_type, family in _supported().items():
        assert model_type in moe_types, f"adapter {family} serves unknown {model_type!r}"


@pytest.mark.parametrize(
    ("model_type", "expected", "absent"),
    [
        ("nllb-moe", "runs expert_0", "did you mean"),  # known: its reason
        ("doge", "product-key experts", "did you mean"),
        ("mixtrall", "did you mean 'mixtral'?", None),  # a typo: the close name
        ("falcon_mamba", "supported: ", "did you mean"),  # nothing close: no suggestion
        ("ernie_vl_x", "supported: ", "did you mean"),
        ("granite_moe_x", "did you mean 'granitemoe'?", None),
        ("mamba_moe", "supported: ", "did you mean"),
        ("llama", "supported: ", "did you mean"),  # close to llama4, but a dense family
        ("llama", "transformers knows it as a family without routed experts", None),
    ],
)
def test_unknown_family_message(model_type, expected, absent):
    with pytest.raises(ArchError) as err:
        spec_for_config({"model_type": model_type})
    message = str(err.value)
    assert f"unsupported model_type '{model_type}'" in message
    assert expected in message
    if absent:
        assert absent not in message


@pytest.mark.parametrize(
    ("family", "phrases"),
    [
        (
            "glm4_moe",
            [
                "top-2 of 8 experts",
                "plus the bias model.layers.L.mlp.gate.e_score_correction_bias",
                "2 groups of 4",
                "top-1 groups ranked by the sum of its top-2 scores",
                "shared experts (model.layers.L.mlp.shared_experts.)",
                "MoE layers: layers from first_k_dense_replace on",
            ],
        ),
        ("deepseek_v32", ["layers whose mlp_layer_types entry is 'sparse'"]),
        (
            "kimi_linear",
            [
                "top-2 of 8 experts scored by model.layers.L.block_sparse_moe.gate",
                "plus the bias model.layers.L.block_sparse_moe.gate.e_score_correction_bias",
                "MoE layers: layers whose mlp_layer_types entry is 'sparse' "
                "(without that list: layers from first_k_dense_replace on)",
            ],
        ),
        ("jamba", ["every expert_layer_period-th layer (starting at expert_layer_offset)"]),
        (
            "nemotron_h",
            [
                "MoE layers: layers whose layers_block_type (or hybrid_override_pattern) entry "
                "is 'moe' or 'E'"
            ],
        ),
        ("mixtral", ["top-2 of 8 experts scored by model.layers.L.block_sparse_moe.gate"]),
        ("llama4", ["the layers listed in moe_layers (when the config has it)"]),
        (
            "inkling2_loop",
            [
                "looped: layers 1..2 (loop_layer_index_start..loop_layer_index_end - 1) run 3 "
                "times per token (loop_num_passes), so their routers see every token 3 times; "
                "profiling sums every pass",
                "MoE layers: every layer",
            ],
        ),
    ],
)
def test_inspect_states_the_routing_rule(family, phrases, tiny_checkpoint):
    from mfprune.inspect import inspect_model

    report = inspect_model(tiny_checkpoint(family))
    for phrase in phrases:
        assert phrase in report.experts.routing
    if family in ("jamba", "mixtral"):
        assert "group-limited" not in report.experts.routing
        assert "bias" not in report.experts.routing
    if family != "inkling2_loop":
        assert "looped" not in report.experts.routing


def test_a_list_of_moe_layers_decides_over_the_interleave_step(tiny_checkpoint, tmp_path):
    import shutil

    from mfprune.arch.layout import resolve_layout
    from mfprune.checkpoint import open_checkpoint
    from mfprune.errors import ModelError

    source = tmp_path / "llama4"
    shutil.copytree(tiny_checkpoint("llama4"), source)
    config = json.loads((source / "config.json").read_text())
    spec = builtin_specs()["llama4"]

    def layers(text_config: dict) -> tuple[int, ...]:
        config["text_config"].update(text_config)
        (source / "config.json").write_text(json.dumps(config))
        return resolve_layout(open_checkpoint(source), spec).experts.layers

    assert layers({}) == (1, 3)
    assert layers({"interleave_moe_layer_step": 1}) == (1, 3)  # moe_layers decides
    with pytest.raises(ModelError, match=r"makes layers \[1\] MoE but router tensors exist"):
        layers({"moe_layers": [1]})
    del config["text_config"]["moe_layers"]
    assert layers({"interleave_moe_layer_step": 2}) == (1, 3)  # without the list: the step


def test_inspect_names_a_hybrids_attention_layers(tiny_checkpoint):
    from typer.testing import CliRunner

    from mfprune.cli import app

    result = CliRunner().invoke(app, ["inspect", str(tiny_checkpoint("jamba")), "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["head_layers"] == [1, 3]
    assert report["experts"]["layers"] == [0, 2]
    assert "Jamba" in report["description"]


def test_readme_and_families_page_list_the_adapters():
    from pathlib import Path

    from mfprune.arch.catalog import families_page, with_readme_block

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text("utf-8")
    hint = "run `python -m mfprune.arch.catalog` to regenerate"
    assert with_readme_block(readme) == readme, f"README.md's family list is stale; {hint}"
    assert (root / "docs" / "families.md").read_text("utf-8") == families_page(), hint
    for family in builtin_specs():
        assert f"`{family}`" in readme


def test_an_encoder_decoder_adapter_is_checked(tiny_checkpoint, tmp_path):
    import shutil
    import tomllib

    from mfprune.arch import parse_spec
    from mfprune.arch.layout import resolve_layout
    from mfprune.checkpoint import open_checkpoint
    from mfprune.errors import ModelError

    text = (
        Path(__file__).parents[1] / "mfprune/arch/families/switch_transformers.toml"
    ).read_text()
    data = tomllib.loads(text)
    bad = json.loads(json.dumps(data))  # a deep copy
    bad["experts"]["router"] = "encoder.block.{layer}.layer.1.mlp.router.classifier.weight"
    del bad["heads"]
    bad["stacks"][1]["per_expert"] = ["decoder.block.{layer}.wi.weight"]
    bad["stacks"][1]["num_layer_key"] = bad["stacks"][1].pop("num_layers_key")
    with pytest.raises(ArchError) as err:
        parse_spec(bad, source="bad.toml")
    for fragment in (
        "experts.router: with [[stacks]], each stack names its own router",
        "heads.unsupported: an adapter with [[stacks]] must say why",
        "stacks[1].per_expert: 'decoder.block.{layer}.wi.weight' has no {expert} placeholder",
        "stacks[1]: unknown key 'num_layer_key' — did you mean 'num_layers_key'?",
        "stacks[1]: missing required key 'num_layers_key'",
    ):
        assert fragment in str(err.value)
    # a config that lies about a stack's layer count
    source = tmp_path / "switch"
    shutil.copytree(tiny_checkpoint("switch_transformers"), source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(config | {"num_decoder_layers": 3}))
    with pytest.raises(ModelError, match="num_decoder_layers = 3 but the weights hold 2 layers"):
        resolve_layout(open_checkpoint(source), parse_spec(data, source="ok.toml"))


def test_a_loop_adapter_is_checked(tiny_checkpoint, tmp_path):
    """[loop]: closed parsing; the passes come from the config's keys, the first present
    deciding (a released config's loop_config wins, as in transformers); a config without
    them, or with a loop outside the layers, is refused."""
    import shutil
    import tomllib

    from mfprune.arch import parse_spec
    from mfprune.arch.layout import resolve_layout
    from mfprune.checkpoint import open_checkpoint
    from mfprune.errors import ModelError

    text = (Path(__file__).parents[1] / "mfprune/arch/families/inkling2_loop.toml").read_text()
    data = tomllib.loads(text)
    bad = json.loads(json.dumps(data))  # a deep copy
    bad["loop"]["pases_key"] = bad["loop"].pop("passes_key")
    bad["loop"]["end_key"] = []
    with pytest.raises(ArchError) as err:
        parse_spec(bad, source="bad.toml")
    for fragment in (
        "loop: unknown key 'pases_key' — did you mean 'passes_key'?",
        "loop: missing required key 'passes_key'",
        "loop.end_key: name at least one config key",
    ):
        assert fragment in str(err.value)
    spec = parse_spec(data, source="ok.toml")
    source = tmp_path / "loop"
    shutil.copytree(tiny_checkpoint("inkling2_loop"), source)
    config = json.loads((source / "config.json").read_text())

    def passes(text_config: dict) -> list[int]:
        edited = json.loads(json.dumps(config))
        edited["text_config"].update(text_config)
        edited["text_config"] = {k: v for k, v in edited["text_config"].items() if v is not None}
        (source / "config.json").write_text(json.dumps(edited))
        layout = resolve_layout(open_checkpoint(source), spec)
        assert layout.experts.passes == layout.passes
        return [layout.passes.of(L) for L in range(layout.num_layers)]

    assert passes({}) == [1, 3, 3, 1]
    assert passes({"loop_config": {"num_passes": 2}}) == [1, 2, 2, 1]  # it wins; the rest flat
    assert passes({"loop_config": {"core_start": 2, "core_end": 3}}) == [1, 1, 3, 1]
    assert passes({"loop_num_passes": 1}) == [1, 1, 1, 1]  # once: no loop
    with pytest.raises(ModelError, match=r"no valid 'text_config\.loop_config\.num_passes' or "):
        passes({"loop_num_passes": None})  # transformers would take its default (3)
    with pytest.raises(ModelError, match=r"got 2\.0"):
        passes({"loop_num_passes": 2.0})
    with pytest.raises(ModelError, match="but the model has 4 layers"):
        passes({"loop_layer_index_end": 6})
    with pytest.raises(ModelError, match="run at least once"):
        passes({"loop_num_passes": 0})

"""load_pretrained: load a pruned checkpoint, including one whose layers keep different
expert counts (``--allow-uneven`` / ``--global-budget``), which stock transformers cannot.

Stock configs hold one expert count. A checkpoint with per-layer counts records them in
``config.json`` under ``mfprune_expert_counts`` (and the largest count under the stock keys).
While transformers builds the model, each decoder layer is given a copy of the config with its
own count, so every router and expert tensor is created at its real size and the weights load
through transformers' normal path (with its key conversions).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mfprune.arch import spec_for_config
from mfprune.errors import ModelError
from mfprune.modelcode import check_loadable, model_kwargs
from mfprune.rewrite.config_patch import UNEVEN_KEY


def load_pretrained(path: str | Path, **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` that also handles per-layer
    expert counts. A checkpoint saved from another head (``config.json``'s ``architectures``:
    a token classifier, an image-text model, an encoder-decoder model) loads with its own class
    (``model_class_for``). Returns the model."""
    from mfprune.checkpoint import model_location

    path = model_location(path)  # "default": the embedded default model
    kwargs.setdefault("use_safetensors", True)  # never unpickle weights
    kwargs.setdefault("local_files_only", True)  # no hub at run time
    asked_for_info = kwargs.get("output_loading_info", False)
    kwargs["output_loading_info"] = True
    config_path = Path(path) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {config_path}: {exc}", hint="pass a model folder") from None
    check_loadable(config, where=str(path))
    kwargs.update(model_kwargs())  # --trust-remote-code (mfprune.modelcode)
    counts = config.get(UNEVEN_KEY)
    model_class = model_class_for(config)
    with quantization_support(path):
        if not counts:
            loaded = model_class.from_pretrained(path, **kwargs)
            return _checked(loaded, path, asked_for_info)
        keys = [k for e in _expert_specs(config) for k in e.count_keys if k in config]
        per_layer = {int(layer): int(n) for layer, n in counts.items()}
        with _per_layer_counts(config, keys, per_layer, model_class):
            loaded = model_class.from_pretrained(path, **kwargs)
            return _checked(loaded, path, asked_for_info)


@contextlib.contextmanager
def quantization_support(model_dir: str | Path) -> Iterator[None]:
    """Around a ``from_pretrained`` of ``model_dir``: a quantized checkpoint that transformers
    cannot run here (GPTQ needs optimum, AWQ autoawq, compressed-tensors its package) is
    refused in one line saying what is needed."""
    try:
        yield
    except ImportError as exc:
        try:
            config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise exc from None
        qc = config.get("quantization_config") if isinstance(config, dict) else None
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        if not method:
            raise
        raise ModelError(
            f"transformers cannot run this {method} checkpoint here: {exc}",
            hint="install what it names to profile, bench or verify this model; inspect and "
            "prune with a plan work without it (docs/checkpoint-formats.md)",
        ) from None


def model_class_for(config: dict[str, Any]) -> Any:
    """The class that loads a checkpoint whole: a composite model's ``auto_model_class``; the
    class it was saved from (``architectures[0]``) when that is not a causal LM (a token
    classifier...); else ``AutoModelForCausalLM``."""
    import transformers

    composite = auto_model_class(str(config.get("model_type")))
    if composite is not transformers.AutoModelForCausalLM:
        return composite
    names = config.get("architectures")
    name = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else ""
    own = getattr(transformers, name, None) if name.isidentifier() else None
    is_model = isinstance(own, type) and issubclass(own, transformers.PreTrainedModel)
    if is_model and not name.endswith("ForCausalLM"):
        return own
    return transformers.AutoModelForCausalLM


def auto_model_class(model_type: str) -> type:
    """The transformers auto class that builds a ``model_type`` whole: for a composite (vision +
    text) model ``AutoModelForImageTextToText``, so its towers load too (a causal-LM class
    would drop them); for one that also speaks (Qwen3-Omni-MoE: thinker, talker, code2wav)
    ``AutoModelForMultimodalLM``; for an encoder-decoder model with no causal-LM class (Switch
    Transformers, NLLB-MoE) ``AutoModelForSeq2SeqLM``; for one whose only head is a token
    classifier (OpenAI's privacy filter) ``AutoModelForTokenClassification``; else
    ``AutoModelForCausalLM``."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForMultimodalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForTokenClassification,
    )
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    )

    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    if model_type in MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES and (
        model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        return AutoModelForMultimodalLM
    if (
        model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
        and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        return AutoModelForSeq2SeqLM
    if (
        model_type in MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES
        and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        return AutoModelForTokenClassification
    return AutoModelForCausalLM


def _checked(loaded: tuple[Any, dict], path: str | Path, with_info: bool):
    """Refuse a model whose weights did not all load (transformers would initialise them at
    random and carry on); return the model (and the loading info when it was asked for)."""
    model, info = loaded
    missing = list(info.get("missing_keys", ())) + list(info.get("mismatched_keys", ()))
    if missing:
        raise ModelError(
            f"{path} lacks {len(missing)} weight(s) the model needs (e.g. {missing[0]})",
            hint="the checkpoint is incomplete or its config.json does not match its weights",
        )
    return (model, info) if with_info else model


def _expert_specs(config: dict[str, Any]):
    spec = spec_for_config(config)
    return [e for e in (spec.experts, spec.attention_experts) if e is not None]


@contextlib.contextmanager
def _per_layer_counts(
    config: dict[str, Any], keys: list[str], counts: dict[int, int], model_class: type
) -> Iterator:
    """Patch the family's decoder-layer class so layer L is built with ``counts[L]`` experts
    (``model_class``: the class that loads the checkpoint, an auto class or the model's own)."""
    from transformers import AutoConfig

    config_cls = type(AutoConfig.for_model(config["model_type"]))
    mapping = getattr(model_class, "_model_mapping", None)  # an auto class: the one it builds
    model_cls = mapping[config_cls] if mapping is not None else model_class
    module = sys.modules[model_cls.__module__]
    layer_cls = getattr(module, model_cls._no_split_modules[0])
    original = layer_cls.__init__
    # the layer index is the argument after the config (whatever its name); a layer class that
    # takes none (OpenAI's privacy filter) is built once per layer, in order: the n-th is layer n
    params = [
        p
        for p in inspect.signature(original).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    index_name = params[2].name if len(params) > 2 else None
    built = itertools.count()

    def init(self, layer_config, *args, **kwargs):
        given = (args[0] if args else kwargs[index_name]) if index_name else None
        layer_idx = next(built) if index_name is None else given
        if layer_idx in counts:
            layer_config = copy.copy(layer_config)
            for key in keys:
                setattr(layer_config, key, counts[layer_idx])
        original(self, layer_config, *args, **kwargs)

    layer_cls.__init__ = init
    try:
        yield
    finally:
        layer_cls.__init__ = original

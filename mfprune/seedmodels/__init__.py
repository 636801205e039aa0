"""Reference models of the seed papers' MoE designs that transformers does not ship, in plain
PyTorch (``blocks.py`` has the shared pieces). Each is a ``PreTrainedModel`` with its own
config, saved as safetensors + ``config.json``, and run by mfprune through
``--model-code MODULE:CLASS`` (``MODEL_CODE``); each has its adapter beside it
(``adapter_path``: ``mfprune/seedmodels/<model_type>.toml``, passed with ``--arch``; they are
not in ``mfprune/arch/families/``, which serves transformers' own families). See
docs/custom-models.md.

* ``cartesian`` — CartesianMoE (seeds/002): routed experts as products of shared sub-experts.
* ``pesc`` — PESC / Camelidae (seeds/003): a shared dense FFN + per-expert adapters.
* ``smlp`` — sMLP (seeds/004): token-wise routed FFN experts (tMoE) + feature-wise spatial
  gating units (sMoE).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

#: model_type -> the ``--model-code`` import path of its model class.
MODEL_CODE = {
    "cartesian_moe": "mfprune.seedmodels.cartesian:CartesianForCausalLM",
    "pesc_moe": "mfprune.seedmodels.pesc:PescForCausalLM",
    "smlp_moe": "mfprune.seedmodels.smlp:SmlpForCausalLM",
}


def adapter_path(model_type: str) -> Path:
    """The adapter TOML of a seed model (pass it with ``--arch``)."""
    if model_type not in MODEL_CODE:
        raise KeyError(f"unknown seed model {model_type!r}; known: {sorted(MODEL_CODE)}")
    return Path(__file__).with_name(f"{model_type}.toml")


def model_class(model_type: str) -> type[PreTrainedModel]:
    module, _, name = MODEL_CODE[model_type].partition(":")
    return getattr(importlib.import_module(module), name)


def build_seed_model(model_type: str, *, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny reference model with deterministic random weights, float32, eval mode."""
    from mfprune.seedmodels.blocks import randomise

    if model_type not in MODEL_CODE:
        raise KeyError(f"unknown seed model {model_type!r}; known: {sorted(MODEL_CODE)}")
    cls = model_class(model_type)
    model = cls(cls.config_class(**overrides))
    randomise(model, seed=seed)
    return model.float().eval()


def build_seed_checkpoint(
    model_type: str, path: str | Path, *, seed: int = 0, tokenizer: bool = True, **overrides: Any
) -> Path:
    """Build a seed model (``build_seed_model``) and save it (with the tiny tokenizer)."""
    from mfprune.tinymodels import save_tokenizer

    path = Path(path)
    build_seed_model(model_type, seed=seed, **overrides).save_pretrained(path)
    if tokenizer:
        save_tokenizer(path)
    return path

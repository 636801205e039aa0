"""Architecture adapters: built-in families (TOML data files) and lookup by ``model_type``."""

from __future__ import annotations

import functools
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from mfprune.arch.spec import (
    ArchSpec,
    ExpertSpec,
    HeadSpec,
    HeadTensor,
    MoeLayers,
    StackedTensor,
    load_spec_file,
    parse_spec,
)
from mfprune.errors import ArchError, did_you_mean

#: How similar an unknown ``model_type`` must be to a family's to be suggested: family names
#: share parts (``_moe``, ``deepseek_``), so a loose match points at an unrelated family.
FAMILY_CUTOFF = 0.8

__all__ = [
    "ArchSpec",
    "ExpertSpec",
    "HeadSpec",
    "HeadTensor",
    "MoeLayers",
    "StackedTensor",
    "builtin_specs",
    "load_spec_file",
    "spec_for_config",
    "unsupported_families",
]


@functools.cache
def builtin_specs() -> dict[str, ArchSpec]:
    """Every built-in adapter, keyed by family name."""
    specs: dict[str, ArchSpec] = {}
    for entry in sorted(resources.files("mfprune.arch").joinpath("families").iterdir(), key=str):
        if entry.name.endswith(".toml"):
            spec = parse_spec(tomllib.loads(entry.read_text("utf-8")), source=entry.name)
            specs[spec.family] = spec
    return specs


@functools.cache
def unsupported_families() -> dict[str, str]:
    """``model_type`` -> why mfprune has no adapter for it, for every MoE family in transformers
    without one (``mfprune/arch/unsupported.toml``; a test keeps it complete)."""
    text = resources.files("mfprune.arch").joinpath("unsupported.toml").read_text("utf-8")
    return dict(tomllib.loads(text)["unsupported"])


def spec_for_config(config: dict[str, Any], *, arch_file: str | Path | None = None) -> ArchSpec:
    """The adapter for a model: the user's file when given, else found from ``model_type``."""
    if arch_file is not None:
        return load_spec_file(arch_file)
    model_type = config.get("model_type")
    by_type = {mt: spec for spec in builtin_specs().values() for mt in spec.model_types}
    if model_type in by_type:
        return by_type[model_type]
    hint = "pass your own adapter with --arch FILE (docs/adding-an-architecture.md)"
    reason = unsupported_families().get(str(model_type))
    if reason:
        raise ArchError(f"unsupported model_type '{model_type}': {reason}", hint=hint)
    families = ", ".join(sorted(by_type))
    shown = f"'{model_type}'" if model_type else "missing"
    if _known_to_transformers(str(model_type)):  # 'llama' is no typo of 'llama4': no suggestion
        raise ArchError(
            f"unsupported model_type {shown}: transformers knows it as a family without routed "
            f"experts, and mfprune only prunes Mixture-of-Experts models; supported: {families}",
            hint=hint,
        )
    close = did_you_mean(str(model_type), by_type, cutoff=FAMILY_CUTOFF)
    raise ArchError(f"unsupported model_type {shown}{close}; supported: {families}", hint=hint)


def _known_to_transformers(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING

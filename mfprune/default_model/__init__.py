"""The embedded default model: a small Qwen3-MoE trained by this project on four text domains
(code, docs, quotes, dictionary), with held-out texts for profiling and evaluation in `data/`.
See README.md in this folder (the model card) and scripts/train_default_model.py."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_NAME = "default"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = DEFAULT_MODEL_DIR / "data"
DOMAINS = ("code", "docs", "quotes", "dictionary")


def resolve_model(name_or_path: str | Path) -> str | Path:
    """`"default"` -> the embedded model's folder; anything else is returned unchanged."""
    if isinstance(name_or_path, str) and name_or_path == DEFAULT_MODEL_NAME:
        return DEFAULT_MODEL_DIR
    return name_or_path

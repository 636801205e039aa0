"""Shared fixtures: offline Hugging Face, and tiny MoE checkpoints built once per session."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# Triton kernels run on CPU tensors under the interpreter; must be set before any @triton.jit
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# tiny models gain nothing from threads, and a busy core stalls every parallel region
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

from mfprune import tinymodels


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_checkpoint(family, **kw)`` -> a saved checkpoint folder, built once per session.

    Tests must not modify it (mfprune never does; tests that need to, copy it first).
    """
    cache: dict[tuple, Path] = {}

    def build(family: str, **kw: object) -> Path:
        key = (family, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(family) / "model"
            tinymodels.build_checkpoint(family, path, **kw)
            cache[key] = path
        return cache[key]

    return build


@pytest.fixture(scope="session")
def model_dir(tiny_checkpoint, tmp_path_factory) -> Callable[..., Path]:
    """``model_dir(family, **kw)``: a copy of the tiny checkpoint with a tokenizer in it."""
    cache: dict[tuple, Path] = {}

    def build(family: str, **kw: object) -> Path:
        key = (family, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{family}-tok") / "model"
            shutil.copytree(tiny_checkpoint(family, **kw), path)
            tinymodels.save_tokenizer(path)
            cache[key] = path
        return cache[key]

    return build

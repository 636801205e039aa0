"""A whole-model load that would not fit in memory is refused before any work, with the
numbers and the way out (`--sequential` for profile); the check's arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mfprune import memory
from mfprune.checkpoint import open_checkpoint
from mfprune.cli import app

DATA = Path(__file__).resolve().parent.parent / "mfprune" / "default_model" / "data"


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def small_ram(monkeypatch):
    """A machine with 2 MB of RAM available: the 15.5 MB default model does not fit."""
    monkeypatch.setattr(memory, "_ram_available", lambda: 2_000_000)


def test_profile_refuses_a_model_bigger_than_memory_and_names_sequential(small_ram, tmp_path):
    out = tmp_path / "s.safetensors"
    result = run("profile", "default", "--data", DATA / "code.profile.jsonl", "--out", out)
    assert result.exit_code == 2, result.stderr
    line = result.stderr.strip()
    assert line.startswith("error: profiling ") and "needs about 15.53 MB" in line
    assert "only 2.00 MB of RAM is available" in line and "--sequential" in line
    assert not out.exists()
    sequential = run(
        "profile", "default", "--data", DATA / "code.profile.jsonl", "--out", out,
        "--sequential", "--max-tokens", 300, "--format", "quiet",
    )  # fmt: skip
    assert sequential.exit_code == 0, sequential.stderr
    assert out.is_file()


def test_bench_refuses_a_model_bigger_than_memory(small_ram):
    result = run("bench", "default", "--no-speed", "--data", DATA / "code.eval.jsonl")
    assert result.exit_code == 2
    assert "benching" in result.stderr and "needs about 15.53 MB" in result.stderr


def test_loaded_bytes_follow_the_dtype():
    ckpt = open_checkpoint("default")  # float32 on disk
    assert memory.loaded_bytes(ckpt) == ckpt.nbytes
    assert memory.loaded_bytes(ckpt, torch.float32) == pytest.approx(ckpt.nbytes, rel=0.01)
    assert (
        memory.loaded_bytes(ckpt, torch.bfloat16) == memory.loaded_bytes(ckpt, torch.float32) // 2
    )


def test_check_fits_passes_when_there_is_room(monkeypatch):
    monkeypatch.setattr(memory, "_ram_available", lambda: 10_000)
    memory.check_fits(9_000, what="x", hint="y")
    with pytest.raises(memory.NotEnoughMemory, match=r"needs about 9\.50 KB but only 10\.00 KB"):
        memory.check_fits(9_500, what="x", hint="y")

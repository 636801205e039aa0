"""Interruption, a full disk, and random plans: a rewrite either completes or leaves nothing
that looks like a model, never touches the source, and a re-run succeeds."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mfprune import PrunePlan, rewrite_checkpoint
from mfprune.oracle import logits, masked_logits, sample_ids


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def big_source(tmp_path_factory) -> Path:
    """A Mixtral-shaped checkpoint of ~160 MB in 32 shards: slow enough to stop mid-rewrite."""
    root = tmp_path_factory.mktemp("big") / "model"
    root.mkdir()
    D, inter, E, L = 256, 1024, 8, 4
    config = {
        "model_type": "mixtral",
        "hidden_size": D,
        "intermediate_size": inter,
        "num_hidden_layers": L,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": E,
        "num_experts_per_tok": 2,
        "vocab_size": 1000,
    }
    (root / "config.json").write_text(json.dumps(config))
    weight_map = {}
    g = torch.Generator().manual_seed(0)
    shard = 0
    for layer in range(L):
        prefix = f"model.layers.{layer}.block_sparse_moe"
        tensors = {f"{prefix}.gate.weight": torch.randn(E, D, generator=g)}
        for e in range(E):
            for w, shape in (("w1", (inter, D)), ("w2", (D, inter)), ("w3", (inter, D))):
                tensors[f"{prefix}.experts.{e}.{w}.weight"] = torch.randn(*shape, generator=g)
            name = f"model-{shard:05d}.safetensors"  # one shard per expert: many files
            save_file(tensors, root / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            tensors, shard = {}, shard + 1
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


def _plan(tmp: Path) -> Path:
    path = tmp / "plan.json"
    PrunePlan(experts={layer: (0, 1, 2, 3) for layer in range(4)}).save(path)
    return path


def _start(source: Path, plan: Path, out: Path, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mfprune", "prune", str(source), "--plan", str(plan)]
    cmd += ["--out", str(out), "--max-shard-size", "4MB", "--format", "quiet"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _stop_mid_rewrite(proc: subprocess.Popen, out: Path) -> bool:
    """SIGSTOP the process once its temp folder holds a shard; False if it finished first."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        tmp = list(out.parent.glob(f".{out.name}.mfprune-tmp-*"))
        if tmp and any(tmp[0].glob("*.safetensors")):
            proc.send_signal(signal.SIGSTOP)
            if tmp[0].exists():
                return True
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.002)
    return False


def _no_model_at(out: Path) -> None:
    assert not out.exists(), "an interrupted rewrite left an output folder"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_rewrite_leaves_nothing_and_rerun_succeeds(sig, big_source, tmp_path):
    before = digest(big_source)
    out, plan = tmp_path / "pruned", _plan(tmp_path)
    for _attempt in range(5):
        proc = _start(big_source, plan, out)
        if _stop_mid_rewrite(proc, out):
            break
        proc.wait()
        subprocess.run(["rm", "-rf", str(out)], check=True)
    else:
        pytest.fail("could not catch the rewrite mid-way in 5 attempts")
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    if sig is not signal.SIGKILL:
        lines = err.decode().strip().splitlines()
        assert lines == ["error: interrupted (hint: nothing was written; "
                         "run the command again to start over)"]  # fmt: skip
        assert not list(tmp_path.glob(".pruned.mfprune-*"))  # cleaned up on the way out
    _no_model_at(out)
    assert digest(big_source) == before
    rerun = _start(big_source, plan, out)  # also removes a killed run's stale temp folder
    assert rerun.wait(timeout=120) == 0, rerun.stderr.read().decode()
    assert (out / "model.safetensors.index.json").is_file()
    assert not list(tmp_path.glob(".pruned.mfprune-*"))


def test_full_disk_fails_cleanly(big_source, tmp_path):
    out, plan = tmp_path / "pruned", _plan(tmp_path)

    def small_files() -> None:  # writes past 1 MB fail with EFBIG instead of killing
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    proc = _start(big_source, plan, out, preexec_fn=small_files)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: File too large"), lines
    assert "hint: check disk space" in lines[0]
    _no_model_at(out)
    assert not list(tmp_path.glob(".pruned.mfprune-*"))


@pytest.fixture(scope="module")
def mixtral(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    source = tiny_checkpoint("mixtral")
    return source, AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


@st.composite
def plans(draw):
    n = draw(st.integers(2, 8))  # top-2 .. all experts
    layers = draw(st.sets(st.integers(0, 1), min_size=1))
    kept = {}
    for layer in (0, 1):
        if layer in layers or n != 8:
            kept[layer] = tuple(sorted(draw(st.sets(st.integers(0, 7), min_size=n, max_size=n))))
    heads = draw(st.sampled_from([{}, {0: (0, 1), 1: (2, 3)}, {0: (1, 3), 1: (0, 2)}]))
    return PrunePlan(experts=kept, heads=heads)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plan=plans())
def test_random_plans_rewrite_exactly(plan, mixtral, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    source, original = mixtral
    out = tmp_path_factory.mktemp("rand") / "pruned"
    rewrite_checkpoint(source, plan, out)
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = sample_ids(128, batch=1, seq=16)
    removed = {k: sorted(set(range(8)) - set(v)) for k, v in plan.experts.items()}
    removed_heads = {k: sorted(set(range(4)) - set(v)) for k, v in plan.heads.items()}
    reference = masked_logits(
        original, ids, experts={k: v for k, v in removed.items() if v} or None,
        heads=removed_heads or None,
    )  # fmt: skip
    assert (logits(pruned, ids) - reference).abs().max().item() <= 1e-5
    assert os.listdir(out.parent) == ["pruned"]

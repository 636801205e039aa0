"""The seed papers' designs that transformers does not ship (mfprune.seedmodels), run through
``--model-code`` / ``--trust-remote-code`` (mfprune.modelcode): pruning is exact, the shared
parts are never touched, and the commands refuse a model whose code is nowhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from checks import assert_exact, assert_experts_follow, assert_tensors_are_slices, removed

from mfprune import PrunePlan, rewrite_checkpoint
from mfprune.arch import load_spec_file
from mfprune.checkpoint import open_checkpoint
from mfprune.cli import run
from mfprune.inspect import inspect_model
from mfprune.modelcode import use_model_code
from mfprune.seedmodels import MODEL_CODE, adapter_path, build_seed_checkpoint
from mfprune.tinymodels import TINY_CORPUS

REPO = Path(__file__).resolve().parent.parent
KEPT = {0: [0, 2, 5, 7], 1: [1, 3, 4, 6]}


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory):
    cache: dict[str, Path] = {}

    def build(model_type: str) -> Path:
        if model_type not in cache:
            path = tmp_path_factory.mktemp(model_type) / "model"
            cache[model_type] = build_seed_checkpoint(model_type, path)
        return cache[model_type]

    return build


def _tensors(path: Path, prefix_part: str) -> dict[str, bytes]:
    ckpt = open_checkpoint(path)
    from safetensors import safe_open

    out = {}
    for name, info in ckpt.tensors.items():
        if prefix_part in name:
            with safe_open(info.file, "pt") as f:
                out[name] = f.get_tensor(name).contiguous().numpy().tobytes()
    return out


@pytest.mark.parametrize(
    ("model_type", "untouched"), [("pesc_moe", ".moe.ffn."), ("smlp_moe", ".smoe.units.")]
)
def test_seed_expert_pruning_is_exact(model_type, untouched, seed_checkpoint, tmp_path):
    source = seed_checkpoint(model_type)
    out = tmp_path / "pruned"
    spec = load_spec_file(adapter_path(model_type))
    result = rewrite_checkpoint(source, PrunePlan(experts=KEPT), out, spec=spec)
    assert result.config_changes == {"num_local_experts": [8, 4]}
    with use_model_code(class_path=MODEL_CODE[model_type]):
        assert_exact(source, out, experts=removed(KEPT, 8), spec=spec)
    assert_tensors_are_slices(source, out, experts=KEPT)
    assert assert_experts_follow(source, out, kept=KEPT) > 0
    # PESC's shared FFN / sMLP's spatial gating units: every tensor kept, byte for byte
    shared = _tensors(source, untouched)
    assert shared and _tensors(out, untouched) == shared


def test_pesc_inspect_says_only_adapters_and_router_rows_shrink(seed_checkpoint, tmp_path):
    source = seed_checkpoint("pesc_moe")
    cfg = json.loads((source / "config.json").read_text())
    layers, experts = cfg["num_hidden_layers"], cfg["num_local_experts"]
    d, r, i = cfg["hidden_size"], cfg["adapter_dim"], cfg["intermediate_size"]
    spec = load_spec_file(adapter_path("pesc_moe"))
    report = inspect_model(source, spec=spec)
    assert report.family == "pesc_moe" and "adapter" in report.description
    assert report.expert_tensors == ["down.weight", "up.weight"]
    assert report.params["routed_experts"] == layers * experts * 2 * r * d  # the adapters
    assert report.params["shared_experts"] == layers * 3 * d * i  # the shared FFN
    out = tmp_path / "pruned"
    result = rewrite_checkpoint(source, PrunePlan(experts=KEPT), out, spec=spec)
    dropped = layers * (experts - 4)
    freed_params = dropped * (2 * r * d + d)  # adapters + router rows
    assert result.source_bytes - result.out_bytes == pytest.approx(freed_params * 4, abs=4096)
    after = inspect_model(out, spec=spec)
    assert after.params["shared_experts"] == report.params["shared_experts"]
    assert after.params["routed_experts"] == report.params["routed_experts"] // 2


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["HF_HOME"] = str(tmp_path / "hf")  # remote code is copied under HF_MODULES_CACHE
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _mfprune(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mfprune", *map(str, args)],
        capture_output=True, text=True, env=_env(tmp_path), timeout=300,
    )  # fmt: skip


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TINY_CORPUS))
    return path


@pytest.mark.parametrize("model_type", sorted(MODEL_CODE))
def test_profile_prune_verify_bench_through_model_code(model_type, seed_checkpoint, tmp_path):
    source, code = seed_checkpoint(model_type), MODEL_CODE[model_type]
    stats, arch = tmp_path / "stats.safetensors", ["--arch", adapter_path(model_type)]
    refused = _mfprune(
        tmp_path, "profile", source, *arch, "--data", _data(tmp_path), "--out", stats
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"model_type '{model_type}' is not in transformers" in refused.stderr
    assert "--model-code module:Class" in refused.stderr and not stats.exists()
    args = [*arch, "--model-code", code, "--format", "json"]
    done = _mfprune(tmp_path, "profile", source, "--data", _data(tmp_path), "--out", stats, *args)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["tokens"] > 0
    out = tmp_path / "pruned"
    pruned = _mfprune(
        tmp_path,
        "prune",
        source,
        "--profile",
        stats,
        "--keep",
        "4",
        "--out",
        out,
        "--verify",
        *args,
    )
    assert pruned.returncode == 0, pruned.stderr
    verify = json.loads(pruned.stdout)["verify"]
    assert verify["exact"] and verify["max_abs_diff"] <= 1e-5
    assert verify["masking_effect"] > 1e-3  # dropping 4 of 8 experts really moves the logits
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 4
    speed = ["--prompt-len", "8", "--new-tokens", "2", "--repeats", "1"]
    benched = _mfprune(
        tmp_path, "bench", out, "--baseline", source, "--data", _data(tmp_path), *speed, *args
    )
    assert benched.returncode == 0, benched.stderr
    report = json.loads(benched.stdout)
    for side in ("model", "baseline"):
        assert report[side]["quality"]["data_task/bits_per_byte"]["value"] > 0
        assert report[side]["speed"]["decode_tokens_per_s"] > 0
    assert report["model"]["params"] < report["baseline"]["params"]


REMOTE_CODE = """\
from mfprune.seedmodels.pesc import PescConfig, PescForCausalLM


class RemotePescConfig(PescConfig):
    model_type = "remote_pesc"


class RemotePescForCausalLM(PescForCausalLM):
    config_class = RemotePescConfig
"""


def test_auto_map_code_runs_only_with_trust_remote_code(seed_checkpoint, tmp_path):
    import shutil

    model = tmp_path / "remote"
    shutil.copytree(seed_checkpoint("pesc_moe"), model)
    (model / "modeling_remote.py").write_text(REMOTE_CODE)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "remote_pesc"
    config["auto_map"] = {
        "AutoConfig": "modeling_remote.RemotePescConfig",
        "AutoModelForCausalLM": "modeling_remote.RemotePescForCausalLM",
    }
    (model / "config.json").write_text(json.dumps(config))
    adapter = tmp_path / "remote.toml"
    adapter.write_text(adapter_path("pesc_moe").read_text().replace('"pesc_moe"', '"remote_pesc"'))
    stats = tmp_path / "stats.safetensors"
    args = ["profile", model, "--arch", adapter, "--data", _data(tmp_path), "--out", stats]
    refused = _mfprune(tmp_path, *args)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "ships its own code (auto_map)" in refused.stderr
    assert "--trust-remote-code" in refused.stderr and not stats.exists()
    trusted = _mfprune(tmp_path, *args, "--trust-remote-code", "--format", "quiet")
    assert trusted.returncode == 0, trusted.stderr
    assert "WARNING: --trust-remote-code" in trusted.stderr  # said even in quiet mode
    assert stats.exists()


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("mfprune.seedmodels.pesc", "is not module:Class"),
        ("no_such_module_xyz:Model", "cannot import no_such_module_xyz"),
        ("mfprune.seedmodels.pesc:PescConfig", "is not a transformers PreTrainedModel class"),
        ("mfprune.seedmodels.blocks:SeedForCausalLM", "is not a PretrainedConfig with a model"),
    ],
)
def test_bad_model_code_is_one_error_line(code, message, seed_checkpoint, tmp_path, capsys):
    source = seed_checkpoint("pesc_moe")
    stats = tmp_path / "stats.safetensors"
    args = ["profile", str(source), "--arch", str(adapter_path("pesc_moe"))]
    args += ["--data", str(_data(tmp_path)), "--out", str(stats)]
    assert run([*args, "--model-code", code]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model-code") and message in err and "hint:" in err
    assert len(err.strip().splitlines()) == 1 and not stats.exists()

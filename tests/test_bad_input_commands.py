"""The bad-input matrix across the other commands (profile, merge-stats, show, bench, shrink,
and prune from a profile): one `error: ... (hint: ...)` line, exit 2, no traceback, nothing
written where the output would go. `tests/test_bad_input.py` covers inspect / prune --plan."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_input import assert_clean_error, run, snapshot

TEXT = "def add(a, b): return a + b\nThe quick brown fox jumps over the lazy dog.\n"


@pytest.fixture(scope="module")
def inputs(model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two models with tokenizers, their stats, and a set of broken files."""
    d = tmp_path_factory.mktemp("bad-inputs")
    paths = {"mixtral": model_dir("mixtral"), "qwen": model_dir("qwen3_moe")}
    (d / "task.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    for name in ("mixtral", "qwen"):
        out = d / f"{name}.safetensors"
        result = run("profile", paths[name], "--data", d / "task.jsonl", "--out", out,
                     "--format", "quiet")  # fmt: skip
        assert result.exit_code == 0, result.stderr
        paths[f"{name}_stats"] = out
    tensors = load_file(paths["mixtral_stats"])
    key = next(k for k in tensors if tensors[k].is_floating_point())
    tensors[key] = tensors[key].clone().fill_(math.nan)
    meta = _metadata(paths["mixtral_stats"])
    save_file(tensors, d / "nan.safetensors", metadata=meta)
    files = {
        "nan_stats": d / "nan.safetensors",
        "garbage_stats": _write(d / "garbage.safetensors", b"not a safetensors file"),
        "empty": _write(d / "empty.jsonl", b""),
        "no_field": _write(d / "nofield.jsonl", b'{"body": "x"}\n'),
        "latin1": _write(d / "latin1.txt", "caf\xe9".encode("latin-1")),
        "bad_json": _write(d / "bad.jsonl", b'{"text": "unterminated\n'),
        "task": d / "task.jsonl",
        "shrink_typo": _write(d / "typo.toml", b'model = "m"\nout = "o"\nkeep_ratoi = 0.5\n'),
        "shrink_types": _write(d / "types.toml", b'model = 3\nout = "o"\n[prune]\nkeep = "x"\n'),
        "dense": _dense_copy(paths["mixtral"], d / "dense"),
    }
    return {**paths, **files}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return f.metadata()


def _dense_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    shard = dst / "model.safetensors"
    tensors = {k: v for k, v in load_file(shard).items() if "block_sparse_moe" not in k}
    tensors["model.layers.0.mlp.weight"] = torch.zeros(2, 2)
    save_file(tensors, shard, metadata={"format": "pt"})
    return dst


# (name, argv built from the inputs, fragments the error line must hold)
CASES = [
    (
        "profile: missing data",
        lambda p, o: ["profile", p["mixtral"], "--data", o / "none.jsonl", "--out", o / "s.st"],
        ["does not exist"],
    ),
    (
        "profile: empty data",
        lambda p, o: ["profile", p["mixtral"], "--data", p["empty"], "--out", o / "s.st"],
        ["no documents", "empty"],
    ),
    (
        "profile: missing text field",
        lambda p, o: ["profile", p["mixtral"], "--data", p["no_field"], "--out", o / "s.st"],
        ["no 'text' field", "--text-field body"],
    ),
    (
        "profile: non-UTF-8",
        lambda p, o: ["profile", p["mixtral"], "--data", p["latin1"], "--out", o / "s.st"],
        ["not UTF-8"],
    ),
    (
        "profile: malformed JSONL",
        lambda p, o: ["profile", p["mixtral"], "--data", p["bad_json"], "--out", o / "s.st"],
        ["bad.jsonl:1"],
    ),
    (
        "profile: bad shard",
        lambda p, o: [
            "profile",
            p["mixtral"],
            "--data",
            p["task"],
            "--shard",
            "3/2",
            "--out",
            o / "s.st",
        ],
        ["shard '3/2'"],
    ),
    (
        "profile: dense model",
        lambda p, o: ["profile", p["dense"], "--data", p["task"], "--out", o / "s.st"],
        ["no MoE layer"],
    ),
    (
        "profile: output is a folder",
        lambda p, o: ["profile", p["mixtral"], "--data", p["task"], "--out", o],
        [],
    ),
    (
        "merge-stats: other model",
        lambda p, o: ["merge-stats", p["mixtral_stats"], p["qwen_stats"], "--out", o / "m.st"],
        ["another model"],
    ),
    (
        "merge-stats: corrupted",
        lambda p, o: ["merge-stats", p["mixtral_stats"], p["garbage_stats"], "--out", o / "m.st"],
        ["not a valid stats file"],
    ),
    (
        "merge-stats: NaN",
        lambda p, o: ["merge-stats", p["mixtral_stats"], p["nan_stats"], "--out", o / "m.st"],
        ["nan.safetensors"],
    ),
    (
        "merge-stats: same data twice",
        lambda p, o: ["merge-stats", p["mixtral_stats"], p["mixtral_stats"], "--out", o / "m.st"],
        [],
    ),
    ("show: corrupted", lambda p, o: ["show", p["garbage_stats"]], ["not a valid stats file"]),
    ("show: NaN", lambda p, o: ["show", p["nan_stats"]], ["nan.safetensors"]),
    (
        "show: against another model",
        lambda p, o: [
            "show",
            p["mixtral_stats"],
            "--against",
            p["qwen_stats"],
            "--html",
            o / "h.html",
        ],
        ["another model"],
    ),
    (
        "prune: stats of another model",
        lambda p, o: [
            "prune",
            p["mixtral"],
            "--profile",
            p["qwen_stats"],
            "--keep-ratio",
            "0.5",
            "--out",
            o / "pruned",
        ],
        ["profiled on another model"],
    ),
    (
        "prune: corrupted stats",
        lambda p, o: [
            "prune",
            p["mixtral"],
            "--profile",
            p["garbage_stats"],
            "--keep-ratio",
            "0.5",
            "--out",
            o / "pruned",
        ],
        ["not a valid stats file"],
    ),
    (
        "prune: unknown criterion",
        lambda p, o: [
            "prune",
            p["mixtral"],
            "--profile",
            p["mixtral_stats"],
            "--criterion",
            "rep",
            "--keep",
            "4",
            "--out",
            o / "pruned",
        ],
        ["did you mean 'reap'"],
    ),
    (
        "prune: infeasible budget",
        lambda p, o: [
            "prune",
            p["mixtral"],
            "--profile",
            p["mixtral_stats"],
            "--keep",
            "1",
            "--out",
            o / "pruned",
        ],
        ["below the minimum of 2"],
    ),
    ("bench: missing model", lambda p, o: ["bench", o / "none"], ["does not exist"]),
    (
        "bench: bad --max-drop",
        lambda p, o: ["bench", p["mixtral"], "--data", p["task"], "--max-drop", "lots"],
        ["--max-drop 'lots'"],
    ),
    (
        "bench: bad data records",
        lambda p, o: ["bench", p["mixtral"], "--data", p["no_field"]],
        ["neither 'text' nor 'choices'"],
    ),
    (
        "bench: unknown task",
        lambda p, o: ["bench", p["mixtral"], "--tasks", "hellaswagg"],
        ["did you mean 'hellaswag'"],
    ),
    (
        "bench: dense model",
        lambda p, o: ["bench", p["dense"], "--data", p["task"]],
        ["no MoE layer"],
    ),
    (
        "shrink: missing config",
        lambda p, o: ["shrink", "--config", o / "none.toml"],
        ["does not exist"],
    ),
    (
        "shrink: unknown key",
        lambda p, o: ["shrink", "--config", p["shrink_typo"]],
        ["unknown key 'keep_ratoi'"],
    ),
    ("shrink: wrong types", lambda p, o: ["shrink", "--config", p["shrink_types"]], ["problems"]),
]


@pytest.mark.parametrize(("name", "argv", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(name, argv, fragments, inputs, tmp_path):
    before = snapshot(inputs["mixtral"].parent)
    result = run(*argv(inputs, tmp_path))
    assert_clean_error(result, *fragments)
    assert list(tmp_path.iterdir()) == [], f"{name} left {list(tmp_path.iterdir())}"
    assert snapshot(inputs["mixtral"].parent) == before  # the source is untouched


def test_load_pretrained_refuses_missing_weights(inputs):
    """transformers would initialise missing weights at random and carry on; mfprune refuses."""
    from mfprune import load_pretrained
    from mfprune.errors import ModelError

    with pytest.raises(ModelError, match=r"lacks \d+ weight\(s\) the model needs"):
        load_pretrained(inputs["dense"])
    _model, info = load_pretrained(inputs["mixtral"], output_loading_info=True)
    assert not info["missing_keys"]

"""Bad inputs to `mfprune inspect` and `mfprune prune`, run through the real CLI.

Every case must end in a non-zero exit with exactly one stderr line
``error: <message> (hint: <hint>)`` naming the problem, and no traceback. Every failed prune
must leave the source folder byte-identical, create nothing at ``--out`` (or leave a
pre-existing output untouched) and leave no hidden temp folder beside it: each test works in
its own ``tmp_path`` and the whole tree is hashed before and after the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import struct
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mfprune.arch import builtin_specs
from mfprune.cli import app

PLAN_FORMAT = "mfprune.plan/1"
SHARD = "model.safetensors"
INDEX = "model.safetensors.index.json"
_ERROR_LINE = re.compile(r"^error: (?P<message>\S.*?) \(hint: (?P<hint>\S.*)\)$")

# a plan every tiny model accepts (keeps everything), and one that really prunes mixtral
KEEP_ALL: dict[str, Any] = {"format": PLAN_FORMAT}
MIXTRAL_HALF: dict[str, Any] = {
    "format": PLAN_FORMAT,
    "experts": {"0": [0, 2, 5, 7], "1": [1, 3, 4, 6]},
}


# ------------------------------------------------------------------------------------ helpers


def run(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_clean_error(result: Any, *fragments: str, exit_code: int = 2) -> str:
    """One `error: ... (hint: ...)` line on stderr holding every fragment; no traceback."""
    everything = f"{result.output}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in everything, everything
    # CliRunner catches an escaped exception and records it here instead of printing it
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code != 0
    assert result.exit_code == exit_code, everything
    assert result.stdout == "", "a failed command printed a result"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {lines}"
    line = lines[0]
    assert _ERROR_LINE.match(line), f"not an 'error: ... (hint: ...)' line: {line}"
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: sha256 of a file's bytes, a link's target, or 'dir'."""
    seen: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            key = str(p.relative_to(root))
            if p.is_symlink():
                seen[key] = "-> " + os.readlink(p)
            elif p.is_dir():
                seen[key] = "dir"
            else:
                seen[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return seen


def leftovers(out: Path) -> list[Path]:
    """Hidden temp / old folders an interrupted or failed rewrite could leave beside ``out``."""
    try:
        return sorted(out.parent.glob(f".{out.name}.mfprune-*"))
    except OSError:
        return []


def write_plan(path: Path, plan: dict[str, Any] | str) -> Path:
    path.write_text(plan if isinstance(plan, str) else json.dumps(plan), encoding="utf-8")
    return path


def prune_fails(
    tmp_path: Path,
    model: Path,
    plan: Path,
    out: Path,
    fragments: tuple[str, ...],
    *extra: str,
) -> str:
    """Run a prune that must fail; check its message and that nothing on disk changed."""
    before = snapshot(tmp_path)
    out_existed = os.path.lexists(out)
    out_before = snapshot(out) if out.is_dir() and not out.is_relative_to(tmp_path) else None
    result = run("prune", model, "--plan", plan, "--out", out, *extra)
    line = assert_clean_error(result, *fragments)
    assert snapshot(tmp_path) == before, "the failed prune changed files under tmp_path"
    if not out_existed:
        assert not os.path.lexists(out), f"{out} was created"
    if out_before is not None:
        assert snapshot(out) == out_before
    assert leftovers(out) == []
    return line


def copy_model(tiny_checkpoint: Callable[..., Path], family: str, tmp_path: Path) -> Path:
    """A private copy of the session-cached tiny checkpoint, at tmp_path/src/model."""
    model = tmp_path / "src" / "model"
    shutil.copytree(tiny_checkpoint(family), model)
    return model


# ------------------------------------------------------------------ safetensors surgery


def read_raw(shard: Path) -> tuple[dict[str, Any], bytes]:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(shard: Path, header: bytes, data: bytes) -> None:
    header += b" " * (-len(header) % 8)
    shard.write_bytes(struct.pack("<Q", len(header)) + header + data)


def edit_header(shard: Path, edit: Callable[[dict[str, Any], int], None]) -> None:
    """Apply ``edit(header, data_len)`` to a shard's JSON header, keeping the data bytes."""
    header, data = read_raw(shard)
    edit(header, len(data))
    write_raw(shard, json.dumps(header).encode(), data)


def edit_config(model: Path, **changes: Any) -> None:
    cfg = json.loads((model / "config.json").read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del cfg[key]
        else:
            cfg[key] = value
    (model / "config.json").write_text(json.dumps(cfg))


_DELETE = object()

MIXTRAL_ROUTER = "model.layers.{}.block_sparse_moe.gate.weight"


def explosive_pickle(sentinel: Path) -> bytes:
    """Pickle bytes that create ``sentinel`` (a folder) the moment anything unpickles them."""

    class Boom:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.mkdir, (str(sentinel),))

    return pickle.dumps({"model.embed_tokens.weight": Boom()})


def test_explosive_pickle_explodes(tmp_path):
    """The pickle case below is only meaningful if unpickling it really has an effect."""
    sentinel = tmp_path / "UNPICKLED"
    pickle.loads(explosive_pickle(sentinel))
    assert sentinel.is_dir()


# ------------------------------------------------------------------ bad model folders
# Each corruption takes the private model copy and returns the path to pass to the CLI.


def _missing(model: Path) -> Path:
    return model.parent / "no-such-model"


def _a_file(model: Path) -> Path:
    f = model.parent / "weights.safetensors"
    shutil.copyfile(model / SHARD, f)
    return f


def _no_config(model: Path) -> Path:
    (model / "config.json").unlink()
    return model


def _config_not_json(model: Path) -> Path:
    (model / "config.json").write_text('{"model_type": "mixtral",')
    return model


def _config_not_object(model: Path) -> Path:
    (model / "config.json").write_text('["mixtral"]')
    return model


def _model_type(value: Any) -> Callable[[Path], Path]:
    def corrupt(model: Path) -> Path:
        edit_config(model, model_type=value)
        return model

    return corrupt


def _config(**changes: Any) -> Callable[[Path], Path]:
    def corrupt(model: Path) -> Path:
        edit_config(model, **changes)
        return model

    return corrupt


def _drop_tensors(*names: str) -> Callable[[Path], Path]:
    def corrupt(model: Path) -> Path:
        def edit(header: dict[str, Any], _: int) -> None:
            for name in names:
                del header[name]

        edit_header(model / SHARD, edit)
        return model

    return corrupt


def _pickle_only(model: Path) -> Path:
    (model / SHARD).unlink()
    (model / "pytorch_model.bin").write_bytes(explosive_pickle(model.parent / "UNPICKLED"))
    return model


def _header_garbage(model: Path) -> Path:
    _, data = read_raw(model / SHARD)
    write_raw(model / SHARD, b'{"model.embed_tokens.weight": {"dtype": "F32", "sha', data)
    return model


def _header_not_object(model: Path) -> Path:
    _, data = read_raw(model / SHARD)
    write_raw(model / SHARD, b"[1, 2, 3]", data)
    return model


def _header_gigabytes(model: Path) -> Path:
    raw = bytearray((model / SHARD).read_bytes())
    raw[:8] = struct.pack("<Q", 5 * 1024**3)
    (model / SHARD).write_bytes(bytes(raw))
    return model


def _truncated(model: Path) -> Path:
    (model / SHARD).write_bytes(b"\x10\x00\x00")
    return model


def _shape_disagrees(model: Path) -> Path:
    def edit(header: dict[str, Any], _: int) -> None:
        header[MIXTRAL_ROUTER.format(0)]["shape"] = [9, 64]

    edit_header(model / SHARD, edit)
    return model


def _offsets_out_of_bounds(model: Path) -> Path:
    def edit(header: dict[str, Any], data_len: int) -> None:
        entry = header[MIXTRAL_ROUTER.format(1)]
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = [data_len - 4, data_len - 4 + end - begin]

    edit_header(model / SHARD, edit)
    return model


def _unknown_dtype(model: Path) -> Path:
    def edit(header: dict[str, Any], _: int) -> None:
        header[MIXTRAL_ROUTER.format(0)]["dtype"] = "F12"

    edit_header(model / SHARD, edit)
    return model


def _overlapping(model: Path) -> Path:
    def edit(header: dict[str, Any], _: int) -> None:
        a = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
        b = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
        header[b]["data_offsets"] = header[a]["data_offsets"]

    edit_header(model / SHARD, edit)
    return model


def _header_deeply_nested(model: Path) -> Path:
    _, data = read_raw(model / SHARD)
    write_raw(model / SHARD, b"[" * 100_000, data)
    return model


def _dtype_not_a_string(model: Path) -> Path:
    def edit(header: dict[str, Any], _: int) -> None:
        header[MIXTRAL_ROUTER.format(0)]["dtype"] = ["F32"]

    edit_header(model / SHARD, edit)
    return model


def _config_deeply_nested(model: Path) -> Path:
    (model / "config.json").write_text("[" * 100_000)
    return model


def _index_deeply_nested(model: Path) -> Path:
    (model / INDEX).write_text('{"weight_map": ' + "[" * 100_000)
    return model


def _index_to(target: str) -> Callable[[Path], Path]:
    """An index mapping every tensor to ``target``, with the real shard moved out beside the
    folder (so following the index would succeed)."""

    def corrupt(model: Path) -> Path:
        header, _ = read_raw(model / SHARD)
        shutil.move(model / SHARD, model.parent / "x.safetensors")
        weight_map = {name: target for name in header if name != "__metadata__"}
        (model / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return model

    return corrupt


def _index_not_json(model: Path) -> Path:
    (model / INDEX).write_text("{'weight_map': ")
    return model


def _index_names_missing_shard(model: Path) -> Path:
    header, _ = read_raw(model / SHARD)
    weight_map = {name: SHARD for name in header if name != "__metadata__"}
    weight_map[MIXTRAL_ROUTER.format(1)] = "model-00002-of-00002.safetensors"
    (model / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model


def _symlink_outside(model: Path) -> Path:
    elsewhere = model.parent / "elsewhere"
    elsewhere.mkdir()
    shutil.move(model / SHARD, elsewhere / SHARD)
    (model / SHARD).symlink_to(elsewhere / SHARD)
    return model


def _symlink_outside_indexed(model: Path) -> Path:
    _index_to(SHARD)(model)
    (model / SHARD).symlink_to(model.parent / "x.safetensors")
    return model


SUPPORTED = sorted({t for spec in builtin_specs().values() for t in spec.model_types})

MODEL_CASES = [
    pytest.param(
        "mixtral",
        _missing,
        ("model folder", "no-such-model", "does not exist"),
        id="missing-folder",
    ),
    pytest.param(
        "mixtral",
        _a_file,
        ("weights.safetensors is a file, not a model folder",),
        id="file-not-folder",
    ),
    pytest.param("mixtral", _no_config, ("no config.json in",), id="no-config"),
    pytest.param(
        "mixtral", _config_not_json, ("config.json in", "is not valid JSON"), id="config-not-json"
    ),
    pytest.param(
        "mixtral",
        _config_deeply_nested,
        ("config.json in", "is not valid JSON"),
        id="config-deeply-nested",
    ),
    pytest.param(
        "mixtral",
        _config_not_object,
        ("config.json in", "is not a JSON object"),
        id="config-not-object",
    ),
    pytest.param(
        "mixtral",
        _model_type("mixtrall"),
        (
            "unsupported model_type 'mixtrall'",
            "did you mean 'mixtral'?",
            "supported: ",
            *SUPPORTED,
            "--arch",
        ),
        id="unknown-model-type",
    ),
    pytest.param(
        "mixtral",
        _model_type("llama"),
        ("unsupported model_type 'llama'", *SUPPORTED),
        id="dense-llama",
    ),
    pytest.param(
        "mixtral",
        _config(model_type=_DELETE),
        ("unsupported model_type missing",),
        id="no-model-type",
    ),
    pytest.param(
        "mixtral",
        _drop_tensors(MIXTRAL_ROUTER.format(0), MIXTRAL_ROUTER.format(1)),
        ("no MoE layer found", "block_sparse_moe.gate.weight", "dense model has no experts"),
        id="dense-no-routers",
    ),
    pytest.param(
        "mixtral",
        _config(num_local_experts=_DELETE),
        ("config.json has none of ['num_local_experts']", "only prunes MoE models"),
        id="dense-no-expert-count",
    ),
    pytest.param(
        "mixtral",
        _pickle_only,
        ("only pickle weights", "pytorch_model.bin", "never unpickles", "safetensors"),
        id="pickle-only",
    ),
    pytest.param(
        "mixtral",
        _header_garbage,
        ("corrupted safetensors file model.safetensors", "header is not valid JSON"),
        id="header-garbage-json",
    ),
    pytest.param(
        "mixtral",
        _header_deeply_nested,
        ("model.safetensors", "header is not valid JSON"),
        id="header-deeply-nested",
    ),
    pytest.param(
        "mixtral",
        _header_not_object,
        ("model.safetensors", "header is not a JSON object"),
        id="header-not-object",
    ),
    pytest.param(
        "mixtral",
        _header_gigabytes,
        ("model.safetensors", "header claims 5,368,709,120 bytes"),
        id="header-gigabytes",
    ),
    pytest.param(
        "mixtral",
        _truncated,
        ("model.safetensors", "too short for a header"),
        id="header-truncated",
    ),
    pytest.param(
        "mixtral",
        _shape_disagrees,
        ("model.layers.0.block_sparse_moe.gate.weight' F32[9, 64] needs 2,304 bytes", "span 2,048"),
        id="shape-vs-data-length",
    ),
    pytest.param(
        "mixtral",
        _offsets_out_of_bounds,
        ("model.layers.1.block_sparse_moe.gate.weight' has data offsets", "outside the"),
        id="offsets-out-of-bounds",
    ),
    pytest.param("mixtral", _unknown_dtype, ("unknown dtype 'F12'",), id="unknown-dtype"),
    pytest.param(
        "mixtral", _dtype_not_a_string, ("has unknown dtype ['F32']",), id="dtype-not-a-string"
    ),
    pytest.param(
        "mixtral", _overlapping, ("overlaps the previous tensor",), id="overlapping-tensors"
    ),
    pytest.param(
        "mixtral",
        _index_to("../x.safetensors"),
        ("the index points outside the model folder: '../x.safetensors'",),
        id="index-dotdot",
    ),
    pytest.param(
        "mixtral",
        _index_to("/etc/passwd"),
        ("the index points outside the model folder: '/etc/passwd'",),
        id="index-absolute",
    ),
    pytest.param("mixtral", _index_not_json, (INDEX, "is not valid JSON"), id="index-not-json"),
    pytest.param(
        "mixtral", _index_deeply_nested, (INDEX, "is not valid JSON"), id="index-deeply-nested"
    ),
    pytest.param(
        "mixtral",
        _index_names_missing_shard,
        ("shard model-00002-of-00002.safetensors", "is missing"),
        id="index-missing-shard",
    ),
    pytest.param(
        "mixtral",
        _symlink_outside,
        ("model.safetensors is a symlink that points outside the model folder",),
        id="symlink-outside",
    ),
    pytest.param(
        "mixtral",
        _symlink_outside_indexed,
        ("model.safetensors is a symlink that points outside the model folder",),
        id="symlink-outside-indexed",
    ),
    pytest.param(
        "mixtral",
        _config(num_local_experts=6),
        ("config.json says num_local_experts = 6 but layer 0's router has 8 rows",),
        id="expert-count-vs-router",
    ),
    pytest.param(
        "jetmoe",
        _config(num_local_experts=8),
        ("config.json says num_local_experts = 8 but layer 0's router has 4 rows",),
        id="expert-count-vs-router-jetmoe",
    ),
    pytest.param(
        "mixtral",
        _drop_tensors("model.layers.1.block_sparse_moe.experts.7.w2.weight"),
        ("expert tensor model.layers.1.block_sparse_moe.experts.7.w2.weight is missing",),
        id="per-expert-tensor-missing",
    ),
    pytest.param(
        "jetmoe",
        _drop_tensors("model.layers.0.mlp.input_linear.weight"),
        ("expert tensor model.layers.0.mlp.input_linear.weight is missing",),
        id="stacked-tensor-missing",
    ),
    pytest.param(
        "deepseek_v2",
        _config(first_k_dense_replace=0),
        ("config.json makes layers [0, 1, 2] MoE but router tensors exist for [1, 2]",),
        id="dense-layers-vs-routers",
    ),
    pytest.param(
        "mixtral",
        _config(num_experts_per_tok=9),
        ("'num_experts_per_tok' = 9 is not a valid top-k",),
        id="bad-top-k",
    ),
    pytest.param(
        "deepseek_v3",
        _config(n_group=3),
        ("8 experts do not split into n_group = 3 groups",),
        id="bad-n-group",
    ),
    pytest.param(
        "mixtral",
        _config(num_experts_per_tok=2.0),
        ("'num_experts_per_tok' = 2.0 is not a valid top-k",),
        id="float-top-k",
    ),
    pytest.param(
        "mixtral",
        _config(num_hidden_layers=_DELETE),
        ("no valid 'num_hidden_layers'",),
        id="no-layer-count",
    ),
    pytest.param(
        "mixtral",
        _config(num_hidden_layers=True),
        ("no valid 'num_hidden_layers' (got True)",),
        id="bool-layer-count",
    ),
]


@pytest.mark.parametrize("command", ["inspect", "prune"])
@pytest.mark.parametrize(("family", "corrupt", "fragments"), MODEL_CASES)
def test_bad_model(command, family, corrupt, fragments, tiny_checkpoint, tmp_path):
    model = corrupt(copy_model(tiny_checkpoint, family, tmp_path))
    if command == "inspect":
        before = snapshot(tmp_path)
        assert_clean_error(run("inspect", model), *fragments)
        assert snapshot(tmp_path) == before
    else:
        plan = write_plan(tmp_path / "plan.json", KEEP_ALL)
        prune_fails(tmp_path, model, plan, tmp_path / "out", fragments)
    assert not (tmp_path / "src" / "UNPICKLED").exists(), "a pickle file was unpickled"


# --------------------------------------------------------------------------- bad plans

EXPERTS_OK = {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}

PLAN_CASES = [
    pytest.param(
        "mixtral",
        {"experts": {**EXPERTS_OK, "5": [0, 1, 2, 3]}},
        ("experts[5]: layer 5 does not exist (MoE layers: 0..1)",),
        id="unknown-layer",
    ),
    pytest.param(
        "deepseek_v2",
        {"experts": {"0": [0, 1, 2, 3]}},
        ("experts[0]: layer 0 is not an MoE layer (MoE layers: 1..2)",),
        id="non-moe-layer",
    ),
    pytest.param(
        "mixtral",
        {"experts": {"0": [0, 1, 1, 2, 3], "1": [0, 1, 2, 3]}},
        ("experts[0]: duplicate ids [1]",),
        id="duplicate-id",
    ),
    pytest.param(
        "mixtral",
        {"experts": {"0": [0, 1, 2, 8], "1": [0, 1, 2, 3]}},
        ("experts[0]: ids [8] out of range: the layer has 8 experts (0..7)",),
        id="id-too-large",
    ),
    pytest.param(
        "mixtral",
        {"experts": {"0": [-1, 1, 2, 3], "1": [0, 1, 2, 3]}},
        ("experts[0]: ids [-1] out of range",),
        id="id-negative",
    ),
    pytest.param(
        "mixtral",
        {"experts": {"0": [3], "1": [4]}},
        (
            "experts[0]: keeps 1 of 8 but the router picks top-2: keep at least 2",
            "experts[1]: keeps 1",
        ),
        id="fewer-than-top-k",
    ),
    pytest.param(
        "mixtral",
        {"experts": {"0": [0, 1, 2], "1": [0, 1, 2, 3]}},
        (
            "experts: kept counts differ across MoE layers (layer 0: 3, layer 1: 4)",
            "'num_local_experts'",
        ),
        id="unequal-counts",
    ),
    pytest.param(
        "mixtral",
        {"experts": {"0": [0, 1, 2, 3]}},
        (
            "kept counts differ across MoE layers (layer 0: 4, layer 1: 8)",
            "a layer absent from the plan keeps all",
        ),
        id="unequal-counts-absent-layer",
    ),
    pytest.param(
        "deepseek_v3",
        {"experts": {"1": [0, 1, 2, 4], "2": [0, 1, 2, 4]}},
        (
            "experts[1]: group-limited routing (n_group = 2) needs the same number kept in "
            "every group of 4; kept per group: [3, 1]",
        ),
        id="v3-unequal-groups",
    ),
    pytest.param(
        "deepseek_v3",
        {"experts": {"1": [0, 4], "2": [1, 5]}},
        (
            "experts[1]: each group keeps 1 but the group score sums the top 2: "
            "keep at least 2 per group (4 in all)",
        ),
        id="v3-too-few-per-group",
    ),
    pytest.param(
        "qwen3_moe",
        {"heads": {"0": [0, 1, 2], "1": [0, 1, 2]}},
        (
            "heads[0]: KV groups would be unequal (query heads kept per KV head: {0: 2, 1: 1})",
            "4 heads over 2 KV heads",
        ),
        id="heads-unequal-kv-groups",
    ),
    pytest.param(
        "qwen3_moe",
        {"heads": {"0": [0, 1], "1": [0, 2]}},
        ("heads: layers would keep different head counts",),
        id="heads-unequal-shapes",
    ),
    pytest.param(
        "qwen3_moe",
        {"heads": {"0": [0, 4], "1": [0, 1]}},
        ("heads[0]: ids [4] out of range: the layer has 4 heads",),
        id="heads-out-of-range",
    ),
    pytest.param(
        "qwen3_moe",
        {"heads": {"0": [], "1": []}},
        ("heads[0]: keeps no head",),
        id="heads-none-kept",
    ),
    pytest.param(
        "olmoe",
        {"heads": {"0": [0, 1], "1": [0, 1]}},
        ("heads: olmoe heads cannot be pruned", "q_norm/k_norm"),
        id="heads-olmoe",
    ),
    pytest.param(
        "jetmoe",
        {"heads": {"0": [0, 1], "1": [0, 1]}},
        ("heads: jetmoe heads cannot be pruned", "attention_experts"),
        id="heads-jetmoe",
    ),
    pytest.param(
        "mixtral",
        {"attention_experts": {"0": [0, 1], "1": [0, 1]}},
        ("attention_experts: mixtral has no attention experts",),
        id="attention-experts-mixtral",
    ),
    pytest.param(
        "jetmoe",
        {
            "experts": {"0": [0, 1, 2], "1": [1, 2, 3]},
            "attention_experts": {"0": [0, 1], "1": [2, 3]},
        },
        ("experts keep 3 and attention_experts keep 2", "one config key 'num_local_experts'"),
        id="jetmoe-unequal-mlp-attention",
    ),
    pytest.param(
        "mixtral",
        {"experts": {"0": [0, 1, 9], "5": [0, 1, 2]}, "heads": {"0": [0, 1, 2]}},
        (
            "4 problems in the plan: ",
            "experts[0]: ids [9] out of range",
            "experts[5]: layer 5 does not exist",
            "kept counts differ across MoE layers",
            "heads[0]: KV groups would be unequal",
        ),
        id="several-problems",
    ),
    pytest.param(
        "mixtral",
        '{"format": "mfprune.plan/1", "experts": {"0": [0, 1]',
        ("plan file", "is not valid JSON"),
        id="malformed-json",
    ),
    pytest.param(
        "mixtral", "[" * 100_000, ("plan file", "is not valid JSON"), id="deeply-nested-json"
    ),
    pytest.param("mixtral", b"\xff\xfe{}", ("plan file", "is not valid JSON"), id="not-utf8"),
    pytest.param(
        "mixtral", "[[0, 1, 2, 3]]", ("a plan must be a JSON object",), id="not-an-object"
    ),
    pytest.param(
        "mixtral",
        {"format": "mfprune.plan/2", "experts": EXPERTS_OK},
        ("'format' must be \"mfprune.plan/1\", got 'mfprune.plan/2'",),
        id="wrong-format",
    ),
    pytest.param(
        "mixtral",
        {"format": None, "experts": EXPERTS_OK},
        ("'format' must be", "got None"),
        id="no-format",
    ),
    pytest.param(
        "mixtral",
        {"expert": EXPERTS_OK},
        ("unknown key 'expert' — did you mean 'experts'?",),
        id="unknown-key",
    ),
    pytest.param(
        "mixtral",
        {"experts": {"0": ["0", 1, 2, 3], "1": [0, 1, 2, 3]}},
        ("experts[0]: expected a list of integer ids, got ['0', 1, 2, 3]",),
        id="string-ids",
    ),
    pytest.param(
        "mixtral",
        {"experts": {"0": [0.0, 1, 2, 3], "1": [0, 1, 2, 3]}},
        ("experts[0]: expected a list of integer ids",),
        id="float-ids",
    ),
    pytest.param(
        "mixtral",
        {"experts": {"0": [True, 1, 2, 3], "1": [0, 1, 2, 3]}},
        ("experts[0]: expected a list of integer ids",),
        id="bool-ids",
    ),
    pytest.param(
        "mixtral",
        {"experts": {"0": 4, "1": [0, 1, 2, 3]}},
        ("experts[0]: expected a list of integer ids, got 4",),
        id="ids-not-a-list",
    ),
    pytest.param(
        "mixtral",
        {"experts": {"first": [0, 1, 2, 3]}},
        ('experts[first]: layer keys are decoder-layer indices like "3"',),
        id="layer-key-not-int",
    ),
    pytest.param(
        "mixtral",
        {"experts": {"\u00b3": [0, 1, 2, 3]}},
        ("experts[\u00b3]: layer keys are decoder-layer indices",),
        id="layer-key-superscript",
    ),
    pytest.param(
        "mixtral",
        {"experts": [[0, 1, 2, 3]]},
        ("'experts' must be an object of layer -> list of ids",),
        id="section-not-object",
    ),
    pytest.param(
        "mixtral",
        {"format": "v1", "heads2": {}, "experts": {"0": ["a"]}},
        (
            "3 problems in the plan: ",
            "'format' must be",
            "unknown key 'heads2'",
            "expected a list of integer ids",
        ),
        id="several-structural-problems",
    ),
]


@pytest.mark.parametrize(("family", "plan", "fragments"), PLAN_CASES)
def test_bad_plan(family, plan, fragments, tiny_checkpoint, tmp_path):
    model = copy_model(tiny_checkpoint, family, tmp_path)
    plan_file = tmp_path / "plan.json"
    if isinstance(plan, bytes):
        plan_file.write_bytes(plan)
    else:
        write_plan(plan_file, {"format": PLAN_FORMAT, **plan} if isinstance(plan, dict) else plan)
    line = prune_fails(tmp_path, model, plan_file, tmp_path / "out", fragments)
    assert "see docs/plan-format.md" in line


def test_missing_plan_file(tiny_checkpoint, tmp_path):
    model = copy_model(tiny_checkpoint, "mixtral", tmp_path)
    missing = tmp_path / "no-plan.json"
    prune_fails(
        tmp_path, model, missing, tmp_path / "out", ("plan file", "does not exist", "--plan")
    )


# ----------------------------------------------------------------------- bad outputs


def _out_is_source(tmp: Path, model: Path) -> Path:
    return model


def _out_inside_source(tmp: Path, model: Path) -> Path:
    return model / "pruned"


def _out_deep_inside_source(tmp: Path, model: Path) -> Path:
    return model / "a" / ".." / "b" / "pruned"


def _out_contains_source(tmp: Path, model: Path) -> Path:
    return model.parent


def _out_not_empty(tmp: Path, model: Path) -> Path:
    out = tmp / "out"
    (out / "sub").mkdir(parents=True)
    (out / "precious.txt").write_text("do not touch")
    (out / "sub" / "weights.safetensors").write_bytes(b"\x00" * 64)
    return out


def _out_is_file(tmp: Path, model: Path) -> Path:
    out = tmp / "out"
    out.write_text("a file")
    return out


def _out_under_file(tmp: Path, model: Path) -> Path:
    (tmp / "afile").write_text("a file")
    return tmp / "afile" / "out"


def _out_under_proc(tmp: Path, model: Path) -> Path:
    # as root every permission check passes, but nothing can be created in /proc
    return Path("/proc") / f"mfprune-test-{os.getpid()}"


OUTPUT_CASES = [
    pytest.param(_out_is_source, (), ("is the source model",), id="out-is-source"),
    pytest.param(
        _out_is_source, ("--overwrite",), ("is the source model",), id="out-is-source-overwrite"
    ),
    pytest.param(
        _out_inside_source,
        (),
        ("lies inside the source model", "never writes into its inputs"),
        id="out-inside-source",
    ),
    pytest.param(
        _out_deep_inside_source,
        ("--overwrite",),
        ("lies inside the source model",),
        id="out-deep-inside-source",
    ),
    pytest.param(
        _out_contains_source, (), ("contains the source model",), id="out-contains-source"
    ),
    pytest.param(
        _out_contains_source,
        ("--overwrite",),
        ("contains the source model",),
        id="out-contains-source-overwrite",
    ),
    pytest.param(
        _out_not_empty,
        ("--overwrite",),
        ("was not written by mfprune", "only replaces mfprune's own outputs"),
        id="out-foreign-overwrite",
    ),
    pytest.param(
        _out_not_empty, (), ("exists and is not empty", "--overwrite"), id="out-not-empty"
    ),
    pytest.param(
        _out_is_file, (), ("exists and is a file", "choose a folder path"), id="out-is-file"
    ),
    pytest.param(
        _out_is_file, ("--overwrite",), ("exists and is a file",), id="out-is-file-overwrite"
    ),
    pytest.param(_out_under_file, (), ("afile is a file",), id="out-under-a-file"),
    pytest.param(
        _out_under_proc, (), ("/proc", "choose a writable output location"), id="out-unwritable"
    ),
]


@pytest.mark.parametrize(("where", "extra", "fragments"), OUTPUT_CASES)
def test_bad_output(where, extra, fragments, tiny_checkpoint, tmp_path):
    model = copy_model(tiny_checkpoint, "mixtral", tmp_path)
    plan = write_plan(tmp_path / "plan.json", MIXTRAL_HALF)
    out = where(tmp_path, model)
    prune_fails(tmp_path, model, plan, out, fragments, *extra)


# ----------------------------------------------------------------------- bad --arch files


def _arch_missing(tmp: Path) -> Path:
    return tmp / "no-such-adapter.toml"


def _arch_edit(old: str, new: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        text = resources.files("mfprune.arch").joinpath("families/mixtral.toml").read_text()
        assert old in text
        path = tmp / "adapter.toml"
        path.write_text(text.replace(old, new, 1), encoding="utf-8")
        return path

    return make


ARCH_CASES = [
    pytest.param(
        _arch_missing, ("adapter file", "no-such-adapter.toml", "does not exist"), id="arch-missing"
    ),
    pytest.param(
        _arch_edit("model_types =", "model_type ="),
        ("unknown key 'model_type' — did you mean 'model_types'?",),
        id="arch-unknown-key",
    ),
    pytest.param(
        _arch_edit("router =", "routr ="),
        (
            "experts: unknown key 'routr' — did you mean 'router'?",
            "experts: missing required key 'router'",
        ),
        id="arch-unknown-nested-key",
    ),
    pytest.param(_arch_edit("[experts]", "[experts"), ("is not valid TOML",), id="arch-not-toml"),
    pytest.param(
        _arch_edit("experts.{expert}.w1.weight", "experts.{expert}.{proj}.weight"),
        (
            "experts.per_expert: 'model.layers.{layer}.block_sparse_moe.experts.{expert}"
            ".{proj}.weight' is not a valid name template",
            "KeyError",
        ),
        id="arch-unknown-placeholder",
    ),
    pytest.param(
        _arch_edit("gate.weight", "gate{.weight"),
        (
            "experts.router: 'model.layers.{layer}.block_sparse_moe.gate{.weight' "
            "is not a valid name template",
        ),
        id="arch-stray-brace",
    ),
]


@pytest.mark.parametrize("command", ["inspect", "prune"])
@pytest.mark.parametrize(("make", "fragments"), ARCH_CASES)
def test_bad_arch(command, make, fragments, tiny_checkpoint, tmp_path):
    model = copy_model(tiny_checkpoint, "mixtral", tmp_path)
    arch = make(tmp_path)
    if command == "inspect":
        assert_clean_error(run("inspect", model, "--arch", arch), *fragments)
    else:
        plan = write_plan(tmp_path / "plan.json", MIXTRAL_HALF)
        prune_fails(tmp_path, model, plan, tmp_path / "out", fragments, "--arch", str(arch))


def test_bad_max_shard_size(tiny_checkpoint, tmp_path):
    model = copy_model(tiny_checkpoint, "mixtral", tmp_path)
    plan = write_plan(tmp_path / "plan.json", MIXTRAL_HALF)
    fragments = ("cannot read size 'lots'", "5GB")
    prune_fails(tmp_path, model, plan, tmp_path / "out", fragments, "--max-shard-size", "lots")


# ------------------------------------------------------------------- output formats


@pytest.mark.parametrize("fmt", ["human", "json", "quiet"])
def test_error_line_in_every_format(fmt, tmp_path):
    result = run("inspect", tmp_path / "nope", "--format", fmt)
    assert_clean_error(result, "does not exist")


# ------------------------------------------------------------------ positive counterparts

EXPECTED_OUT = {
    "config.json",
    "generation_config.json",
    SHARD,
    "mfprune_plan.json",
    "mfprune_provenance.json",
    "README.md",  # the pruned model's own card
}


def _assert_pruned_loads(out: Path) -> None:
    result = run("inspect", out, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["experts"]["experts_per_layer"] == 4
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info


def test_overwrite_replaces_an_earlier_output(tiny_checkpoint, tmp_path):
    model = copy_model(tiny_checkpoint, "mixtral", tmp_path)
    source = snapshot(model)
    plan = write_plan(tmp_path / "plan.json", MIXTRAL_HALF)
    out = tmp_path / "out"
    assert run("prune", model, "--plan", plan, "--out", out).exit_code == 0
    (out / "sub").mkdir()
    (out / "precious.txt").write_text("an earlier output's extra file")
    (out / "config.json").write_text('{"stale": true}')
    result = run("prune", model, "--plan", plan, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert f"replaced {out}" in result.stderr  # says what it removed
    assert {p.name for p in out.iterdir()} == EXPECTED_OUT  # precious.txt and sub/ are gone
    assert "stale" not in (out / "config.json").read_text()
    assert snapshot(model) == source
    assert leftovers(out) == []
    _assert_pruned_loads(out)


def test_empty_output_folder_needs_no_overwrite(tiny_checkpoint, tmp_path):
    model = copy_model(tiny_checkpoint, "mixtral", tmp_path)
    source = snapshot(model)
    plan = write_plan(tmp_path / "plan.json", MIXTRAL_HALF)
    out = tmp_path / "out"
    out.mkdir()
    result = run("prune", model, "--plan", plan, "--out", out)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert {p.name for p in out.iterdir()} == EXPECTED_OUT
    assert snapshot(model) == source
    assert leftovers(out) == []
    _assert_pruned_loads(out)

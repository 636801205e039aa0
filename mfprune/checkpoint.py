"""A model folder on disk: its config, its safetensors shards and where every tensor lies.

Opening a checkpoint validates it without loading a weight: the folder and ``config.json``
exist, weights are safetensors (pickle files are refused, never unpickled), the index names
files inside the folder, and every header is sound.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mfprune.errors import CheckpointError, ModelError
from mfprune.io.reader import SafetensorsHeader, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SAMPLE = 1 << 20  # bytes of each shard's data that the fingerprint reads, at each end


@dataclass(frozen=True)
class Checkpoint:
    root: Path
    config: dict[str, Any]
    shards: tuple[SafetensorsHeader, ...]
    tensors: dict[str, TensorInfo]  # every tensor, shard by shard in on-disk order
    index: dict[str, Any] | None  # the parsed index file, when there is one

    @property
    def weight_files(self) -> set[Path]:
        return {s.path for s in self.shards} | ({self.root / INDEX_NAME} if self.index else set())

    @property
    def nbytes(self) -> int:
        return sum(s.file_size for s in self.shards)

    def fingerprint(self) -> str:
        """sha256 over config.json, every shard header and a sample of each shard's data (its
        first and last MiB): cheap on any size, and two fine-tunes of one layout differ."""
        h = hashlib.sha256((self.root / "config.json").read_bytes())
        for shard in self.shards:
            h.update(shard.path.name.encode())
            h.update(shard.raw_header)
            h.update(str(shard.file_size).encode())
            start = 8 + len(shard.raw_header)
            with open(shard.path, "rb") as f:
                f.seek(start)
                h.update(f.read(_SAMPLE))
                f.seek(max(start, shard.file_size - _SAMPLE))
                h.update(f.read(_SAMPLE))
        return h.hexdigest()


def model_location(model: str | Path) -> Path:
    """Where MODEL lives: the name ``"default"`` (a string, as typed on a command line or in a
    config file) is the embedded default model (``mfprune/default_model``); anything else is a
    folder. The one place the name is resolved: ``open_checkpoint``, ``load_pretrained``, every
    CLI model argument and the shrink config all go through here. A folder that is really
    called ``default``: write ``./default`` (or pass a ``Path``)."""
    from mfprune.default_model import resolve_model

    return Path(resolve_model(model))


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _missing_hint(path: str | Path) -> str:
    """A hub id (``Qwen/Qwen3-30B-A3B``) gets told that only local folders work."""
    text = str(path)
    if _HUB_ID.match(text) and not text.startswith("."):
        return (
            "MODEL is a local folder: mfprune never downloads. Fetch it first, e.g. "
            f"`huggingface-cli download {text} --local-dir DIR`, then pass DIR"
        )
    return "check the path: MODEL is a local folder holding config.json and *.safetensors"


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Validate a model folder (or ``"default"``, see ``model_location``) and index its tensors
    (headers only)."""
    root = model_location(path)
    if not root.exists():
        raise ModelError(f"model folder {root} does not exist", hint=_missing_hint(path))
    if not root.is_dir():
        what = _stats_note(root)
        raise ModelError(
            f"{root} is a file{what}, not a model folder",
            hint="pass the folder holding config.json"
            + (" (stats go to --profile)" if what else ""),
        )
    root = root.resolve()
    config = read_config(root)
    files = _shard_files(root)
    shards = tuple(read_header(f) for f in files)
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in shard.tensors.items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor '{name}' appears in both {tensors[name].file.name} and "
                    f"{shard.path.name}"
                )
            tensors[name] = info
    index = _read_index(root) if (root / INDEX_NAME).exists() else None
    if index is not None:
        _check_index_matches(root, index["weight_map"], tensors)
    return Checkpoint(root=root, config=config, shards=shards, tensors=tensors, index=index)


_CONFIG_HINT = "fix config.json, or restore the one save_pretrained wrote with the weights"


def read_config(root: Path) -> dict[str, Any]:
    cfg = root / "config.json"
    if not cfg.is_file():
        raise ModelError(
            f"no config.json in {root}",
            hint="a model folder is what save_pretrained writes: config.json + *.safetensors",
        )
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelError(
            f"config.json in {root} is not valid JSON: {exc}", hint=_CONFIG_HINT
        ) from None
    if not isinstance(config, dict):
        raise ModelError(f"config.json in {root} is not a JSON object", hint=_CONFIG_HINT)
    return config


def is_inside(root: Path, p: Path) -> bool:
    """Whether ``p`` (links resolved) lies in ``root`` or in a Hugging Face cache's blobs."""
    target = p.resolve()
    if target.is_relative_to(root):
        return True
    # hub cache: <repo>/snapshots/<rev>/file -> <repo>/blobs/<sha>
    return root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs"


def _shard_files(root: Path) -> list[Path]:
    index = root / INDEX_NAME
    if index.exists():
        weight_map = _read_index(root)["weight_map"]
        names = sorted(set(weight_map.values()))
    elif (root / SINGLE_NAME).exists():
        names = [SINGLE_NAME]
    else:  # what transformers loads: model.safetensors, or shards named by an index
        names = sorted(p.name for p in root.glob("model-*.safetensors"))
    if not names:
        others = sorted(p.name for p in root.glob("*.safetensors"))
        if others:
            what = _stats_note(root / others[0])
            raise ModelError(
                f"{root} has no model.safetensors or {INDEX_NAME}; "
                f"{', '.join(others[:3])}{' …' if len(others) > 3 else ''} "
                f"{'is' if len(others) == 1 else 'are'} not weights transformers loads{what}",
                hint="a model folder holds model.safetensors, or model-*.safetensors shards "
                "named by model.safetensors.index.json (what save_pretrained writes)",
            )
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelError(
                f"{root} holds only pickle weights ({', '.join(pickles[:3])}); mfprune never "
                "unpickles files",
                hint="convert to safetensors: load once in a trusted environment and "
                "save_pretrained(dir, safe_serialization=True)",
            )
        raise ModelError(f"no *.safetensors weights in {root}", hint="check the model folder")
    files = []
    for name in names:
        p = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(
                f"the index points outside the model folder: '{name}'",
                hint="an index may only name shard files inside the model folder",
            )
        if not is_inside(root, p):
            raise CheckpointError(
                f"{name} is a symlink that points outside the model folder",
                hint="copy the file into the folder instead of linking it",
            )
        if not p.is_file():
            raise CheckpointError(
                f"shard {name} named by the index is missing", hint="re-download the checkpoint"
            )
        files.append(p)
    for p in root.glob("*.safetensors"):
        if p.is_symlink() and not is_inside(root, p):
            raise CheckpointError(
                f"{p.name} is a symlink that points outside the model folder",
                hint="copy the file into the folder instead of linking it",
            )
    return files


def _stats_note(path: Path) -> str:
    """' (it is an mfprune stats file)' when ``path`` is one, else ''."""
    from mfprune.io.reader import read_header

    try:
        fmt = read_header(path).metadata.get("format", "")
    except (CheckpointError, OSError):
        return ""
    return " (it is an mfprune stats file)" if fmt.startswith("mfprune.stats") else ""


def _read_index(root: Path) -> dict[str, Any]:
    try:
        index = json.loads((root / INDEX_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{INDEX_NAME} is not valid JSON: {exc}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{INDEX_NAME} has no valid weight_map")
    return index


def _check_index_matches(
    root: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]
) -> None:
    for name, file in weight_map.items():
        if name not in tensors:
            raise CheckpointError(f"{INDEX_NAME} lists '{name}' but no shard holds it")
        if tensors[name].file.name != Path(file).name:
            raise CheckpointError(
                f"{INDEX_NAME} puts '{name}' in {file} but it is in {tensors[name].file.name}"
            )
    missing = sorted(set(tensors) - set(weight_map))
    if missing:
        raise CheckpointError(
            f"{INDEX_NAME} does not list '{missing[0]}' (and {len(missing) - 1} more)"
        )

"""Running a model whose code transformers does not ship: opt-in, and in one place.

Two ways, both off by default:

* ``--model-code module:Class`` — a Python import path the user points at: a ``PreTrainedModel``
  subclass whose ``config_class`` is its own ``PretrainedConfig`` (with a ``model_type``). The
  class is imported and registered with transformers' ``AutoConfig`` /
  ``AutoModelForCausalLM`` for its ``model_type`` (for the command only), so every loader
  (profile, prune --verify, bench, the oracle) builds it with ``from_pretrained`` as it
  would a stock family.
* ``--trust-remote-code`` — the checkpoint's own ``auto_map`` code (Python files in the model
  folder) is run. That executes code from the checkpoint, so the CLI says so loudly.

Without either, a checkpoint whose ``model_type`` transformers does not know stops with a
message naming both options. ``use_model_code`` sets the choice for the duration of a command;
``model_kwargs`` is what the loaders add to their ``from_pretrained`` calls.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from mfprune.errors import ModelError

_HINT = "pass --model-code module:Class (a PreTrainedModel subclass with its own config class)"

REMOTE_CODE_WARNING = (
    "--trust-remote-code: the model folder's own Python code (config.json auto_map) will be "
    "imported and run with your permissions; use it only on checkpoints you trust"
)


@dataclass(frozen=True)
class ModelCode:
    """Where a model's code comes from: transformers (default), a class the user named, or
    the checkpoint's ``auto_map`` code (``trust_remote_code``)."""

    class_path: str | None = None  # "package.module:ClassName"
    trust_remote_code: bool = False


_DEFAULT = ModelCode()
_ACTIVE: ContextVar[ModelCode] = ContextVar("mfprune_model_code", default=_DEFAULT)


def active() -> ModelCode:
    return _ACTIVE.get()


def model_kwargs() -> dict[str, Any]:
    """Extra ``from_pretrained`` keyword arguments for the active choice."""
    return {"trust_remote_code": True} if _ACTIVE.get().trust_remote_code else {}


@contextmanager
def use_model_code(
    *, class_path: str | None = None, trust_remote_code: bool = False
) -> Iterator[ModelCode]:
    """Make ``class_path`` or remote code the active choice for the duration of the context.
    ``class_path`` is imported and registered with transformers' auto classes, and the
    registration is undone on exit (when it was not there before)."""
    undo = register_class(class_path)[1] if class_path is not None else None
    token = _ACTIVE.set(ModelCode(class_path=class_path, trust_remote_code=trust_remote_code))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)
        if undo is not None:
            undo()


def load_class(class_path: str) -> type:
    """Import ``module:Class`` and check it is a ``PreTrainedModel`` with its own config."""
    from transformers import PretrainedConfig, PreTrainedModel

    module_name, sep, attr = class_path.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(f"--model-code '{class_path}' is not module:Class", hint=_HINT)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(
            f"--model-code: cannot import {module_name}: {exc}",
            hint="put the module on PYTHONPATH (or install its package)",
        ) from None
    cls = getattr(module, attr, None)
    if not isinstance(cls, type) or not issubclass(cls, PreTrainedModel):
        raise ModelError(
            f"--model-code: {class_path} is not a transformers PreTrainedModel class", hint=_HINT
        )
    config_cls = getattr(cls, "config_class", None)
    if (
        not isinstance(config_cls, type)
        or not issubclass(config_cls, PretrainedConfig)
        or not getattr(config_cls, "model_type", "")
    ):
        raise ModelError(
            f"--model-code: {class_path}.config_class is not a PretrainedConfig with a model_type",
            hint="give the model class its own config class (config_class = MyConfig)",
        )
    return cls


def register_class(class_path: str) -> tuple[type, Callable[[], None]]:
    """Register the class with ``AutoConfig`` / ``AutoModelForCausalLM``; return it and a
    function that removes what this call added."""
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = load_class(class_path)
    config_cls = cls.config_class
    model_type = config_cls.model_type
    new_type = model_type not in CONFIG_MAPPING
    new_model = config_cls not in MODEL_FOR_CAUSAL_LM_MAPPING._extra_content
    AutoConfig.register(model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, cls, exist_ok=True)

    def undo() -> None:
        if new_type:
            CONFIG_MAPPING._extra_content.pop(model_type, None)
        if new_model:
            MODEL_FOR_CAUSAL_LM_MAPPING._extra_content.pop(config_cls, None)

    return cls, undo


def check_loadable(config: dict[str, Any], *, where: str) -> None:
    """Refuse, before transformers does it less clearly, a model whose code is nowhere: an
    unknown ``model_type`` with no ``--model-code`` (or ``auto_map`` without
    ``--trust-remote-code``)."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    if config.get("auto_map") and _ACTIVE.get().trust_remote_code:
        return
    if config.get("auto_map"):
        raise ModelError(
            f"{where}: model_type '{model_type}' is not in transformers; the checkpoint ships its "
            "own code (auto_map), which mfprune does not run by default",
            hint="pass --trust-remote-code if you trust that code, or "
            + _HINT.removeprefix("pass "),
        )
    raise ModelError(
        f"{where}: model_type '{model_type}' is not in transformers and no model code was given",
        hint=_HINT,
    )

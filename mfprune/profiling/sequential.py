"""Layer-by-layer profiling (``--sequential``) for models bigger than memory.

The approach of llm-compressor's sequential pipeline and REAP's layerwise observer:

1. The model is built as a skeleton on the meta device (``from_config`` under
   ``torch.device("meta")``): every module exists, no weight takes memory.
2. The embeddings are read from the safetensors, and every batch's input to decoder layer 0 is
   computed and kept (on CPU); the embeddings go back to meta.
3. For each decoder layer in turn: its tensors are read from the safetensors and converted to
   the in-memory layout by transformers' own loading rules (the per-expert
   ``experts.{e}.w1/w2/w3`` or ``gate/up/down_proj`` that many families save become the fused
   ``gate_up_proj [E, 2I, D]`` / ``down_proj [E, D, I]``), loaded into the skeleton; every
   batch's hidden states go through it with the profiling hooks attached and replace the kept
   ones; the layer goes back to meta.

A layer gets exactly the arguments the model's own forward would give it — the causal or
sliding-window mask of its layer type, the rotary position embeddings, the position ids —
found by running the decoder's own forward with stand-ins for its layers that record the
arguments of layer i and stop there (masks and rotary embeddings are cheap next to a layer).
That holds only where the decoder does nothing between its layers but hand one layer's output
to the next, and builds their other arguments from the hidden states' shape alone; so before
layer 0, one forward from the token ids with stand-ins for every layer checks the hand-over,
and each layer's rebuilt arguments are compared with that forward's (first batch). A model
that carries state between layers (hyper-connection streams, block states, top-k indices, or
any object but tensors among a layer's arguments, which layers could write into) or gives
layers inputs made from the token ids is refused in one line, never run differently.

Peak memory: one layer's weights (twice while per-expert tensors are fused), the embeddings
until layer 0's inputs are made, every batch's hidden states [T, D], and one batch's
activations. Tensors are read with plain file reads, not mmap, so pages of the checkpoint
never count towards the process's resident memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import itertools
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mfprune.checkpoint import Checkpoint
from mfprune.errors import CheckpointError, ModelError
from mfprune.io.reader import TensorInfo
from mfprune.profiling.hooks import Recorder

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
}
Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids [B, S], attention_mask [B, S])


def checkpoint_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype ``from_pretrained(dtype="auto")`` picks: the config's, else the first
    floating-point tensor's."""
    for key in ("dtype", "torch_dtype"):
        value = ckpt.config.get(key)
        if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
            return getattr(torch, value)
    for info in ckpt.tensors.values():
        dtype = _TORCH_DTYPES.get(info.dtype)
        if dtype is not None and dtype.is_floating_point:
            return dtype
    return torch.get_default_dtype()


def is_fp8_block(ckpt: Checkpoint) -> bool:
    from mfprune.arch.formats import detect_format

    return detect_format(ckpt.config, ckpt.tensors).name == "fp8-block"


def build_skeleton(ckpt: Checkpoint, *, dtype: torch.dtype, device: torch.device) -> Any:
    """The model of ``ckpt`` with every weight on the meta device, in eval mode; only the
    non-persistent buffers outside the decoder layers (the rotary frequencies) are real."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mfprune.modelcode import model_kwargs
    from mfprune.profiling.run import quiet_transformers

    if ckpt.config.get("quantization_config") and not is_fp8_block(ckpt):
        raise ModelError(
            f"{ckpt.root} is a quantized checkpoint, which --sequential cannot read yet "
            "(FP8 block checkpoints it dequantizes layer by layer)",
            hint="profile it without --sequential, or a dequantized copy with it",
        )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = ckpt.config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:  # a composite (vision + text) model
        raise ModelError(
            f"{ckpt.root} is a '{model_type}' model, which has no causal-LM class to run layer "
            "by layer: --sequential cannot profile it yet",
            hint="profile it without --sequential",
        )
    with quiet_transformers():
        extra = model_kwargs()  # --trust-remote-code (mfprune.modelcode)
        config = AutoConfig.from_pretrained(ckpt.root, local_files_only=True, **extra)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    model.eval()
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ModelError(
            f"{type(model.base_model).__name__} keeps no decoder layers in `.layers`: "
            "--sequential cannot run it one layer at a time",
            hint="profile it without --sequential",
        )
    _init_buffers(model, model, device, skip=layers)
    return model


class LayerByLayer:
    """Runs batches through a meta skeleton one decoder layer at a time (module docstring)."""

    def __init__(self, ckpt: Checkpoint, model: Any, *, device: torch.device) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
        from transformers.modeling_utils import LoadStateDictConfig

        self.model, self.device = model, device
        self.fp8 = is_fp8_block(ckpt)  # weights dequantized as each layer is read
        self.decoder = model.base_model
        layers = getattr(self.decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            raise ModelError(
                f"{type(self.decoder).__name__} keeps no decoder layers in `.layers`",
                hint="--sequential does not support this model; profile without it",
            )
        self.layers: nn.ModuleList = layers
        names = {id(m): name for name, m in model.named_modules()}
        layers_name = names[id(self.layers)]
        self.embed = model.get_input_embeddings()
        embed_name = names[id(self.embed)]
        dtype = next(model.parameters()).dtype
        mapping = get_model_conversion_mapping(model)
        self.load_config = LoadStateDictConfig(
            dtype=dtype,
            dtype_plan=model._get_dtype_plan(dtype),
            weight_mapping=mapping,
            device_map={"": device},
        )
        # on-disk tensors by the module they load into: "embed" or the decoder-layer index
        meta_state = model.state_dict()
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        renamings = [m for m in mapping if m not in converters]
        layer_key = re.compile(rf"^{re.escape(layers_name)}\.(\d+)\.")
        self.tensors: dict[str | int, list[TensorInfo]] = {}
        for name, info in ckpt.tensors.items():
            target, _ = rename_source_key(
                name, renamings, converters, model.base_model_prefix, meta_state
            )
            match = layer_key.match(target)
            if match and int(match.group(1)) < len(self.layers):
                self.tensors.setdefault(int(match.group(1)), []).append(info)
            elif target.startswith(embed_name + "."):
                self.tensors.setdefault("embed", []).append(info)
        # (the final norm and the LM head are never needed: stats come from the layers)

    # ----------------------------------------------------------------------------- running

    def run(
        self,
        batches: list[Batch],
        recorder: Recorder,
        *,
        on_batch: Callable[[float], None] | None = None,
    ) -> None:
        """Profile ``batches`` through every layer with ``recorder``'s hooks attached."""
        _return_freed_memory()
        with torch.no_grad():
            self._run(batches, recorder, on_batch)

    def _run(
        self, batches: list[Batch], recorder: Recorder, on_batch: Callable[[float], None] | None
    ) -> None:
        hidden, probe = self._first_inputs(batches)
        count = len(self.layers)
        with recorder.attached():
            for i, layer in enumerate(self.layers):
                with self._loaded(i, layer):
                    for b, (_ids, mask) in enumerate(batches):
                        h = hidden[b].to(self.device)
                        _, args, kwargs = self._inputs(i, inputs_embeds=h, attention_mask=mask)
                        if b == 0:
                            _check_same_inputs(self.decoder, i, probe[i], (args, kwargs))
                        recorder.set_mask(mask)
                        out = layer(h, *args, **kwargs)
                        out = out[0] if isinstance(out, tuple) else out
                        hidden[b] = out.to("cpu")
                        if on_batch is not None:
                            on_batch(int(mask.sum()) / count)

    def walk(
        self,
        batches: list[Batch],
        visit: Callable[[int, nn.Module, Callable[[int], torch.Tensor]], Any],
    ) -> None:
        """Every batch through every decoder layer, one layer loaded at a time (``--repair
        refit --sequential``). For each layer, ``visit(i, layer, run)`` may run batches through
        it first (``run(b)``: batch b's current hidden states through the layer -> its output
        [B, S, D], the kept states unchanged) and returns a context manager (or None) under
        which every batch then goes through the layer for good."""
        _return_freed_memory()
        with torch.no_grad():
            hidden, probe = self._first_inputs(batches)
            for i, layer in enumerate(self.layers):
                with self._loaded(i, layer):

                    def run(
                        b: int, i: int = i, layer: nn.Module = layer, states: list = hidden
                    ) -> torch.Tensor:
                        h = states[b].to(self.device)
                        mask = batches[b][1]
                        _, args, kwargs = self._inputs(i, inputs_embeds=h, attention_mask=mask)
                        if b == 0:
                            _check_same_inputs(self.decoder, i, probe[i], (args, kwargs))
                        out = layer(h, *args, **kwargs)
                        return out[0] if isinstance(out, tuple) else out

                    with visit(i, layer, run) or contextlib.nullcontext():
                        hidden = [run(b).to("cpu") for b in range(len(batches))]

    def _first_inputs(self, batches: list[Batch]) -> tuple[list[torch.Tensor], list[tuple]]:
        """Every batch's input of decoder layer 0 [B, S, D] (on CPU), and the (args, kwargs)
        that the decoder gives each layer for batch 0, from the token ids (``_probe``)."""
        with self._loaded("embed", self.embed):
            probe = self._probe(*batches[0])
            hidden = [
                self._inputs(0, input_ids=ids, attention_mask=mask)[0].to("cpu")
                for ids, mask in batches
            ]  # each [B, S, D]
        return hidden, probe

    def _probe(self, ids: torch.Tensor, mask: torch.Tensor) -> list[tuple]:
        """Run the decoder's forward from the token ids with stand-ins for all its layers, each
        returning its input (up to the last), and refuse a model whose decoder does more
        between its layers than hand one layer's output to the next (state beyond the hidden
        states: hyper-connection streams, block states, layer outputs unpacked into several
        values). Returns every layer's (args, kwargs): the layer-by-layer runs must rebuild
        them from the hidden states alone."""
        found: dict[str, Any] = {}
        count = len(self.layers)
        self._call_decoder(
            [_StandIn(i, -count, found, self.layers[i]) for i in range(count)],
            input_ids=ids,
            attention_mask=mask,
        )
        calls = found.get("calls", [])
        name = type(self.decoder).__name__
        if [i for i, *_ in calls] != list(range(count)):
            raise ModelError(
                f"{name}.forward does not call its {count} decoder layers once each in order "
                f"(called: {[i for i, *_ in calls]}): --sequential cannot run it one layer at "
                "a time",
                hint="profile it without --sequential",
            )
        for (i, _, _, returned), (j, got, _, _) in itertools.pairwise(calls):
            if got is not returned:
                raise ModelError(
                    f"{name}.forward passes decoder layer {j} more than layer {i}'s output "
                    "(state carried between layers): --sequential cannot run it one layer "
                    "at a time",
                    hint="profile it without --sequential",
                )
        for i, _, (args, kwargs), _ in calls:
            held = [f"{k}: {_opaque(v)}" for k, v in (*enumerate(args), *kwargs.items())]
            held = [h for h in held if not h.endswith(": ")]
            if held:  # a cache, a dict the layers write into: state the stand-ins never fill
                raise ModelError(
                    f"{name}.forward gives decoder layer {i} objects besides tensors "
                    f"({', '.join(held[:3])}), which may carry state between layers: "
                    "--sequential cannot run it one layer at a time",
                    hint="profile it without --sequential",
                )
        return [(args, kwargs) for _, _, (args, kwargs), _ in calls]

    def _inputs(self, index: int, **model_inputs: Any) -> tuple[torch.Tensor, tuple, dict]:
        """(hidden states, args, kwargs) that the decoder's own forward passes to layer
        ``index``, found by running it with stand-ins that stop at that layer."""
        found: dict[str, Any] = {}
        count = len(self.layers)
        self._call_decoder(
            [_StandIn(i, index, found, self.layers[i]) for i in range(count)], **model_inputs
        )
        if "hidden" not in found:
            raise ModelError(
                f"{type(self.decoder).__name__}.forward never called decoder layer {index}",
                hint="--sequential does not support this model's forward; profile without it",
            )
        return found["hidden"], found["args"], found["kwargs"]

    def _call_decoder(self, stand_ins: list[nn.Module], **model_inputs: Any) -> None:
        """The decoder's forward with ``stand_ins`` for its layers, until one stops it."""
        inputs = {k: v.to(self.device) for k, v in model_inputs.items()}
        self.decoder.layers = nn.ModuleList(stand_ins)
        try:
            self.decoder(**inputs, use_cache=False)
        except _Stop:
            pass
        except (RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            raise ModelError(
                f"{type(self.decoder).__name__}.forward cannot run with its decoder layers "
                f"one at a time ({type(e).__name__}: {first}): --sequential does not support "
                f"{self.model.config.model_type}",
                hint="profile it without --sequential",
            ) from e
        finally:
            self.decoder.layers = self.layers

    # ----------------------------------------------------------------------------- loading

    @contextmanager
    def _loaded(self, key: str | int, module: nn.Module) -> Iterator[None]:
        """Load ``module``'s tensors from the checkpoint; send it back to meta afterwards."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model

        from mfprune.arch.formats import dequantize_fp8_blocks
        from mfprune.profiling.run import quiet_transformers

        where = "the embeddings" if key == "embed" else f"decoder layer {key}"
        infos = self.tensors.get(key, [])
        state = {info.name: read_tensor(info) for info in infos}
        if self.fp8:
            state = dequantize_fp8_blocks(state)
        with quiet_transformers():
            info, _ = convert_and_load_state_dict_in_model(self.model, state, self.load_config)
        del state
        _init_buffers(self.model, module, self.device)
        missing = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
        problems = (
            [str(e) for e in info.conversion_errors.values()] if info.conversion_errors else []
        )
        problems += [
            f"{name}: {got} on disk, {want} expected" for name, got, want in info.mismatched_keys
        ]
        if missing or problems:
            what = f"missing {', '.join(missing[:4])}" if missing else "; ".join(problems[:3])
            raise ModelError(
                f"cannot load {where} of {self.model.config.model_type} from the checkpoint "
                f"({what})",
                hint="the checkpoint does not match its config.json; check it loads with "
                "from_pretrained, or profile without --sequential",
            )
        try:
            yield
        finally:
            module.to("meta")


class _Stop(Exception):
    """Raised by the stand-in of the layer whose inputs are wanted."""


class _StandIn(nn.Module):
    """Decoder layer ``index``'s stand-in: returns its input; records it at ``target`` and
    stops there (``target`` -L: records every call in ``found["calls"]``, stops after the
    last of the L layers). Plain attributes the decoder reads off its layers (a block type)
    come from the real layer."""

    def __init__(self, index: int, target: int, found: dict[str, Any], real: nn.Module) -> None:
        super().__init__()
        self.index, self.target, self.found = index, target, found
        object.__setattr__(self, "_real", real)  # not a submodule: never loaded or moved

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            value = getattr(object.__getattribute__(self, "_real"), name)
            if isinstance(value, nn.Module | torch.Tensor) or callable(value):
                raise
            return value

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.index == self.target:
            self.found.update(hidden=hidden, args=args, kwargs=kwargs)
            raise _Stop
        if self.target < 0:
            calls = self.found.setdefault("calls", [])
            calls.append((self.index, hidden, (args, kwargs), hidden))
            if self.index == -self.target - 1:  # the last layer: the final norm is not loaded
                raise _Stop
        return hidden


def _check_same_inputs(decoder: nn.Module, index: int, want: tuple, got: tuple) -> None:
    """Refuse when layer ``index``'s arguments rebuilt from the hidden states (``got``) differ
    from those the decoder gives it from the token ids (``want``): inputs made from the ids or
    the embeddings (per-layer inputs, n-gram embeddings) or state from earlier layers."""
    if not _same(want, got):
        raise ModelError(
            f"{type(decoder).__name__}.forward gives decoder layer {index} inputs made from "
            "more than the hidden states (token ids, embeddings or earlier layers' state): "
            "--sequential cannot run it one layer at a time",
            hint="profile it without --sequential",
        )


def _opaque(value: Any) -> str:
    """'' for a tensor, None, a number, a string or a tuple of them; else the type's name."""
    if value is None or isinstance(value, torch.Tensor | bool | int | float | str):
        return ""
    if isinstance(value, tuple):
        return next((t for t in map(_opaque, value) if t), "")
    return type(value).__name__


def _same(a: Any, b: Any) -> bool:
    """Equal argument trees: tensors by value, containers item by item, others by type."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a.cpu(), b.cpu())
        )
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is None or isinstance(a, bool | int | float | str):
        return a == b
    return type(a) is type(b)


def _init_buffers(
    model: Any, root: nn.Module, device: torch.device, *, skip: nn.Module | None = None
) -> None:
    """Make the non-persistent buffers under ``root`` (rotary frequencies: computed, never
    saved) real, with the model's own initialisation; leave the modules under ``skip``."""
    skipped = {id(m) for m in skip.modules()} if skip is not None else set()
    for module in root.modules():
        if id(module) in skipped:
            continue
        meta = [
            n
            for n in module._non_persistent_buffers_set
            if module._buffers.get(n) is not None and module._buffers[n].is_meta
        ]
        if not meta:
            continue
        if any(True for _ in module.parameters(recurse=False)):
            raise ModelError(
                f"{type(module).__name__} computes buffers ({', '.join(meta)}) next to weights, "
                "which --sequential cannot rebuild",
                hint="profile this model without --sequential",
            )
        for name in meta:
            module._buffers[name] = torch.empty_like(module._buffers[name], device=device)
        model._init_weights(module)


def _return_freed_memory() -> None:
    """Make glibc hand every freed tensor above 1 MiB back to the system.

    By default glibc raises its mmap threshold (up to 32 MiB) each time a big mapped block is
    freed, after which blocks of that size come from its heap and stay there once freed: layer
    after layer, RSS creeps up (measured: +40% peak on the benchmark checkpoint). A fixed
    threshold keeps each big tensor its own mapping, unmapped when freed. Process-wide, and only
    on glibc; elsewhere nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor's bytes, read with a plain file read (no mmap) into a new CPU tensor."""
    dtype = _TORCH_DTYPES.get(info.dtype)
    if dtype is None:
        raise CheckpointError(f"tensor '{info.name}' has dtype {info.dtype}, unknown to torch")
    data = torch.empty(info.nbytes, dtype=torch.uint8)
    with open(info.file, "rb") as f:
        f.seek(info.start)
        got = f.readinto(memoryview(data.numpy()))
    if got != info.nbytes:
        raise CheckpointError(
            f"{info.file.name} ends inside tensor '{info.name}' ({got} of {info.nbytes} bytes)"
        )
    return data.view(dtype).reshape(info.shape)

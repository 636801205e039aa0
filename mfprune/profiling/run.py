"""profile_model: run task data through a model and record how it uses its experts and heads.

Order of work, cheapest first, so bad input fails before the model is loaded: the checkpoint
and its adapter, the options, the tokenizer, the data (read and tokenized in full), then the
model, then the forward passes (through the decoder only: logits are not needed).

Two ways to run the passes: the whole model in memory (default), or one decoder layer at a
time read from the safetensors (``sequential=True``, sequential.py). Under ``torchrun`` the
ranks split the data and all-reduce the sums (distributed.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mfprune.arch import ArchSpec, spec_for_config
from mfprune.arch.layout import ModelLayout, lm_config, resolve_layout
from mfprune.checkpoint import Checkpoint, open_checkpoint
from mfprune.errors import DataError, MfpruneError, ModelError
from mfprune.memory import check_fits, loaded_bytes
from mfprune.modelcode import check_loadable
from mfprune.modules import is_block_diffusion, text_model
from mfprune.profiling import distributed
from mfprune.profiling.data import MIN_TOKENS, WHOLE, Shard, TokenData, load_token_data
from mfprune.profiling.distributed import World
from mfprune.profiling.hooks import Recorder
from mfprune.profiling.stats import ExpertStats, ProfileStats, StatsMeta

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def profile_model(
    model_dir: str | Path,
    data: str | Path,
    *,
    max_tokens: int | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
    text_field: str | None = None,
    shard: Shard = WHOLE,
    sequential: bool = False,
    spec: ArchSpec | None = None,
    on_start: Callable[[TokenData], None] | None = None,
    on_batch: Callable[[float], None] | None = None,
) -> ProfileStats:
    """Profile ``model_dir`` (a local folder with a tokenizer) on ``data``.

    Args:
        max_tokens: stop after this many tokens (None: all of the data).
        batch_size: sequences per forward pass; shorter ones are padded (padding never counts).
        seq_len: longer documents are cut into chunks of at most this many tokens (None:
            2048, or the model's ``max_position_embeddings`` if smaller; a larger value than
            the model's positions is refused).
        dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
        device: "auto" (cuda if available, else cpu), or a torch device such as "cuda:1".
        text_field: the JSONL field holding the text (default: text / messages /
            prompt+completion).
        shard: profile only documents ``shard.index``, ``shard.index + shard.count``, ...
        sequential: load and run one decoder layer at a time (models bigger than memory).
        on_start: called with the tokenized data (this rank's share under torchrun) once the
            model is loaded, right before the first forward pass.
        on_batch: called after each forward pass with the number of real tokens it held
            (a fraction of it per layer when ``sequential``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every rank profiles its share of
    the data and returns the stats of all of it.
    """
    ckpt = open_checkpoint(model_dir)
    spec = spec or spec_for_config(ckpt.config)
    layout = resolve_layout(ckpt, spec)
    if sequential:
        layout.require_one_stack("--sequential profiling")
        layout.require_single_pass(
            "--sequential profiling", hint="profile it whole (without --sequential)"
        )
    _check_counts(max_tokens=max_tokens, batch_size=batch_size, seq_len=seq_len)
    seq_len = resolve_seq_len(ckpt.config, seq_len)
    world = distributed.detect_world()
    if world is not None and shard != WHOLE:
        raise MfpruneError(
            f"--shard {shard} under torchrun: the ranks already split the data",
            hint="drop --shard, or run single processes with --shard and merge-stats",
        )
    if world is not None and device == "auto" and torch.cuda.is_available():
        device = f"cuda:{world.local_rank}"
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    if not sequential:
        check_fits(
            loaded_bytes(ckpt, torch_dtype), device=torch_device,
            what=f"profiling {ckpt.root} whole (the model is loaded at once)",
            hint="profile it one decoder layer at a time with --sequential",
        )  # fmt: skip
    tokenizer = load_tokenizer(ckpt.root)
    tokens = load_token_data(
        data,
        tokenizer,
        seq_len=seq_len,
        max_tokens=max_tokens,
        text_field=text_field,
        shard=shard,
        min_tokens=MIN_TOKENS,
    )
    _check_vocab(tokens, lm_config(ckpt.config, spec))
    run = _Run(
        batch_size=batch_size,
        dtype=torch_dtype,
        device=torch_device,
        sequential=sequential,
        on_start=on_start,
        on_batch=on_batch,
    )
    if world is None:
        return run.profile(ckpt, spec, layout, tokens, tokenizer)
    with distributed.process_group(world, torch_device):
        distributed.check_same_data(tokens, ckpt.fingerprint())
        return run.profile(ckpt, spec, layout, tokens, tokenizer, world=world)


@dataclass(frozen=True)
class _Run:
    """How to run the forward passes (the options profile_model checked)."""

    batch_size: int
    dtype: torch.dtype | str
    device: torch.device
    sequential: bool
    on_start: Callable[[TokenData], None] | None
    on_batch: Callable[[float], None] | None

    def profile(
        self,
        ckpt: Checkpoint,
        spec: ArchSpec,
        layout: ModelLayout,
        tokens: TokenData,
        tokenizer: Any,
        *,
        world: World | None = None,
    ) -> ProfileStats:
        share = tokens if world is None else distributed.rank_share(tokens, world)
        batches = share.batches(batch_size=self.batch_size, pad_id=_pad_id(tokenizer))
        if self.sequential:
            from mfprune.profiling.sequential import LayerByLayer, build_skeleton, checkpoint_dtype

            dtype = self.dtype if isinstance(self.dtype, torch.dtype) else checkpoint_dtype(ckpt)
            model = build_skeleton(ckpt, dtype=dtype, device=self.device)
            recorder = Recorder(model, layout, device=self.device)
            runner = LayerByLayer(ckpt, model, device=self.device)
            if self.on_start is not None:
                self.on_start(share)
            runner.run(list(batches), recorder, on_batch=self.on_batch)
        else:
            check_loadable(ckpt.config, where=str(ckpt.root))  # --model-code / remote code
            model = load_model(ckpt.root, dtype=self.dtype, device=self.device)
            recorder = Recorder(model, layout)
            text = text_model(model)  # Qwen3-Omni: its thinker; others: the model
            decoder = text.base_model  # the decoder stack, without the LM head
            encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
            if encoder_decoder:  # both stacks (Switch Transformers' base model is itself)
                decoder = text
            elif is_block_diffusion(model.config):  # DiffusionGemma: the causal prompt pass
                decoder = text.get_encoder()  # (the decoder's layers are its weights, tied)
            elif decoder is text:  # Llama 4's composite holds a whole causal LM: its decoder
                decoder = text.get_decoder()
            if self.on_start is not None:
                self.on_start(share)
            with torch.no_grad(), recorder.attached():
                for ids, mask in batches:
                    recorder.set_mask(mask)
                    inputs = {"input_ids": ids.to(self.device)}
                    if encoder_decoder:
                        # both stacks read the tokens (the oracle's convention); the decoder
                        # is causal, so right padding leaves the real positions alone
                        inputs["decoder_input_ids"] = inputs["input_ids"]
                    decoder(**inputs, attention_mask=mask.to(self.device), use_cache=False)
                    if self.on_batch is not None:
                        self.on_batch(int(mask.sum()))
        if world is not None:
            distributed.all_reduce(recorder.accumulators())
        experts = _complete(recorder.expert_stats("experts"), tokens.tokens, "experts")
        attention = recorder.expert_stats("attention_experts")
        if attention is not None:
            _complete(attention, tokens.tokens, "attention experts")
        from mfprune import __version__

        meta = StatsMeta(
            family=spec.family,
            model_type=str(ckpt.config.get("model_type")),
            model_fingerprint=ckpt.fingerprint(),
            data_fingerprint=tokens.fingerprint,
            data_parts=(tokens.fingerprint,),
            tokens=tokens.tokens,
            documents=tokens.documents,
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            mfprune_version=__version__,
        )
        return ProfileStats(
            meta=meta,
            experts=experts,
            attention_experts=attention,
            heads=recorder.head_stats(),
        )


def _complete(stats: ExpertStats | None, total: int, what: str) -> ExpertStats:
    """Every MoE layer must have seen every token, once per pass (a looped layer runs several
    times per token, ``ExpertStats.passes``): a module that bypassed the hooks (a fused kernel
    swapped in for the MoE block, say) would otherwise leave silent zeros, and a loop the
    adapter does not describe, sums over the wrong number of passes."""
    if stats is None:
        raise ModelError(
            f"the profiling hooks saw no {what} output in any layer",
            hint="the model ran a code path mfprune does not hook (e.g. a hub kernel for the "
            "MoE block); please report it with the model's config.json",
        )
    seen = zip(stats.layers, stats.tokens.tolist(), stats.layer_passes().tolist(), strict=True)
    off = [(layer, n, passes) for layer, n, passes in seen if n != total * passes]
    if not off:
        return stats
    if all(n == 0 for _, n, _ in off):
        raise ModelError(
            f"the profiling hooks saw no {what} output in layers {[L for L, _, _ in off]}",
            hint="the model ran a code path mfprune does not hook (e.g. a hub kernel for the "
            "MoE block); please report it with the model's config.json",
        )
    shown = ", ".join(f"layer {L}: {n} for {passes} x {total}" for L, n, passes in off)
    raise ModelError(
        f"the {what} routers routed another number of tokens than the model ran ({shown}): "
        "a layer ran more or fewer times per token than the adapter says",
        hint="a model whose layers run several times per token (looped layers) needs a [loop] "
        "rule in its adapter (docs/adding-an-architecture.md)",
    )


DEFAULT_SEQ_LEN = 2048


def resolve_seq_len(config: dict[str, Any], seq_len: int | None) -> int:
    """``seq_len``, or the default capped at the model's positions; refuse a longer one than
    the model was built for (positions past it are extrapolation, not the task)."""
    cfgs = [
        config,
        config.get("text_config") if isinstance(config.get("text_config"), dict) else {},
    ]
    positions = next(
        (v for c in cfgs if isinstance(v := c.get("max_position_embeddings"), int) and v > 0),
        None,
    )
    if seq_len is None:
        return min(DEFAULT_SEQ_LEN, positions or DEFAULT_SEQ_LEN)
    if positions is not None and seq_len > positions:
        raise MfpruneError(
            f"--seq-len {seq_len} is longer than the model's max_position_embeddings = {positions}",
            hint=f"pass --seq-len {positions} or less (or leave it out)",
        )
    return seq_len


def _check_counts(**counts: int | None) -> None:
    for name, value in counts.items():
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise MfpruneError(f"{flag} must be at least 1, got {value}", hint=f"fix {flag}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise MfpruneError(
            f"unknown device '{device}'", hint="use auto, cpu, cuda or cuda:N"
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MfpruneError(
            f"device '{device}' asked for, but torch sees no CUDA device",
            hint="pass --device cpu, or install a CUDA build of torch",
        )
    return resolved


def resolve_dtype(dtype: str) -> torch.dtype | str:
    if dtype == "auto":
        return "auto"
    if dtype not in DTYPES:
        raise MfpruneError(f"unknown dtype '{dtype}'", hint=f"use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    hint = (
        "profiling needs the model's tokenizer files (tokenizer.json, tokenizer_config.json) "
        "in the model folder"
    )
    if not any((model_dir / name).exists() for name in _TOKENIZER_FILES):
        raise ModelError(f"no tokenizer in {model_dir}", hint=hint)
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the tokenizer in {model_dir}: {why}", hint=hint) from None


def load_model(model_dir: Path, *, dtype: torch.dtype | str, device: torch.device) -> Any:
    from mfprune.loading import model_class_for, quantization_support
    from mfprune.modelcode import model_kwargs

    cls = model_class_for(open_checkpoint(model_dir).config)
    with quiet_transformers(), quantization_support(model_dir):
        model = cls.from_pretrained(
            model_dir, dtype=dtype, local_files_only=True, use_safetensors=True, **model_kwargs()
        )
    return model.to(device).eval()


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars or warnings: ours is the only bar on stderr."""
    from transformers.utils import logging as hf_logging

    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _check_vocab(tokens: TokenData, config: dict[str, Any]) -> None:
    vocab = config.get("vocab_size")
    top = max(int(c.max()) for c in tokens.chunks)
    if isinstance(vocab, int) and top >= vocab:
        raise DataError(
            f"the tokenizer produced token id {top}, but the model's vocabulary has {vocab} "
            "entries",
            hint="the tokenizer in the model folder does not belong to this model",
        )


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if isinstance(candidate, int):
            return candidate
    return 0
